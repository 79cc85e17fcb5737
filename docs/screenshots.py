"""The README's pictures of the app, taken in headless Chromium with the embedded tiny model:
`python -m docs.screenshots` (from the repository root; needs `apt-get install -y chromium` and playwright)
rewrites docs/compare.png, docs/next_token.png (the compare tab's next-token panel), docs/layer_sweep.png (its
layer sweep), docs/chat.png, docs/image.png, docs/score.png, docs/train.png (an epoch of the Train tab's offered
questions) and docs/model.png (the Model tab, the adapter just trained downloaded). The image tab shows the first
shipped example the image adapter answers right (it gets 42% of held-out image questions right: docs/tiny.md);
the score tab, the text adapter on the held-out questions it offers."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

from adapter.engine import Settings
from adapter.tiny.assets import ASSETS, EXAMPLES
from adapter.tiny.examples import FILE
from app import DOWNLOAD_FORMATS, SWEEP
from tests.app_helpers import running_app
from tests.browser import (
    ask,
    chromium,
    coloured,
    compare,
    download,
    finished,
    layer_sweep,
    next_token,
    open_page,
    score,
    start_training,
    sweep,
)

DOCS = Path(__file__).resolve().parent
QUESTION = "There is a large red star on the left. What colour is the star?"  # the README's example


def save(target, path: Path, **options) -> None:
    """A PNG of a page or an element, written next to its place and renamed over it, so a failed run leaves the
    old one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as temporary:
        target.screenshot(path=temporary.name, **options)
    os.chmod(temporary.name, 0o644)  # a temporary file is private; the picture is not
    os.replace(temporary.name, path)


def answered_right(engine) -> tuple[Path, str]:
    """The first shipped (picture, question) whose answer at the app's default settings is the expected one."""
    folder = ASSETS / EXAMPLES
    for example in json.loads((folder / FILE).read_text(encoding="utf-8"))["image"]:
        picture = folder / example["image"]
        *_, answer = engine.ask_image(Image.open(picture), example["question"], Settings())
        if answer == example["answer"]:
            return picture, example["question"]
    raise RuntimeError(f"the image adapter answers none of {folder / FILE}'s questions right")


def take(out: Path) -> list[Path]:
    """Compare, chat and score tabs with the text adapter, the image tab with the image adapter (both served by
    the default app, each tab starting with its own)."""
    shots = [out / name for name in ("compare.png", "next_token.png", "chat.png", "image.png", "score.png",
                                     "layer_sweep.png", "train.png", "model.png")]
    with chromium() as browser, running_app([]) as app:
        page = open_page(browser, app.url)
        base, adapted = compare(page, QUESTION)
        print(f"compare: base {base!r}, adapter {adapted!r}")
        print(f"sweep: {sweep(page, SWEEP)}")
        save(page, shots[0], full_page=True)
        print(f"next token: {next_token(page, SWEEP)}")
        save(page.locator("#next_token_panel"), shots[1])
        print(f"layer sweep: {layer_sweep(page)}")
        save(page.locator("#layer_sweep_table"), shots[5])
        page.get_by_role("tab", name="Chat").click()
        print(f"chat: {ask(page, QUESTION)!r}")
        page.locator("#chat_layers img").wait_for()
        finished(page, "#chat_colours", "#chat_layers")
        save(page, shots[2], full_page=True)
        page.get_by_role("tab", name="Image").click()
        picture, question = answered_right(app.engines.get(app.engines.for_images))
        page.locator("#image input[type=file]").set_input_files(str(picture))
        page.fill("#image_question textarea", question)
        page.click("#ask")
        coloured(page, "#image_colours")
        page.locator("#image_layers img").wait_for()
        finished(page, "#image_colours", "#image_layers")
        print(f"image: {question!r} -> {page.input_value('#image_answer textarea')!r}")
        print(f"image sweep: {sweep(page, SWEEP, prefix='image_')}")
        save(page, shots[3], full_page=True)
        page.get_by_role("tab", name="Score").click()
        page.get_by_text("tiny_held_out.jsonl").first.click()
        page.locator("#score_file [aria-label='tiny_held_out.jsonl']").wait_for()
        print(f"score: {score(page, SWEEP)}")
        save(page, shots[4], full_page=True)
        start_training(page, "tiny_training.jsonl", epochs=1)
        status = page.locator("#train_status")
        status.get_by_text("served as trained-1").wait_for(timeout=120_000)
        page.locator("#train_zip [aria-label='trained-1.zip']").wait_for()
        print(f"train: {status.inner_text()!r}")
        save(page, shots[6], full_page=True)
        download(page, DOWNLOAD_FORMATS[0][0], "trained-1.zip")
        save(page, shots[7], full_page=True)
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default: docs/)")
    for path in take(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
