"""What a fine-tuning run is asked to do, validated before anything is read or written.

The defaults reproduce the official LLaMA-Adapter v1 Alpaca recipe: 10 prompt tokens on the top 30 layers,
5 epochs of which 2 warm-up, AdamW with base lr 9e-3 scaled by batch/256, weight decay 0.02, batch 64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LORA_TARGETS, VISUAL_PROMPT_KINDS, AdapterArgs, is_positive_whole, is_whole
from ..prompts import PROMPT_FORMATS
from ..quantize import check_mode
from ..sampling import seed_problem

MODES = ("v1", "v2", "vision", "lora")
AUTOCASTS = ("auto", "bf16", "off")  # auto: bf16 on GPU, the model's own dtype on CPU
EXPORTS = ("peft", "official-v1")
# settings that may change between an interrupted run and its --resume without changing what it computes
# (the data file may move: its content is checked by hash)
DEFAULT_WARMUP_EPOCHS = 2.0  # of linear warm-up, where --warmup-epochs is not given (--epochs 1: that one)
DEFAULT_MAX_SEQ_LEN = 512  # tokens an example is cut to where --max-seq-len is not given (and the base holds them)
RESUMABLE_CHANGES = ("data", "out", "resume", "max_steps", "save_every", "val_every", "export", "progress",
                     "device", "gradient_checkpointing", "keep_best", "early_stop")


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{flag}: {message}")


def _number(value: Any) -> bool:
    """A finite int or float, not a bool (True is 1 to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run; field `batch_size` is the command line's `--batch-size`, and so on."""

    base: str
    data: str
    out: str
    image_folder: str | None = None
    mode: str = "v1"
    clip: str | None = None  # --mode vision: the CLIP tower (local weights or an open_clip tag)
    clip_model: str | None = None  # open_clip name or config .json (default: AdapterArgs' ViT-L-14-quickgelu)
    visual: str = "v2"  # which visual prompt --mode vision trains
    visual_dim: int = 768
    visual_depth: int = 8
    visual_heads: int = 16
    prompt_len: int = 10
    prompt_layers: int = 30
    lora_rank: int = 0
    lora_targets: str | None = None  # v2: the linears that get LoRA, e.g. "wq,wv" (None: all seven)
    bias_targets: str | None = None  # v2: the linears that get a bias (None: wq, wo, w1, w2, w3, as the releases)
    scale: bool = False  # v2: also learn a ones-init scale of each linear's input (the V2 paper's bias tuning)
    init_adapter: str | None = None  # start from this adapter (any format), its shape and all, not a fresh one
    prompt_format: str = "alpaca"  # how the examples are written (adapter.prompts); saved with the adapter
    epochs: int = 5
    warmup_epochs: float | None = None  # None: DEFAULT_WARMUP_EPOCHS, or every epoch where there are fewer
    blr: float = 9e-3
    lr: float | None = None
    visual_lr: float | None = None  # --mode vision: the visual prompt's peak lr (default: the same as the rest)
    min_lr: float = 0.0
    weight_decay: float = 0.02
    batch_size: int = 64
    micro_batch_size: int = 4
    max_seq_len: int | None = None  # None: DEFAULT_MAX_SEQ_LEN, or the base's context where shorter (the trainer's)
    val_fraction: float = 0.05
    val_data: str | None = None  # a validation file of its own: then all of `data` trains and nothing is split off
    seed: int = 0
    clip_grad: float = 1.0
    quantize: str | None = None
    device: str | None = None
    dtype: str | None = None
    autocast: str = "auto"
    gradient_checkpointing: bool = False
    save_every: int | None = None  # optimizer steps; None = once per epoch (and always at the end)
    val_every: int | None = None  # optimizer steps between validations; None = once per epoch (and at the end)
    resume: bool = False
    export: str | None = None
    keep_best: bool = False  # also keep the adapter of the lowest validation loss in OUT/best
    early_stop: int | None = None  # end the run after this many validations in a row without a lower loss
    max_steps: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "--mode", f"must be one of {MODES}, got {self.mode!r}")
        seeded = seed_problem(self.seed) if self.seed is not None else "must be a whole number, got None"
        _require(seeded is None, "--seed", str(seeded))
        self._check_types()
        for flag in ("prompt_len", "prompt_layers", "epochs", "batch_size", "micro_batch_size", "max_seq_len"):
            value = getattr(self, flag)
            _require(is_positive_whole(value) or (flag == "max_seq_len" and value is None), _flag(flag),
                     f"must be a positive integer, got {value!r}")
        _require(is_whole(self.lora_rank) and self.lora_rank >= 0, "--lora-rank",
                 f"must be a non-negative integer, got {self.lora_rank!r}")
        _require(self.lora_rank == 0 or self.mode != "v1", "--lora-rank", "LoRA is a v2 part; use --mode v2")
        _require(not self.scale or self.mode not in ("v1", "lora"), "--scale",
                 "the input scales are a v2 part; use --mode v2")
        _require(self.mode != "lora" or self.lora_rank > 0 or self.init_adapter, "--lora-rank",
                 "--mode lora trains LoRA alone: give its rank (e.g. --lora-rank 8)")
        _require(self.mode != "lora" or self.bias_targets is None, "--bias-targets",
                 "--mode lora trains LoRA alone, no biases; use --mode v2")
        for flag in ("lora_rank", "scale", "lora_targets", "bias_targets"):
            _require(not (self.init_adapter and getattr(self, flag)), _flag(flag),
                     "the adapter's shape comes from --init-adapter")
        for flag in ("lora_targets", "bias_targets"):
            if getattr(self, flag) is not None:
                _require(self.mode != "v1", _flag(flag), "biases and LoRA are v2 parts; use --mode v2")
                linear_names(getattr(self, flag), _flag(flag))
        _require(self.lora_targets is None or self.lora_rank > 0, "--lora-targets", "needs --lora-rank above 0")
        _require(self.mode != "vision" or self.clip is not None, "--clip",
                 "--mode vision needs the CLIP tower the visual prompt reads (a weights file or an open_clip tag)")
        _require(self.prompt_format in PROMPT_FORMATS, "--prompt-format",
                 f"must be one of {tuple(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        _require(self.autocast in AUTOCASTS, "--autocast", f"must be one of {AUTOCASTS}, got {self.autocast!r}")
        _require(self.visual in VISUAL_PROMPT_KINDS, "--visual",
                 f"must be {', '.join(VISUAL_PROMPT_KINDS[:-1])} or {VISUAL_PROMPT_KINDS[-1]}, got {self.visual!r}")
        _require(self.max_seq_len is None or self.max_seq_len >= 2, "--max-seq-len",
                 "must be at least 2 (one token and its successor)")
        _require(self.batch_size % self.micro_batch_size == 0, "--batch-size",
                 f"{self.batch_size} is not a multiple of --micro-batch-size {self.micro_batch_size}")
        if self.warmup_epochs is None:  # the default fits any --epochs (2 of --epochs 1 was refused)
            object.__setattr__(self, "warmup_epochs", min(DEFAULT_WARMUP_EPOCHS, float(self.epochs)))
        _require(0 <= self.warmup_epochs <= self.epochs, "--warmup-epochs",
                 f"must be between 0 and --epochs {self.epochs}, got {self.warmup_epochs}")
        for flag in ("blr", "min_lr", "weight_decay", "clip_grad"):
            _require(getattr(self, flag) >= 0, _flag(flag), f"must not be negative, got {getattr(self, flag)}")
        _require(self.lr is None or self.lr > 0, "--lr", f"must be positive, got {self.lr}")
        _require(self.visual_lr is None or self.visual_lr > 0, "--visual-lr",
                 f"must be positive, got {self.visual_lr}")
        _require(self.visual_lr is None or self.mode == "vision", "--visual-lr",
                 "only --mode vision trains a visual prompt")
        _require(self.lr is not None or self.blr > 0, "--blr", "must be positive (or give --lr)")
        _require(0 <= self.val_fraction < 1, "--val-fraction", f"must be in [0, 1), got {self.val_fraction}")
        _require(self.save_every is None or is_positive_whole(self.save_every), "--save-every",
                 f"must be a positive integer, got {self.save_every!r}")
        _require(self.val_every is None or is_positive_whole(self.val_every), "--val-every",
                 f"must be a positive integer, got {self.val_every!r}")
        _require(self.max_steps is None or is_positive_whole(self.max_steps), "--max-steps",
                 f"must be a positive integer, got {self.max_steps!r}")
        _require(self.early_stop is None or is_positive_whole(self.early_stop), "--early-stop",
                 f"must be a positive integer, got {self.early_stop!r}")
        for flag in ("keep_best", "early_stop"):
            _require(not getattr(self, flag) or self.val_data is not None or self.val_fraction > 0, _flag(flag),
                     "needs a validation set (--val-fraction above 0, or --val-data)")
        _require(not Path(self.out).exists() or Path(self.out).is_dir(), "--out",
                 f"{self.out} is a file; name a folder for the run")
        _require(self.export is None or self.export in EXPORTS, "--export",
                 f"must be one of {EXPORTS}, got {self.export!r}")
        try:
            check_mode(self.quantize)
        except ValueError as error:
            raise ValueError(f"--{error}") from error

    def _check_types(self) -> None:
        """The kinds of value the checks after compare and split (from Python, `weight_decay=None` was "'>=' not
        supported between instances of 'NoneType' and 'int'")."""
        for flag in ("warmup_epochs", "blr", "lr", "visual_lr", "min_lr", "weight_decay", "val_fraction", "clip_grad"):
            value = getattr(self, flag)
            _require(_number(value) or (value is None and flag in ("warmup_epochs", "lr", "visual_lr")), _flag(flag),
                     f"must be a number, got {value!r}")
        for flag in ("lora_targets", "bias_targets", "prompt_format", "mode", "visual", "autocast"):
            value = getattr(self, flag)
            _require(isinstance(value, str) or (value is None and flag.endswith("targets")), _flag(flag),
                     f"must be text, got {value!r}")
        for flag in ("scale", "gradient_checkpointing", "resume", "keep_best", "progress"):
            _require(isinstance(getattr(self, flag), bool), _flag(flag),
                     f"must be true or false, got {getattr(self, flag)!r}")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: --lr, else the official rule blr * batch / 256."""
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed_since(self, saved: dict[str, Any]) -> list[str]:
        """The flags that differ from a checkpoint's config and would change what the run computes (a setting
        added since the checkpoint was written counts as its default there)."""
        mine = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [_flag(key) for key in mine
                if key not in RESUMABLE_CHANGES and saved.get(key, defaults[key]) != mine[key]]


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def linear_names(value: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of the seven linears' names ("wq,wv"), checked."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in LORA_TARGETS]
    _require(bool(names) and not unknown, flag, f"expected linears from {', '.join(LORA_TARGETS)} separated by "
                                                f"commas, got {value!r}")
    return names


def adapter_kind(adapter: AdapterArgs) -> str:
    """The --mode that trains an adapter of this shape."""
    if adapter.visual != "none":
        return "vision"
    if not adapter.has_prompts and adapter.v2_parts == [f"LoRA rank {adapter.lora_rank}"]:
        return "lora"
    return "v2" if adapter.has_deltas else "v1"


def adapter_args_for(mode: str, prompt_len: int, prompt_layers: int, lora_rank: int = 0, scale: bool = False,
                     lora_targets: str | None = None, bias_targets: str | None = None,
                     **visual: Any) -> AdapterArgs:
    """What each --mode trains: v1 prompts + tanh gates; v2 adds zero-init biases (on `bias_targets`), norms,
    optional LoRA (on `lora_targets`) and optional input scales; vision adds the visual prompt (`visual` gives
    its AdapterArgs fields: kind, CLIP width and model, ...); lora trains LoRA alone (no prompts: the baseline the
    adapters are compared with, written as PEFT LoRA by --export peft)."""
    if mode == "v1":
        return AdapterArgs(prompt_len=prompt_len, prompt_layers=prompt_layers, gate_activation="tanh")
    if mode == "lora":
        targets = {} if lora_targets is None else {"lora_targets": linear_names(lora_targets, "--lora-targets")}
        return AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=lora_rank, **targets)
    if mode in ("v2", "vision"):
        targets = {name: linear_names(value, _flag(name)) for name, value in
                   (("lora_targets", lora_targets), ("bias_targets", bias_targets)) if value is not None}
        return AdapterArgs(prompt_len=prompt_len, prompt_layers=prompt_layers, gate_activation="tanh", bias=True,
                           norm=True, lora_rank=lora_rank, scale=scale, **targets,
                           **(visual if mode == "vision" else {}))
    raise ValueError(f"--mode: must be one of {MODES}, got {mode!r}")
