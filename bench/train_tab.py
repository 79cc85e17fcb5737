"""The app's Train tab, as users see it: one epoch of the tiny model's offered training questions at the tab's
starting settings (its text adapter's recipe: 20 prompt tokens on its 4 layers, batch 16, lr 0.02) from the click
to the adapter served, through gradio_client against `python app.py`; beside it the same run by
`python -m adapter.finetune` in a process of its own (which loads the base first); what training costs the
other users: the latency of a short chat answer while the tab trains, against the app idle; and one epoch of the
offered image questions in vision mode (a new image adapter on the served CLIP tower), the same two ways.

    python -m bench.train_tab [--repeats 3] [--chats 10] [--write BENCHMARKS.md]

Needs the embedded tiny model (assets/tiny/).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adapter.app_config import ServeConfig, tiny_available
from adapter.live_training import VALIDATIONS
from adapter.tiny.assets import ASSETS, CLIP_CONFIG, CLIP_WEIGHTS
from bench.app import ROOT, free_port, percentile, start_app
from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, publish, spread, stat, table

QUESTION = "There is a large red star on the left. What colour is the star?"
SETTINGS = dict(epochs=1, batch_size=16, lr=0.02, prompt_len=20, prompt_layers=4)  # the tab's for tiny
FINETUNE_FLAGS = ["--prompt-len", "20", "--prompt-layers", "4", "--epochs", "1", "--batch-size", "16",
                  "--micro-batch-size", "16", "--lr", "0.02", "--min-lr", "0.001", "--warmup-epochs", "0.1",
                  "--max-seq-len", "256", "--no-progress"]  # what adapter.live_training asks of the same settings
TEXT_STEPS, IMAGE_STEPS = 119, 60  # one epoch of the offered questions: 1,900 and 950 training examples in 16s
VISION_FLAGS = ["--mode", "vision", "--clip", str(ASSETS / CLIP_WEIGHTS), "--clip-model", str(ASSETS / CLIP_CONFIG),
                "--visual", "v1", "--visual-dim", "128", "--visual-depth", "2", "--visual-heads", "4"]  # tiny-image's


def run_seconds(status: str) -> float:
    """The seconds the status line gives: the run's own, from its start to the adapter served."""
    return float(status.split(" · ")[-1].split(" s)")[0])


def chat_seconds(client) -> float:
    started = time.perf_counter()
    client.predict(QUESTION, [], 1.0, 1.0, 0.0, 0.75, 16, 0, api_name="/chat")
    return time.perf_counter() - started


def train_in_the_tab(url: str, records: Path, chatting: bool,
                     pictures: Sequence[str] = ()) -> tuple[float, str, list[float]]:
    """Seconds from the click to the adapter served, the status line, and (`chatting`) the chat latencies of
    another client that asks over and over meanwhile. With `pictures` (image records'), a new image adapter (the
    seconds then include uploading them, which a click on the tab's offered files does not)."""
    from gradio_client import Client, handle_file

    trainer, other = Client(url, verbose=False), Client(url, verbose=False)
    s = SETTINGS
    started = time.perf_counter()
    job = trainer.submit(handle_file(str(records)), "vision" if pictures else "v1", s["epochs"], s["batch_size"],
                         s["lr"], s["prompt_len"], s["prompt_layers"], 8, "alpaca", 0, "",
                         [handle_file(p) for p in pictures], api_name="/train")
    latencies = []
    while chatting and not job.done():
        latencies.append(chat_seconds(other))
    status = job.result()[0]
    seconds = time.perf_counter() - started
    if not status.startswith("**Trained**"):
        raise RuntimeError(f"the Train tab did not finish its run: {status}")
    return seconds, status, latencies[:-1]  # the last answer may have ended after the run


def tab_validations(steps: int) -> list[str]:
    """--val-every for a run of `steps` steps that validates as often as the tab's runs do."""
    return ["--val-every", str(math.ceil(steps / VALIDATIONS))]


def finetune_alone(records: Path, flags: Sequence[str] = ()) -> tuple[float, float]:
    """Seconds of `python -m adapter.finetune` with the same settings (and `flags`), and its validation loss."""
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "adapter.finetune", "--base", "tiny", "--data", str(records), "--out",
                        folder + "/run", *FINETUNE_FLAGS, *flags], cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        log = [json.loads(line) for line in Path(folder, "run", "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return seconds, [r["val_loss"] for r in log if r["type"] == "val"][-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_tab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs of each way of training")
    parser.add_argument("--chats", type=positive_int, default=10, help="chat answers timed with the app idle")
    parser.add_argument("--write", help="replace the Train tab section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    if not tiny_available():
        raise SystemExit("bench.train_tab: needs the embedded tiny model (python -m adapter.tiny build)")
    from gradio_client import Client

    from adapter.app_examples import tiny_training_images, tiny_training_records

    records = tiny_training_records(ServeConfig())
    image_records, pictures = tiny_training_images(ServeConfig())
    port = free_port()
    process, _ = start_app([], port)
    try:
        url = f"http://127.0.0.1:{port}/"
        client = Client(url, verbose=False)
        chat_seconds(client)  # warm-up
        idle = [chat_seconds(client) for _ in range(options.chats)]
        quiet = [train_in_the_tab(url, records, chatting=False) for _ in range(options.repeats)]
        runs = [train_in_the_tab(url, records, chatting=True) for _ in range(options.repeats)]
        seeing = [train_in_the_tab(url, image_records, chatting=False, pictures=pictures)
                  for _ in range(options.repeats)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    alone = [finetune_alone(records, tab_validations(TEXT_STEPS)) for _ in range(options.repeats)]
    seeing_alone = [finetune_alone(image_records, [*VISION_FLAGS, "--image-folder", str(image_records.parent),
                                                   *tab_validations(IMAGE_STEPS)]) for _ in range(options.repeats)]
    busy = [latency for _, _, latencies in runs for latency in latencies]
    tab_loss, seeing_loss = (last[-1][1].split("validation loss ")[1].split(" ")[0] for last in (quiet, seeing))
    text = "\n".join([
        "## Train tab (CPU, gradio_client): embedded tiny model",
        "",
        (f"Machine: {machine()}. Command: `{command_line('bench.train_tab', argv)}`. One epoch ({TEXT_STEPS} "
         "optimizer steps of 16) of the 2,000 training questions the tab offers, at its starting settings for the "
         f"tiny model, validating {VALIDATIONS} times over the run as the tab does (`--val-every` the same); "
         f"`python app.py` with its defaults; times: median (min / max) of {options.repeats} runs. Chat answers: "
         "greedy, gate 1, 16 new tokens at most, asked by another client one after another. Image questions: "
         f"one epoch ({IMAGE_STEPS} steps) of the {len(pictures):,} the tab offers, vision mode (a new image "
         "adapter shaped as tiny-image's visual prompt, on the served CLIP tower), the same settings otherwise; "
         "through "
         "gradio_client their pictures are uploaded first, which clicking the offered files in the tab does not, "
         "so the run's own time (its status line's) is given beside it."),
        "",
        *table(("measure", "value"), [
            ("Train tab: one epoch, from the click to the adapter served, s", spread(stat([r[0] for r in quiet]))),
            ("the same while another client asks one chat question after another, s",
             spread(stat([r[0] for r in runs]))),
            ("the same run by `python -m adapter.finetune` in its own process (loads the base first; validating "
             "as often), s",
             spread(stat([a[0] for a in alone]))),
            ("validation loss after it: Train tab; `adapter.finetune`", f"{tab_loss}; {alone[-1][1]:.4f}"),
            ("a chat answer with the app idle: p50 / p95 latency, s",
             f"{percentile(idle, 0.5):.2f} / {percentile(idle, 0.95):.2f}"),
            (f"a chat answer while the tab trains ({len(busy)} answers): p50 / p95 latency, s",
             f"{percentile(busy, 0.5):.2f} / {percentile(busy, 0.95):.2f}"),
            ("image questions, vision mode: one epoch in the tab, the run itself (its start to the adapter served), s",
             spread(stat([run_seconds(r[1]) for r in seeing]))),
            (f"the same from the upload of the records and {len(pictures):,} pictures by gradio_client, s",
             spread(stat([r[0] for r in seeing]))),
            ("the same run by `python -m adapter.finetune` in its own process (loads the base and CLIP first; "
             "validating as often), s",
             spread(stat([a[0] for a in seeing_alone]))),
            ("validation loss after it: Train tab; `adapter.finetune`", f"{seeing_loss}; {seeing_alone[-1][1]:.4f}"),
        ]),
        "",
    ])
    publish(text, "Train tab (CPU", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
