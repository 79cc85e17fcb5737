"""`python -m adapter.finetune`: train an adapter on Alpaca-style (or LLaVA-style) data.

Single process, or one process per GPU with `torchrun --nproc_per_node N -m adapter.finetune ...`.
Bad arguments, bad records and a diverging loss are reported on stderr with exit code 2. Ctrl-C (SIGINT) or
SIGTERM (a preempted job's warning) stops the run after the step under way with its adapter and a checkpoint saved
(exit code 130 or 143), in every process at the same step under torchrun, so that the same command with --resume
goes on to the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..arg_types import refusal, unicode_output
from ..config import VISUAL_PROMPT_KINDS
from ..formats import BASE_HELP
from ..prompts import PROMPT_FORMATS
from .config import AUTOCASTS, DEFAULT_MAX_SEQ_LEN, DEFAULT_WARMUP_EPOCHS, EXPORTS, MODES, TrainConfig
from .records import DATA_HELP

DEFAULTS = TrainConfig(base="", data="", out="")  # the defaults, in one place
# flags that some runs do not use: set there to other than their default, they are refused rather than ignored
SOMETIMES_USED = ("prompt_len", "prompt_layers", "val_fraction", "visual", "visual_dim", "visual_depth",
                  "visual_heads")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m adapter.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True,
                   help=BASE_HELP)
    p.add_argument("--data", required=True,
                   help=f"{DATA_HELP} of {{instruction, input?, output}}, LLaVA or chat messages records, or of "
                        "{text} documents (plain text, in windows of --max-seq-len); or a .txt file (one document)")
    p.add_argument("--image-folder", help="folder that LLaVA records' 'image' paths are relative to")
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, plots, adapter/")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="v1: prompts + gates; v2: + biases, norms, LoRA; vision: v2 + visual prompt; lora: LoRA "
                        "alone (no prompts; the baseline, --export peft writes it as PEFT LoRA)")
    p.add_argument("--clip", help="--mode vision: CLIP weights (a local file, or an open_clip tag such as openai)")
    p.add_argument("--clip-model", help="open_clip model name or config .json (default: ViT-L-14-quickgelu)")
    p.add_argument("--visual", choices=VISUAL_PROMPT_KINDS, default=d.visual, help="--mode vision: which visual prompt")
    p.add_argument("--visual-dim", type=int, default=d.visual_dim, help="v2 visual prompt width")
    p.add_argument("--visual-depth", type=int, default=d.visual_depth, help="v2 visual prompt blocks")
    p.add_argument("--visual-heads", type=int, default=d.visual_heads, help="v2 visual prompt heads")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--prompt-layers", type=int, default=d.prompt_layers, help="capped at the base's layers")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="v2 / lora: LoRA rank (0 = none)")
    p.add_argument("--lora-targets", help="v2 / lora: the linears that get LoRA, e.g. wq,wv (default: all seven, wq, "
                                          "wk, wv, wo, w1, w2, w3, as the official LORA-BIAS releases)")
    p.add_argument("--bias-targets", help="v2: the linears that get a bias (default: wq,wo,w1,w2,w3, as the official "
                                          "multimodal releases; the V2 dialog model has all seven)")
    p.add_argument("--scale", action="store_true",
                   help="v2: also learn a ones-init scale of each linear's input, W(s * x) + b (the V2 paper's bias "
                        "tuning, as the official V2 dialog model has it)")
    p.add_argument("--init-adapter",
                   help="start from this adapter (any supported format: ours, official, PEFT, litgpt; or "
                        "hf:owner/name) instead of a fresh one: its shape, gates and all come from it (--prompt-len, "
                        "--prompt-layers are refused); --mode must be its kind (v1, v2, or vision with --clip)")
    p.add_argument("--prompt-format", choices=tuple(PROMPT_FORMATS), default=d.prompt_format,
                   help="how the examples are written: alpaca (the official recipe), llama2 (Llama 2 Chat's format), "
                        "llama3 (Llama 3 Instruct's), llama3.1 / llama3.2 (Llama 3.1 and 3.3 / 3.2 Instruct's, with "
                        "their dated system turn), mistral or mistral-v3 (Mistral 7B Instruct v0.1/v0.2's or "
                        "v0.3's), v2-dialog (the official V2 dialog demo's), for a base tuned to that chat; saved "
                        "with the adapter, which is then asked in it")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"epochs of linear warm-up (default {DEFAULT_WARMUP_EPOCHS:g}, or every epoch where there "
                        "are fewer)")
    p.add_argument("--blr", type=float, default=d.blr, help="base lr; lr = blr * batch-size / 256")
    p.add_argument("--lr", type=float, help="absolute peak lr (overrides --blr)")
    p.add_argument("--visual-lr", type=float,
                   help="--mode vision: peak lr of the visual prompt (projections, ViT blocks); default: --lr")
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step, all processes")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="examples per forward pass")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help=f"longer examples are cut (default: {DEFAULT_MAX_SEQ_LEN}, or the base's context if shorter)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="records held out for the validation loss (not with --val-data)")
    p.add_argument("--val-data", help="a validation file of its own (same layouts as --data): all of --data trains")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm, 0 = off")
    p.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none", help="4/8-bit frozen base")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda when available; torchrun: one GPU per process)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base dtype")
    p.add_argument("--autocast", choices=AUTOCASTS, default=d.autocast,
                   help="bf16 autocast: auto = on GPU only; bf16 also on CPU (fast on CPUs with AMX)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (default: every epoch)")
    p.add_argument("--val-every", type=int, help="validation loss every N optimizer steps (default: every epoch; "
                                                 "always at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--export", choices=EXPORTS, help="also write the adapter in this format (peft: a --mode lora "
                                                     "LoRA, in OUT/peft; official-v1: a --mode v1 adapter)")
    p.add_argument("--keep-best", action="store_true",
                   help="also keep the adapter of the lowest validation loss (checked at each validation) in "
                        "OUT/best")
    p.add_argument("--early-stop", type=int, metavar="N",
                   help="end the run once N validations in a row bring no lower validation loss (with --keep-best, "
                        "OUT/best then holds the lowest's adapter)")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME",
                   help="then push the adapter (OUT/best's with --keep-best) with a model card and the run's plots to "
                        "this Hugging Face hub repository, as python -m adapter.push does (token: HF_TOKEN or "
                        "`hf auth login`; checked before training)")
    p.add_argument("--hub-private", action="store_true", help="--push-to-hub: create the repository private")
    p.add_argument("--max-steps", type=int, help="stop after this optimizer step (for tests and debugging)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def unused_flag(options: dict) -> str | None:
    """What is wrong with a flag set where the run does not use it (None: nothing)."""
    changed = {name for name in SOMETIMES_USED if options[name] != getattr(DEFAULTS, name)}
    prompts = sorted(changed & {"prompt_len", "prompt_layers"})
    visual = sorted(changed & {"visual", "visual_dim", "visual_depth", "visual_heads"})
    if prompts and options["mode"] == "lora":
        return f"--{prompts[0].replace('_', '-')}: --mode lora trains LoRA alone, no prompts"
    if prompts and options["init_adapter"]:
        return f"--{prompts[0].replace('_', '-')}: the adapter's shape comes from --init-adapter"
    if "val_fraction" in changed and options["val_data"]:
        return "--val-fraction: not with --val-data (all of --data trains, --val-data validates)"
    if visual and options["mode"] != "vision":
        return f"--{visual[0].replace('_', '-')}: only --mode vision has a visual prompt"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    unicode_output()
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    problem = unused_flag(options)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    options["quantize"] = None if options["quantize"] == "none" else options["quantize"]
    push_to, private = options.pop("push_to_hub"), options.pop("hub_private")
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, the one that writes (and pushes)
    from ..push import hub_target
    from .step import TrainingStopped
    from .trainer import RunHooks, train

    out = options["out"]
    try:
        repo = hub_target(push_to, private)
        with signals_stop_the_run() as stop:
            result = train(TrainConfig(**options), RunHooks(stop=stop))
        if result.stopped:
            if main_process:
                print(f"stopped at step {result.steps}: its adapter is in {result.adapter.parent}"
                      f"{' (not pushed)' if repo else ''}; the same command with --resume goes on to the end",
                      file=sys.stderr)
            return 128 + stop.signum
        if repo and main_process:
            _push(result.best or result.adapter, repo, options["base"], private)
    except (ValueError, OSError, TrainingStopped) as error:
        if main_process:  # under torchrun, every process has the same error
            print(refusal(error, parser), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C
        if main_process:
            print(f"interrupted: the last checkpoint in {out} (if one was written) is kept; the same command with "
                  "--resume goes on from it", file=sys.stderr)
        return 130
    return 0


class StopSignal(threading.Event):
    """Set by the first SIGINT or SIGTERM; remembers which, for the exit code (128 + its number)."""

    signum: int = signal.SIGINT


@contextmanager
def signals_stop_the_run() -> Iterator[StopSignal | None]:
    """An event that the first Ctrl-C (SIGINT) or SIGTERM sets: the run then stops after the step under way, saving
    what it learnt. In one process a second Ctrl-C interrupts at once, and a signal ignored when the command started
    (a job started in the background) stays ignored. Under torchrun (or another launcher setting WORLD_SIZE) each
    signal only sets the event, even one the launcher's shell ignores: the workers run in sessions of their own, so
    what reaches them was sent by torchrun (which ends them itself once TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds have
    passed, 30 by default), and the trainer makes every process stop after the same step. Off the main thread, None:
    signals are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    stop = StopSignal()
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    main_process = os.environ.get("RANK", "0") == "0"

    def received(signum: int, frame: object) -> None:
        if stop.is_set():
            if signum == signal.SIGINT and not launched:  # the second Ctrl-C
                signal.signal(signal.SIGINT, before[signal.SIGINT])
                raise KeyboardInterrupt
            return
        stop.signum = signum
        stop.set()
        if not main_process:
            return
        name = "Ctrl-C" if signum == signal.SIGINT and not launched else signal.Signals(signum).name
        if launched:
            print(f"{name}: every process stops after the step under way, its adapter and a checkpoint saved "
                  "(torchrun ends them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, 30 by default)",
                  file=sys.stderr, flush=True)
        else:
            again = " (Ctrl-C again to interrupt at once)" if signum == signal.SIGINT else ""
            print(f"{name}: stopping after the step under way, its adapter and a checkpoint saved{again}",
                  file=sys.stderr, flush=True)

    for signum, handler in before.items():
        if launched or handler is not signal.SIG_IGN:
            signal.signal(signum, received)
    try:
        yield stop
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _push(adapter: Path, repo: str, base: str, private: bool) -> None:
    from ..push import push

    try:
        print(f"pushed {push(adapter, repo, base, private=private)}")
    except ValueError as error:
        raise ValueError(f"{error}; the adapter is kept in {adapter.parent}: push it later with python -m "
                         f"adapter.push {adapter.parent} {repo} --base {base}") from error
