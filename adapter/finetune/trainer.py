"""`train(config)`: everything is read and checked first (data, base, resume state), so that a bad record or
flag stops the run before any file is written; then the loop of optimizer steps, checkpoints and logs.

The position in the data is the optimizer step alone: every epoch has the same number of steps and its
order is recomputed from (seed, epoch), so a resumed run replays exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import hub
from ..config import AdapterArgs
from ..cpu_features import bf16_emulation_warning
from ..formats import read_adapter
from ..formats.common import LoadedAdapter, check_writable, unrecorded_format_note
from ..formats.native import save_adapter
from ..layout import row_major
from ..loading import load, load_sharing, open_named_base, resolve_device
from ..model import Transformer
from ..prompts import format_named
from ..quantize import serving_state
from ..tiny.assets import resolve as resolve_tiny
from ..tokenizer import open_tokenizer
from ..visual import ImageEncoder, attach_image_encoder, load_image_encoder
from . import checkpoint, distributed
from .batching import collate, epoch_batches, eval_batches, shard
from .config import DEFAULT_MAX_SEQ_LEN, TrainConfig, adapter_args_for, adapter_kind
from .dataset import Dataset, build_dataset
from .encode import Encoded
from .export import check_export, export_official_v1, export_peft
from .logs import LOG, RunLog, notice, read_log, trim_log
from .optimizer import build_optimizer
from .plots import plot_gates, plot_loss
from .records import DataError, read_records
from .schedule import learning_rate
from .step import TrainingStopped, evaluate, optimizer_step, require_image_encoder


@dataclass
class TrainResult:
    out: Path
    adapter: Path  # the final adapter, native format (OUT/adapter/adapter.safetensors)
    steps: int  # optimizer steps done in all (including before a resume)
    train_losses: list[float] = field(default_factory=list)  # of the steps this call ran
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) computed by this call
    exports: dict[str, Path] = field(default_factory=dict)
    best: Path | None = None  # --keep-best: the adapter of the lowest validation loss (OUT/best/adapter.safetensors)
    best_val: tuple[int, float] | None = None  # its (step, validation loss), over the whole run
    stopped: bool = False  # ended by `RunHooks.stop` before its last step (--resume goes on from there)
    early_stopped: bool = False  # ended by --early-stop before its last step


BEST = "best"  # OUT/best: the adapter at the lowest validation loss so far (--keep-best)


@dataclass
class RunHooks:
    """What a program that trains inside itself (the app's Train tab, adapter.live_training) adds to a run.

    With `base`, the adapter trains on that loaded model's frozen base, shared and left as it is (not loaded
    again, not re-laid out: the model keeps serving while it trains; a 4-bit base on a CPU with AVX512-BF16 serves
    through bitsandbytes' training layout meanwhile, and is put back exactly when the run ends); its device, dtype
    and quantization are the run's, so `config`'s base names it only in the log, and its quantize, device and dtype
    are not used. With `image_encoder` (a loaded CLIP tower, shared and left in its mode), a visual prompt reads
    that tower, so `config`'s clip names it only in the log."""

    base: Transformer | None = None
    image_encoder: ImageEncoder | None = None
    on_record: Callable[[dict[str, Any]], None] | None = None  # every log record, as it is written
    stop: threading.Event | None = None  # once set, the run ends after the step under way, its adapter saved
    # (under torchrun, once set in any process: all of them end after the same step)
    step_runner: Callable[[Callable[[], Any]], Any] | None = None  # runs each step and validation (a device's
    # work: holding its lock, on its compute thread if any; adapter.device_work)
    max_steps: int | None = None  # a run that would take more optimizer steps is refused before it starts
    validations: int | None = None  # validate before the first step and then at most this many times, every
    # ceil(steps / N) optimizer steps (config.val_every, when set, wins), instead of once per epoch


def train(config: TrainConfig, hooks: RunHooks | None = None) -> TrainResult:
    """Fine-tune an adapter as `config` says; under torchrun, every process calls this."""
    hooks = hooks or RunHooks()
    device = resolve_device(config.device) if hooks.base is None else hooks.base.tok_embeddings.weight.device
    processes = distributed.start(device)
    try:
        if hooks.base is not None and processes.world > 1:
            raise ValueError("hooks.base: a run on a base already in memory is one process, not one per device")
        # the served model and tower as they were once the run ends: their modes, 4-bit layers' layout
        restore = [serving_state(shared) for shared in (hooks.base, hooks.image_encoder) if shared is not None]
        try:
            return _Run(config, processes, distributed.local_device(device, processes), hooks).run()
        finally:
            for put_back in restore:  # as the device's work: not while a chat reads the shared layers
                (hooks.step_runner or _now)(put_back)
    finally:
        distributed.stop(processes)


def _now(work: Callable[[], Any]) -> Any:
    """A run's device work where no program shares the device (RunHooks.step_runner unset): done at once."""
    return work()


def base_args(base: str):
    """The base's shape without loading its weights (to fit the adapter to its number of layers)."""
    found = open_named_base(base)
    return found.model_args(open_tokenizer(found.tokenizer_path).n_words)


def _portable_clip_model(clip_model: str | None) -> str:
    """The open_clip model the adapter records: a config file by its absolute path, since the adapter reads a
    relative one relative to its own folder (adapter.formats.native), not to where the run was started."""
    if clip_model is None:
        return AdapterArgs.clip_model
    path = Path(clip_model)
    return str(path.resolve()) if clip_model.endswith(".json") and path.is_file() else clip_model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Run:
    def __init__(self, config: TrainConfig, processes: distributed.Processes, device: torch.device,
                 hooks: RunHooks) -> None:
        self.config, self.processes, self.device, self.hooks = config, processes, device, hooks
        self.run_step = hooks.step_runner or _now
        self.out = config.out_path
        self.main = processes.is_main
        self._encoder = None  # the CLIP tower of --mode vision, loaded when first needed
        # the embedded model's names (--init-adapter tiny-image, --clip tiny) as its files, as everywhere else
        _, self.init_adapter, self.clip, self.clip_model = resolve_tiny(None, config.init_adapter, config.clip,
                                                                        config.clip_model)
        self.resume_from = self._check_out()
        self.prompt_format = format_named(config.prompt_format, "--prompt-format")
        data = hub.resolve_data(config.data, "--data")  # a hub dataset's file is fetched once, read and hashed
        records = read_records(data, config.image_folder, self.prompt_format)
        val_data = None if config.val_data is None else hub.resolve_data(config.val_data, "--val-data")
        self.val_records = None if val_data is None else \
            read_records(val_data, config.image_folder, self.prompt_format, "--val-data")
        self.data_sha256 = _sha256(data)
        self.val_data_sha256 = None if val_data is None else _sha256(val_data)
        if config.max_seq_len is None:  # the default: as long as the base holds, up to DEFAULT_MAX_SEQ_LEN
            context = (base_args(config.base) if hooks.base is None else hooks.base.args).max_seq_len
            config = self.config = dataclasses.replace(config, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, context))
        saved = self._check_resume() if self.resume_from else None
        self.model = self._load_model()
        check_export(config.export, self.model.adapter_args)
        self.data = self._build_data(records)
        self.steps_per_epoch = len(self._order(0))  # the same for every epoch
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.val_every:
            self.val_every = config.val_every
        elif hooks.validations:
            self.val_every = math.ceil(self.total_steps / hooks.validations)
        else:
            self.val_every = self.steps_per_epoch
        self._check_length()
        self.optimizer = build_optimizer(self.model, config.learning_rate, config.weight_decay, config.visual_lr)
        self.step, self.saved_step = 0, None
        self.val_history: list[tuple[int, float]] = []  # (step, validation loss) of every validation, for --early-stop
        if saved is not None:
            checkpoint.restore(self.resume_from, self.optimizer, saved)
            self.step = self.saved_step = saved.step
            self.val_history = [(step, loss) for step, loss in saved.val_losses or []]
            self._check_order(saved)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.model.fp32_attention = device.type == "cpu"  # the bf16 CPU attention backward is slow (model.py)
        if device.type == "cpu" and config.autocast == "bf16":
            emulated = bf16_emulation_warning("--autocast bf16")
            if emulated:
                notice(emulated + "; --autocast auto trains in float32 here", self.main)
        self.run_step(self.model.train)  # re-lays out a shared base's 4-bit layers: not while a chat reads them
        self.wrapped = distributed.wrap(self.model, processes)

    # ----- checks, before anything is written --------------------------------------------------------
    def _check_out(self) -> Path | None:
        """The checkpoint --resume goes on from. A run that ended before its first checkpoint (a stop, a failure)
        left only its log: with or without --resume it starts over, as nothing of it can be taken on."""
        check_writable(self.out, "--out: ")
        found, started = checkpoint.latest(self.out), (self.out / LOG).exists()
        if self.config.resume and found is None and not started:
            raise ValueError(f"--resume: {self.out} holds no checkpoint to resume from")
        if not self.config.resume and found is not None:
            raise ValueError(f"--out: {self.out} already holds a training run; pass --resume to continue it or "
                             "choose another folder")
        if found is None and started:
            notice(f"{self.out} holds a run that ended before its first checkpoint: starting it over", self.main)
        return found

    def _check_resume(self) -> checkpoint.TrainerState:
        saved = checkpoint.read_state(self.resume_from)
        changed = self.config.changed_since(saved.config)
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ(s) from the run in {self.resume_from}; "
                             "resume with the same settings or start a new run")
        if saved.data_sha256 != self.data_sha256:
            raise ValueError(f"--data: {self.config.data} has changed since the checkpoint {self.resume_from}")
        if saved.val_data_sha256 not in (None, self.val_data_sha256):  # its losses would not compare with the log's
            raise ValueError(f"--val-data: {self.config.val_data} has changed since the checkpoint "
                             f"{self.resume_from}")
        return saved

    def _check_length(self) -> None:
        limit, steps = self.hooks.max_steps, min(self.total_steps, self.config.max_steps or self.total_steps)
        if limit is not None and steps > limit:
            raise ValueError(f"epochs: {self.config.epochs} epoch(s) of {self.steps_per_epoch} steps are {steps} "
                             f"optimizer steps, more than the {limit} a run may take here; train fewer epochs or "
                             "records, or with a larger batch")

    def _load_model(self) -> Transformer:
        config, shared = self.config, self.hooks.base
        if self.resume_from is not None:
            adapter = self.resume_from / checkpoint.ADAPTER
        elif self.init_adapter is not None:
            adapter = self._init_adapter()
        else:
            n_layers = (base_args(config.base) if shared is None else shared.args).n_layers
            layers = min(config.prompt_layers, n_layers)
            if layers < config.prompt_layers and config.mode != "lora":  # a LoRA alone has no prompts
                notice(f"--prompt-layers {config.prompt_layers} is more than the base's {n_layers} layers; "
                       f"using {layers}", self.main)
            adapter = adapter_args_for(config.mode, config.prompt_len, layers, config.lora_rank, config.scale,
                                       config.lora_targets, config.bias_targets, **self._visual())
        torch.manual_seed(config.seed)  # the same fresh prompts in every process
        random.seed(config.seed)
        if shared is None:
            model = load(config.base, adapter=adapter, quantize=config.quantize, device=self.device,
                         dtype=config.dtype)
            row_major(model)  # what the CPU backward reads faster (adapter.layout)
        else:
            model = load_sharing(shared, adapter)
        model.prompt_format = config.prompt_format  # saved with the adapter
        if model.visual_prompt is not None:
            if self.clip is None:
                raise ValueError("--clip: this adapter has a visual prompt; give the CLIP tower it reads")
            attach_image_encoder(model, self._image_encoder())
        if config.max_seq_len > model.args.max_seq_len:
            raise ValueError(f"--max-seq-len: {config.max_seq_len} is more than the base's max_seq_len="
                             f"{model.args.max_seq_len}")
        return model

    def _init_adapter(self) -> LoadedAdapter:
        """--init-adapter's adapter, read once and checked against --mode and --prompt-format before the base
        is loaded."""
        path = hub.resolve(self.init_adapter, "--init-adapter")
        found = read_adapter(path, "--init-adapter")
        a = found.args
        kind = adapter_kind(a)
        if kind != self.config.mode:
            parts = ", ".join(a.v2_parts + ([f"{a.visual} visual prompt"] if a.visual != "none" else [])) or "prompts"
            raise ValueError(f"--init-adapter: {path} is a {kind} adapter ({parts}); train it with --mode {kind}")
        if found.prompt_format != self.config.prompt_format:
            raise ValueError(f"--prompt-format: {path} was trained in the {found.prompt_format} prompt format; "
                             f"continue it with --prompt-format {found.prompt_format}")
        return found

    def _image_encoder(self):
        """The frozen CLIP tower of --mode vision, loaded once (its width sets the visual prompt's input), or the
        one the hooks share."""
        if self.hooks.image_encoder is not None:
            return self.hooks.image_encoder
        if self._encoder is None:
            self._encoder = load_image_encoder(self.clip, self.clip_model or AdapterArgs.clip_model)
        return self._encoder

    def _visual(self) -> dict:
        config = self.config
        if config.mode != "vision":
            return {}
        return {"visual": config.visual, "clip_dim": self._image_encoder().output_dim,
                "clip_model": _portable_clip_model(self.clip_model), "visual_dim": config.visual_dim,
                "visual_depth": config.visual_depth, "visual_heads": config.visual_heads}

    def _build_data(self, records) -> Dataset:
        config = self.config
        data = build_dataset(records, self.model.tokenizer, config.max_seq_len, config.val_fraction, config.seed,
                             self.prompt_format.answer_end_id(self.model.tokenizer), self.val_records)
        for examples, flag in ((data.train, "--data"), (data.val, "--val-data" if self.val_records else "--data")):
            if examples and not any(example.targets for example in examples):
                part = "training" if examples is data.train else "validation"
                raise DataError(f"{flag}: none of the {len(examples)} {part} examples keeps a response token within "
                                f"--max-seq-len {config.max_seq_len} (each is cut before its answer), so its loss "
                                "would read 0; raise --max-seq-len or shorten the prompts")
        if data.has_images:
            require_image_encoder(self.model)
        if config.keep_best and not data.val:
            raise ValueError(f"--keep-best: {len(records)} record(s) leave no validation example when one must train "
                             "(give --val-data)")
        source = f"{len(records)} records" if self.val_records is None else \
            f"{len(records)} records + {len(self.val_records)} in --val-data"
        documents = sum(example.plain for record in [*records, *(self.val_records or [])] for example in record)
        notice(f"data: {source} -> {len(data.train)} training and {len(data.val)} validation "
               f"examples; {data.truncated} longer than --max-seq-len {config.max_seq_len} were cut"
               + (f" ({data.emptied} of them before their response: they teach nothing)" if data.emptied else "")
               + (f"; {documents} plain-text document(s), in windows of {config.max_seq_len} tokens (none cut)"
                  if documents else ""),
               self.main)
        return data

    def _check_order(self, saved: checkpoint.TrainerState) -> None:
        if self.step < self.total_steps and self._order(saved.epoch) != saved.order:
            raise ValueError(f"--resume: the batch order of epoch {saved.epoch} differs from the checkpoint's "
                             f"({self.resume_from}); the data or the batch settings have changed")

    # ----- the loop ----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[list[list[int]]]:
        c = self.config
        return epoch_batches([len(e.tokens) for e in self.data.train], c.batch_size, c.micro_batch_size, c.seed, epoch)

    def run(self) -> TrainResult:
        config, main = self.config, self.main
        end = min(self.total_steps, config.max_steps or self.total_steps)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.saved_step is not None:
                trim_log(self.out / LOG, self.saved_step)
            else:  # started over: nothing of an earlier try without a checkpoint is kept
                (self.out / LOG).unlink(missing_ok=True)
        # the lowest validation loss before a resume, from the log (what OUT/best holds, or a later step's that
        # the steps redone now will write again); none where OUT/best was never written (--keep-best added on
        # resuming: the run's best so far has no adapter to show)
        kept = self.out / BEST / checkpoint.ADAPTER
        earlier = [(r["step"], r["val_loss"]) for r in read_log(self.out / LOG) if r.get("type") == "val"] \
            if main and config.keep_best and self.saved_step is not None and kept.is_file() else []
        self.best = min(earlier, key=lambda pair: pair[1]) if earlier else None
        notice(f"training {self.model.count_parameters(trainable_only=True):,} parameters ({config.mode}) for "
               f"{self.total_steps} steps ({self.steps_per_epoch} per epoch), peak lr {config.learning_rate:.3g}, "
               f"{self.processes.world} process(es)" + (f", resuming at step {self.step}" if self.step else ""), main)
        log = RunLog(self.out / LOG if main else None, self.total_steps, self.step, config.progress,
                     self.hooks.on_record)
        if self.saved_step is None:
            log.write({"type": "start", "step": 0, "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                       "first_prompt_layer": self.model.first_prompt_layer, "world_size": self.processes.world,
                       "lr": config.learning_rate, "train_examples": len(self.data.train),
                       "val_examples": len(self.data.val), "truncated": self.data.truncated,
                       "config": config.to_dict()})
        result = TrainResult(self.out, self.out / "adapter" / checkpoint.ADAPTER, self.step)
        if self.hooks.validations and self.saved_step is None and self.data.val:
            self._validate(log, result)  # where the curve starts (a new adapter's: the frozen base's)
        try:
            order, order_epoch = None, None
            while self.step < end and not self._stop_asked():
                best = self._patience_spent()
                if best is not None:
                    log.write({"type": "early_stop", "step": self.step, "best_step": best[0], "best_val_loss": best[1]})
                    notice(f"early stop at step {self.step}: {config.early_stop} validation(s) in a row without a "
                           f"loss below {best[1]:.4f} (step {best[0]})", main)
                    break
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                if order_epoch != epoch:
                    order, order_epoch = self._order(epoch), epoch
                record = self.run_step(lambda: self._train_step(order[in_epoch]))
                result.train_losses.append(record["loss"])
                log.step(record)
                # on schedule and at the run's last step only: a run stopped early (a signal, --max-steps) adds
                # none of its own, so its checkpoint, best/ and early stop go on as an uninterrupted run's
                if self.data.val and (self.step % self.val_every == 0 or self.step == self.total_steps):
                    self._validate(log, result)
                if self.step % (config.save_every or self.steps_per_epoch) == 0:
                    self._save()
            if self.saved_step != self.step:
                self._save()
        except TrainingStopped as error:
            log.write({"type": "stopped", "step": self.step + 1, "reason": str(error)})
            log.close()
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.out / checkpoint.FOLDER}"
                    if self.saved_step is not None else "no checkpoint had been written yet")
            raise TrainingStopped(f"{error}; {kept}") from error
        result.steps, result.early_stopped = self.step, self.step < end and self._patience_spent() is not None
        result.stopped = self.step < end and not result.early_stopped
        self._finish(result, log)
        return result

    def _train_step(self, step_batches: list[list[int]]) -> dict:
        config, train = self.config, self.data.train
        started = time.perf_counter()
        mine = [collate([train[i] for i in ids], self.device) for ids in shard(step_batches, self.processes.rank,
                                                                              self.processes.world)]
        examples = [train[i] for ids in step_batches for i in ids]
        lr = learning_rate(self.step, self.steps_per_epoch, config.learning_rate, config.min_lr,
                           config.warmup_epochs, config.epochs)
        outcome = optimizer_step(self.wrapped, self.optimizer, mine, sum(e.targets for e in examples), self.processes,
                                 lr=lr, clip_grad=config.clip_grad, step=self.step + 1,
                                 precision=config.autocast)
        self.step += 1
        tokens = sum(len(e.tokens) for e in examples)
        return {"type": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": outcome.loss,
                "lr": lr, "grad_norm": outcome.grad_norm, "tokens": tokens,
                "tokens_per_s": tokens / (time.perf_counter() - started),
                "gates": [[float(f"{g:.6g}") for g in layer] for layer in self.model.effective_gates().tolist()]}

    def _validate(self, log: RunLog, result: TrainResult) -> None:
        val: list[Encoded] = self.data.val
        ids = eval_batches([len(e.tokens) for e in val], self.config.micro_batch_size, self.processes.rank,
                           self.processes.world)
        loss = self.run_step(lambda: evaluate(self.wrapped, [collate([val[i] for i in b], self.device) for b in ids],
                                              sum(e.targets for e in val), self.processes, self.config.autocast))
        log.write({"type": "val", "step": self.step, "epoch": self.step / self.steps_per_epoch, "val_loss": loss})
        result.val_losses.append((self.step, loss))
        self.val_history.append((self.step, loss))
        if self.config.keep_best and self.main and (self.best is None or loss < self.best[1]):
            self.best = (self.step, loss)
            save_adapter(self.model, self.out / BEST, {"step": str(self.step), "val_loss": repr(loss)})

    def _stop_asked(self) -> bool:
        """Whether `RunHooks.stop` is set in any process (under torchrun a signal may reach some before others, or
        only some): one flag summed over the processes before each step, so that they all stop after the same one."""
        asked = self.hooks.stop is not None and self.hooks.stop.is_set()
        if self.processes.world == 1:
            return asked
        return self.processes.sum(torch.tensor([float(asked)], device=self.device)).item() > 0

    def _patience_spent(self) -> tuple[int, float] | None:
        """The (step, loss) of the lowest validation loss (the first of equals) where --early-stop's patience is
        spent, that many validations having come since it; None where it is not (or there is no --early-stop)."""
        patience, history = self.config.early_stop, self.val_history
        if not patience or not history:
            return None
        best = min(range(len(history)), key=lambda i: (history[i][1], i))
        return history[best] if len(history) - 1 - best >= patience else None

    def _save(self) -> None:
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        order = self._order(epoch) if self.step < self.total_steps else []
        state = checkpoint.TrainerState(self.step, epoch, in_epoch, order, self.config.to_dict(), self.data_sha256,
                                        val_losses=[list(pair) for pair in self.val_history],
                                        val_data_sha256=self.val_data_sha256)
        checkpoint.check_finite(self.model, self.step)  # in every process, so that they all stop together
        if self.main:
            checkpoint.save(self.out, self.model, self.optimizer, state)
        self.processes.barrier()
        self.saved_step = self.step

    def _finish(self, result: TrainResult, log: RunLog) -> None:
        """The final adapter, exports, plots: main process only; the others wait for it."""
        log.close()
        if self.main:
            save_adapter(self.model, self.out / "adapter")
            if self.config.export == "peft":
                result.exports["peft"] = export_peft(self.model, self.out, self.config.base)
            if self.config.export == "official-v1":
                result.exports["official-v1"] = export_official_v1(self.model, self.out)
                note = unrecorded_format_note(self.model, "official-v1")
                if note:
                    notice(note)
            if self.best is not None:
                result.best, result.best_val = self.out / BEST / checkpoint.ADAPTER, self.best
                notice(f"lowest validation loss {self.best[1]:.4f} at step {self.best[0]}: {result.best}")
            log.write({"type": "end", "step": self.step, "adapter": str(result.adapter),
                       "exports": {k: str(v) for k, v in result.exports.items()}})
            records = read_log(self.out / LOG)
            plot_loss(records, self.out / "loss.png")
            if self.model.adapter_args.has_prompts:  # a LoRA alone has no gates to draw
                plot_gates(records, self.out / "gates.png", self.model.first_prompt_layer)
            notice(f"adapter written to {result.adapter}; log, loss.png"
                   f"{' and gates.png' if self.model.adapter_args.has_prompts else ''} in {self.out}")
        self.processes.barrier()
