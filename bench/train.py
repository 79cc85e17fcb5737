"""Training benchmark: tokens/s and peak memory of adapter training steps, v1 and v2, on an fp32 and an nf4 base,
ours beside transformers + peft `adaption_prompt` training the same model (bench.peers) on the same batches.

Shape: LLaMA dim 512, 8 layers, 8 heads, vocab 32000, prompt_len 10 on all 8 layers; 8 sequences of 64-192 tokens
per optimizer step as 2 micro-batches of 4, loss on the last 60% of each, AdamW, clipping 1.0. v1 = prompts and
per-head gates; v2 adds the zero-init biases and tunable norms. peft has no v2 (its adaption_prompt is v1 only),
so a v2 row compares with the peer's v1 on the same base. Each side runs in a fresh process; peak memory is the
resident peak during the steps (bench.rss). Both are causal-only (right padding, padding masked in the labels);
gates start at zero, so both start from the base model, which is checked (their logits) before anything is timed.

    python -m bench.train [--threads 2] [--steps 5] [--repeats 3] [--modes v1,v2] [--bases fp32,nf4] [--smoke]
                          [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from adapter.config import AdapterArgs
from adapter.finetune.batching import Batch, collate
from adapter.finetune.encode import IGNORE_INDEX, Encoded
from bench.args import positive_int, run_main
from bench.compare import TOLERANCE, PeerMismatch
from bench.decode import machine
from bench.peers import Weights, load_ours, load_peer, quiet, write_weights
from bench.report import command_line, publish, table, versions
from bench.rss import current_mb, peak_mb, reset_peak
from bench.shapes import shapes

HEADING = "Training (CPU"
MICRO_BATCHES, MICRO_BATCH_SIZE = 2, 4
LENGTHS, SMOKE_LENGTHS = (64, 192), (8, 16)
LR = 1e-3
MODES = ("v1", "v2")
BASES = ("fp32", "nf4")


def adapter_for(mode: str, v1: AdapterArgs) -> AdapterArgs:
    """v2 here is the bias + norm variant (no LoRA), on the same prompts as v1."""
    return v1 if mode == "v1" else dataclasses.replace(v1, bias=True, norm=True)


def batches(steps: int, vocab: int, lengths: tuple[int, int] = LENGTHS) -> list[list[Batch]]:
    """Fixed random sequences: the first 40% of each is prompt (ignored), the rest is trained on."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(MICRO_BATCHES):
            items = []
            for _ in range(MICRO_BATCH_SIZE):
                length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
                tokens = torch.randint(3, vocab, (length,), generator=generator).tolist()
                prompt = int(length * 0.4)
                items.append(Encoded(tokens, [IGNORE_INDEX] * prompt + tokens[prompt:]))
            step.append(collate(items))
        out.append(step)
    return out


def targets(step: list[Batch]) -> int:
    return sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in step)


def build(weights: Weights, side: str, mode: str, base: str, v1: AdapterArgs) -> torch.nn.Module:
    """The model a worker trains: ours through adapter.load, the peer (always v1) through from_pretrained."""
    if side == "ours":
        return load_ours(weights, base, adapter_for(mode, v1)).train()
    return load_peer(weights, base, v1).train()


def peer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: list[Batch]) -> float:
    """One optimizer step of the peer, as ours does it: the loss is the mean over the whole step's trained
    tokens (each micro-batch weighted by its share), gradients clipped to 1.0; the step's loss."""
    n, loss = targets(step), 0.0
    for batch in step:
        part = (batch.labels[:, 1:] != IGNORE_INDEX).sum() / n
        weighted = model(input_ids=batch.tokens, labels=batch.labels).loss * part
        weighted.backward()
        loss += float(weighted)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def peer_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over peft's trainable tensors, with our betas."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95))


def worker(folder: str, side: str, mode: str, base: str, threads: int, steps: int, smoke: bool) -> dict:
    """Train `steps` (+1 warm-up) steps in this process: the time and tokens of each timed step, memory, losses."""
    from adapter.finetune.distributed import Processes
    from adapter.finetune.optimizer import build_optimizer
    from adapter.finetune.step import optimizer_step

    quiet()
    torch.set_num_threads(threads)
    args, v1 = shapes(smoke)
    model = build(Weights.at(folder, args), side, mode, base, v1)
    optimizer = build_optimizer(model, LR, 0.02) if side == "ours" else peer_optimizer(model)
    losses, seconds, tokens = [], [], []
    reset_peak()
    loaded = current_mb()
    for index, step in enumerate(batches(steps + 1, args.vocab_size, SMOKE_LENGTHS if smoke else LENGTHS)):
        n = targets(step)
        start = time.perf_counter()
        if side == "ours":
            loss = optimizer_step(model, optimizer, step, n, Processes(), lr=LR, clip_grad=1.0, step=index + 1).loss
        else:
            loss = peer_step(model, optimizer, step)
        if index:  # the first step is a warm-up
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(b.n_tokens for b in step))
        losses.append(loss)
    return {"seconds": seconds, "tokens": tokens, "loaded_mb": loaded, "peak_rss_mb": peak_mb(),
            "first_loss": losses[0], "last_loss": losses[-1]}


def check_same_start(weights: Weights, mode: str, base: str, v1: AdapterArgs, smoke: bool) -> float:
    """Both sides' logits on the first micro-batch, before any update (relative max difference); PeerMismatch
    unless within the base's tolerance (bench.compare): the two must train the same model to be compared."""
    batch = batches(1, weights.args.vocab_size, SMOKE_LENGTHS if smoke else LENGTHS)[0][0]
    with torch.no_grad():
        ours = build(weights, "ours", mode, base, v1)(batch.tokens)
        peer = build(weights, "peer", mode, base, v1)(input_ids=batch.tokens).logits.float()
    difference = float((ours - peer).abs().max() / ours.abs().max())
    if difference > TOLERANCE[base]:
        raise PeerMismatch(f"{mode} on {base}: the first logits differ by {difference:.1e} (relative), more than the "
                           f"{TOLERANCE[base]:.0e} allowed; the peer does not train our model, so it is not timed")
    return difference


def run_worker(folder: str, side: str, mode: str, base: str, threads: int, steps: int, smoke: bool) -> dict:
    command = [sys.executable, "-m", "bench.train", "--worker", side, "--folder", folder, "--modes", mode,
               "--bases", base, "--threads", str(threads), "--steps", str(steps)] + (["--smoke"] if smoke else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {mode} {base} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Tokens/s with each step's best time over the repeats (as timeit takes the minimum: other work on a
    shared machine only ever slows a step down), each run's own tokens/s for the spread, the largest memory."""
    tokens = sum(runs[0]["tokens"])
    best = sum(min(times) for times in zip(*(r["seconds"] for r in runs)))
    per_run = [tokens / sum(r["seconds"]) for r in runs]
    return {**runs[0], "tokens_per_s": tokens / best, "spread": (min(per_run), max(per_run)),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "loaded_mb": max(r["loaded_mb"] for r in runs)}


def rows_for(mode: str, base: str, a: dict, b: dict) -> list[tuple[str, ...]]:
    peer = "" if mode == "v1" else " (peer: v1)"
    label = (mode, base)
    return [
        (*label, "training tokens/s, best time per step (slowest / fastest run)" + peer,
         f"{a['tokens_per_s']:.0f} ({a['spread'][0]:.0f} / {a['spread'][1]:.0f})",
         f"{b['tokens_per_s']:.0f} ({b['spread'][0]:.0f} / {b['spread'][1]:.0f})",
         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}"),
        (*label, "peak resident memory while training, MB" + peer, f"{a['peak_rss_mb']:.0f}", f"{b['peak_rss_mb']:.0f}",
         f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"),
        (*label, "resident after loading, MB" + peer, f"{a['loaded_mb']:.0f}", f"{b['loaded_mb']:.0f}",
         f"{a['loaded_mb'] / b['loaded_mb']:.2f}"),
        (*label, "loss, first step (same base model)", f"{a['first_loss']:.4f}", f"{b['first_loss']:.4f}", ""),
        (*label, "loss, last step" + peer, f"{a['last_loss']:.4f}", f"{b['last_loss']:.4f}", ""),
    ]


def render(checks: list[tuple[str, ...]], rows: list[tuple[str, ...]], bases: Sequence[str], command: str, smoke: bool,
           v1: AdapterArgs) -> str:
    args, _ = shapes(smoke)
    lengths = SMOKE_LENGTHS if smoke else LENGTHS
    where = "fp32" if list(bases) == ["fp32"] else " and ".join(bases) + " bases"
    return "\n".join([
        (f"## Training (CPU, {where}): LLaMA dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, "
         f"adapter on {v1.prompt_layers} layers, vs transformers + peft"
         + (" (--smoke: tiny shapes, figures mean nothing)" if smoke else "")),
        "",
        (f"Machine: {machine()}; {versions()}. Command: `{command}`. Each run in a fresh process, the sides "
         f"alternating; 8 sequences of {lengths[0]}-{lengths[1]} tokens per step (2 micro-batches of 4), AdamW, "
         "clipping 1.0, one warm-up step not timed, each step's best time over the runs; peak memory is the "
         "largest resident peak during the steps (reset after loading). Peer: transformers LlamaForCausalLM + "
         "peft `adaption_prompt` on the same weights and batches (nf4: `BitsAndBytesConfig`, ours "
         "`adapter.load(quantize=\"nf4\")`). v1: prompts and per-head gates; v2: also zero-init biases and tunable "
         "norms, which peft's adaption_prompt does not have, so v2 rows compare with the peer's v1."),
        "",
        ("Checked before timing: both sides' logits on the first micro-batch, before any update (the gates and v2 "
         "deltas start at zero, so every mode starts from the base model); a pair that differs stops the run."),
        "",
        *table(("mode", "base", "first logits, max relative difference", "allowed"), checks),
        "",
        *table(("mode", "base", "measure", "ours", "transformers + peft", "ours / peer"), rows),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=5, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="fresh processes per side, alternating")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: v1, v2")
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated: fp32, nf4")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one step, one run: checks the harness")
    parser.add_argument("--write", help="replace the training section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    modes, bases = options.modes.split(","), options.bases.split(",")
    if set(modes) - set(MODES) or set(bases) - set(BASES):
        parser.error(f"--modes: choose from {MODES}; --bases: choose from {BASES}")
    if options.worker:
        print(json.dumps(worker(options.folder, options.worker, modes[0], bases[0], options.threads, options.steps,
                                options.smoke)))
        return 0
    quiet()
    torch.set_num_threads(options.threads)  # as the workers run (and as the report's machine line says)
    steps, repeats = (1, 1) if options.smoke else (options.steps, options.repeats)
    args, v1 = shapes(options.smoke)
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as folder:
        weights = write_weights(folder, args)
        for base in bases:
            for mode in modes:
                checks.append((mode, base, f"{check_same_start(weights, mode, base, v1, options.smoke):.1e}",
                               f"{TOLERANCE[base]:.0e}"))
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(repeats):
                for side, mode in [("ours", m) for m in modes] + [("peer", "v1")]:
                    runs.setdefault((side, mode), []).append(
                        run_worker(folder, side, mode, base, options.threads, steps, options.smoke))
            peer = summary(runs[("peer", "v1")])
            rows += [row for mode in modes for row in rows_for(mode, base, summary(runs[("ours", mode)]), peer)]
    publish(render(checks, rows, bases, command_line("bench.train", argv), options.smoke, v1), HEADING, options.write,
            smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
