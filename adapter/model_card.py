"""The README.md (model card) pushed beside an adapter to the Hugging Face hub (adapter.push): what the adapter is and
the base it belongs to, the commands that ask it, its gates per layer and, for one written by adapter.finetune (or
the app's Train tab, which runs it), how it was trained, read from the run's log.

A hub page is read by people deciding whether to use an adapter, so the card says what they need to run it: the
base's shape and name, the prompt format, the CLIP tower an image adapter reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .finetune.logs import LOG, read_log
from .gate_layers import adapter_layers, describe
from .hub import PREFIX, repo_of
from .model import Transformer
from .releases import PREFIX as OFFICIAL
from .tiny.assets import BASE_NAME, CLIP_NAME, base_name

RUN_ADAPTERS = ("adapter", "best")  # where a fine-tuning run writes its adapters: OUT/adapter, OUT/best
PLOTS = ("loss.png", "gates.png")  # a run's pictures, pushed beside its adapter


@dataclass
class Training:
    """A fine-tuning run, as its log.jsonl records it."""

    config: dict[str, Any]  # the run's settings (adapter.finetune.TrainConfig's fields)
    lr: float  # the peak learning rate (--lr, or --blr scaled by the batch size)
    train_examples: int
    val_examples: int
    steps: int  # optimizer steps that wrote the adapter
    total_steps: int  # the run's (its epochs' worth)
    last_loss: float | None  # the training loss of that step
    val_loss: float | None  # the validation loss at that step (None without validation)
    best: bool  # the adapter of the lowest validation loss (OUT/best), not the last step's
    plots: list[Path] = field(default_factory=list)
    ended_early: str | None = None  # why the run ended before its last step (--early-stop), if it did


def training_of(adapter: Path) -> Training | None:
    """The run that wrote `adapter` (a folder or its adapter.safetensors): OUT/adapter or OUT/best of a fine-tuning
    run, or the app's Train-tab zip unpacked (its log and plots beside the adapter); None for an adapter that no run
    of adapter.finetune wrote."""
    folder = adapter if adapter.is_dir() else adapter.parent
    run = folder if (folder / LOG).is_file() else folder.parent
    records = read_log(run / LOG) if run == folder or folder.name in RUN_ADAPTERS else []
    start = next((r for r in records if r.get("type") == "start"), None)
    if start is None:
        return None
    vals = [r for r in records if r.get("type") == "val"]
    best = run != folder and folder.name == "best" and bool(vals)
    end = next((r for r in records if r.get("type") == "end"), None)
    if best:
        step = min(vals, key=lambda r: r["val_loss"])["step"]
    else:
        step = end["step"] if end else max(r.get("step", 0) for r in records)
    losses = {r["step"]: r["loss"] for r in records if r.get("type") == "train"}
    val = next((r["val_loss"] for r in reversed(vals) if r["step"] == step), None)
    early = next((r for r in records if r.get("type") == "early_stop"), None)
    ended_early = None if early is None else (
        f"at step {early['step']:,}: {_count(start.get('config', {}).get('early_stop', '?'), 'validation')} in a row "
        f"without a loss below {early['best_val_loss']:.4f} (step {early['best_step']:,})")
    return Training(config=start.get("config", {}), lr=start.get("lr", 0.0),
                    train_examples=start.get("train_examples", 0),
                    val_examples=start.get("val_examples", 0), steps=step, total_steps=start.get("steps", step),
                    last_loss=losses.get(step),
                    val_loss=val, best=best, plots=[run / name for name in PLOTS if (run / name).is_file()],
                    ended_early=ended_early)


def model_card(model: Transformer, repo: str, base: str, written: str, training: Training | None = None,
               clip_config: str | None = None, origin: str | None = None, branch: str | None = None) -> str:
    """The card of `model`'s adapter pushed to `repo` (on `branch`, None: the main one) in format `written`
    (native, peft), for the base named `base` (as a command line names it); `clip_config`: the CLIP model config
    file pushed beside it, if any; `origin`: the published adapter it was read from (`official:NAME`,
    `hf:owner/name`), if it was."""
    a, base = model.adapter_args, base_name(base)
    base_arg = _base_argument(base)
    lines = ["---", *_front_matter(model, base, written), "---", "", f"# {repo}", "",
             f"A [LLaMA-Adapter]({PAPERS['v1']}) for a frozen {model.base_family} base"
             + (f" ([V2]({PAPERS['v2']}) parts: {', '.join(a.v2_parts)})" if a.v2_parts else "")
             + f", in {FORMATS[written]}.", "",
             "| | |", "|---|---|",
             f"| base | {_base_label(base)}: dim {model.args.dim}, {model.args.n_layers} layers, {model.args.n_heads} "
             f"heads ({model.args.kv_heads} key/value heads), vocabulary {model.args.vocab_size} |"]
    if a.has_prompts:
        lines.append(f"| adaption prompts | {a.prompt_len} tokens on layers {describe(adapter_layers(model))}, "
                     f"{a.gate_activation} gate per head, zero at the start of training |")
    if origin:
        lines.append(f"| read from | `{origin}`, rewritten in this format |")
    lines += [f"| v2 parts | {', '.join(a.v2_parts) or 'none (v1)'} |",
              f"| learned parameters | {sum(t.numel() for t in model.adapter_state_dict().values()):,} |",
              f"| prompt format | {model.prompt_format}"
              + (" (not recorded in PEFT's format: the commands below name it) |" if _format_unrecorded(model, written)
                 else " |")]
    if a.visual != "none":
        lines.append(f"| visual prompt | {a.visual}: reads the {a.clip_dim}-wide tokens of a "
                     f"{Path(a.clip_model).name if clip_config else a.clip_model} CLIP tower |")
    lines += ["", "## Use", "", *_usage(model, repo, base_arg, written, clip_config, branch)]
    if a.has_prompts:
        lines += ["", "## Gates", "", "How much each adapter layer's prompt speaks (the learned gate after its "
                  "activation, over the layer's heads; the gate scale multiplies them all):", "",
                  "| layer | mean | min | max | mean of absolute values |", "|---|---|---|---|---|"]
        for layer, gates in zip(adapter_layers(model), model.effective_gates(1.0)):
            lines.append(f"| {layer} | {gates.mean():+.4f} | {gates.min():+.4f} | {gates.max():+.4f} | "
                         f"{gates.abs().mean():.4f} |")
    if training is not None:
        lines += ["", *_training(training)]
    return "\n".join(lines) + "\n"


PAPERS = {"v1": "https://arxiv.org/abs/2303.16199", "v2": "https://arxiv.org/abs/2304.15010"}
FORMATS = {"native": "this project's format (`adapter.safetensors`, its settings in `adapter.json`)",
           "peft": "PEFT's format (`adapter_config.json`, `adapter_model.safetensors`)"}


def _front_matter(model: Transformer, base: str, written: str) -> list[str]:
    """The hub's metadata: tags to find it by, the base repository when it is one, PEFT as its library."""
    a = model.adapter_args
    tags = ["llama-adapter", *(["adaption-prompt"] if a.has_prompts else []), *(["lora"] if a.lora_rank else []),
            *(["llama-adapter-v2"] if a.v2_parts else []), *(["image-text-to-text"] if a.visual != "none" else [])]
    lines = ["tags:", *(f"- {tag}" for tag in tags)]
    if base.startswith(PREFIX):
        lines.append(f"base_model: {repo_of(base)}")
    if written == "peft":
        lines.append("library_name: peft")
    return lines + [f"pipeline_tag: {'image-text-to-text' if a.visual != 'none' else 'text-generation'}"]


def _base_argument(base: str) -> str:
    """What a reader passes as --base: the base's name where it has one others can fetch, else BASE."""
    return base if _is_named(base) else "BASE"


def _base_label(base: str) -> str:
    if base == BASE_NAME:
        return "`tiny`, the model embedded in this project"
    if _is_named(base):
        return f"`{base}`"
    return f"`{Path(base).name}` (a local folder; any base of this shape: pass it as BASE)"


def _is_named(base: str) -> bool:
    return base == BASE_NAME or base.startswith((PREFIX, OFFICIAL))


def _usage(model: Transformer, repo: str, base: str, written: str, clip_config: str | None,
           branch: str | None) -> list[str]:
    a = model.adapter_args
    named = f"{repo}@{branch}" if branch else repo  # as hf: names a branch
    clip = f" --clip {CLIP_NAME if base == BASE_NAME else 'CLIP'}" if a.visual != "none" else ""
    unrecorded = _format_unrecorded(model, written)
    app_format = f" --prompt-format {model.prompt_format}" if unrecorded else ""
    template = f" --template {model.prompt_format}" if unrecorded else ""
    # an adapter without prompts (a LoRA, biases) has no gates: its delta scale is its slider
    slider, scale = ("gate slider", "--gate-scale") if a.has_prompts else ("delta scale slider", "--delta-scale")
    lines = ["With the `llama-adapter` project's command lines (its `requirements.txt` installed):", "",
             "```bash",
             "# the Gradio app: chat" + (", questions about a picture" if clip else "") + f" and the {slider} "
             "(0 = the frozen base, 1 = this adapter, above 1 exaggerated)",
             f"python app.py --base {base} --adapter hf:{named}{clip}{app_format}",
             f"python -m adapter.generate --base {base} --adapter hf:{named}{clip}{template} "
             + ("--image picture.png --prompt \"What is in the picture?\"" if clip else
                "--prompt \"Tell me about alpacas.\"") + f" {scale} 1",
             f"python -m adapter.inspect hf:{named}  # its format, shape and gates", "```"]
    if "CLIP" in clip:
        tower = (f"a CLIP tower of the config `{clip_config}` (pushed beside it)" if clip_config
                 else f"`{a.clip_model}` CLIP weights (`--clip openai`: OpenAI's, fetched by open_clip)")
        lines += ["", f"CLIP: {tower}."]
    if base == "BASE":
        lines += ["", "BASE: a folder (or `hf:owner/name`) holding a base of the shape above."]
    if written == "peft":
        hub_base = repr(repo_of(base)) if base.startswith(PREFIX) else "BASE"
        lines += ["", "With transformers and PEFT:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({hub_base}), {repo!r}"
                  + (f", revision={branch!r})" if branch else ")"), "```"]
    return lines


def _format_unrecorded(model: Transformer, written: str) -> bool:
    """Whether the format written loses the prompt format the adapter is asked in (all but ours record Alpaca)."""
    return written != "native" and model.prompt_format != "alpaca"


def _training(run: Training) -> list[str]:
    c = run.config
    lines = ["## Training", "",
             ("The adapter of the lowest validation loss" if run.best else "The adapter after the last step")
             + " of a run of `python -m adapter.finetune`:", "", "| | |", "|---|---|",
             f"| data | `{_name(c.get('data', '?'))}`: {run.train_examples:,} training examples, "
             f"{run.val_examples:,} held out for validation |",
             f"| mode | {c.get('mode', '?')} |",
             f"| prompt format | {c.get('prompt_format', 'alpaca')} |",
             f"| step | {run.steps:,} of {run.total_steps:,} ({_count(c.get('epochs', '?'), 'epoch')}), "
             f"{c.get('batch_size', '?')} examples a step |",
             f"| peak learning rate | {run.lr:.3g} |",
             f"| frozen base | {c.get('quantize') or 'unquantized'}"
             + (f", {c['dtype']}" if c.get("dtype") else "") + " |"]
    if run.last_loss is not None:
        lines.append(f"| training loss at that step | {run.last_loss:.4f} |")
    if run.val_loss is not None:
        lines.append(f"| validation loss at that step | {run.val_loss:.4f} |")
    if run.ended_early:
        lines.append(f"| ended early (`--early-stop`) | {run.ended_early} |")
    lines += ["", *(f"![{plot.stem}]({plot.name})" for plot in run.plots)]
    return lines


def _name(value: str) -> str:
    """A local path by its file name only (the rest is the trainer's machine); hub names as they are."""
    return value if str(value).startswith((PREFIX, OFFICIAL)) else os.path.basename(str(value))


def _count(number: Any, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
