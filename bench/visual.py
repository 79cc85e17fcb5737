"""Image-question benchmark: time to encode one image (CLIP tower + v2 visual prompt) and time to first
token of an image question, on a ViT-B/32-sized open_clip tower (random weights) and the 512-dim
benchmark LLaMA, CPU.

    python -m bench.visual [--threads 2] [--repeats 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from PIL import Image

from adapter.config import AdapterArgs
from adapter.model import Transformer
from adapter.visual import ImageEncoder, attach_image_encoder, encode_images
from bench.args import positive_int, run_main
from bench.decode import SHAPE, machine, measure, measure_side_by_side
from bench.report import publish

SWEEP_ROWS = 9  # the app's largest gate sweep
ADAPTER = AdapterArgs(prompt_len=10, prompt_layers=8, visual="v2", clip_dim=512, visual_dim=768, visual_depth=8,
                      visual_heads=16, clip_model="ViT-B-32")


def build() -> Transformer:
    import open_clip

    torch.manual_seed(0)
    model = Transformer(SHAPE, ADAPTER).eval()
    attach_image_encoder(model, ImageEncoder(open_clip.create_model("ViT-B-32", pretrained=None).visual, "ViT-B-32"))
    return model


def encode_ms(model: Transformer, images: list[Image.Image]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        encode_images(model, images)
        return (time.perf_counter() - start) * 1000


def first_token_ms(model: Transformer, image: Image.Image, prompt_len: int = 64) -> float:
    tokens = torch.randint(0, SHAPE.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        visual = encode_images(model, [image])
        cache = model.new_cache(1, prompt_len + 1, visual_prompt=visual)
        model.step(tokens, cache).argmax(-1)
        return (time.perf_counter() - start) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.visual", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--write", help="replace the image section of this markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    model = build()
    image = Image.new("RGB", (640, 480), (200, 30, 40))
    sweep, copies = [image] * SWEEP_ROWS, [image.copy() for _ in range(SWEEP_ROWS)]
    rows = [("encode one image (preprocess, ViT-B/32 tower, v2 visual prompt), ms",
             measure(lambda: encode_ms(model, [image]), options.repeats)),
            *zip((f"the picture of a {SWEEP_ROWS}-scale gate sweep ({SWEEP_ROWS} rows, one image: encoded once), ms",
                  f"the same as {SWEEP_ROWS} distinct copies (each encoded, as every sweep was before), ms"),
                 measure_side_by_side([lambda: encode_ms(model, sweep), lambda: encode_ms(model, copies)],
                                      options.repeats)),
            ("time to first token, image question with a 64-token prompt, ms",
             measure(lambda: first_token_ms(model, image), options.repeats))]
    command = "python -m bench.visual " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "## Image questions (CPU, fp32): ViT-B/32-sized open_clip tower, 512-dim LLaMA, v2 visual prompt",
        "",
        f"Machine: {machine()}. Command: `{command.strip()}`. Median of the runs, min / max beside it.",
        "",
        "| measure | median | min / max |",
        "|---|---|---|",
        *(f"| {name} | {med:.1f} | {lo:.1f} / {hi:.1f} |" for name, (med, lo, hi) in rows),
        "",
    ])
    publish(text, "Image questions (CPU", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
