"""Fine-tuning inside the serving process (the app's Train tab): an adapter trained on the served base while the
app keeps answering, then served beside the others as `trained-N`, so the gate slider moves between the base and
what it has just learnt.

The run is `adapter.finetune`'s own (the same record layouts, checks, schedule, log and files) through its
`RunHooks`: the base already in memory is shared, not loaded again, and left as it is (so is the served CLIP tower
an image adapter trains on, pictures uploaded beside their records); each optimizer step is the
device's work (holding its lock, on its compute thread: adapter.device_work), so other users' answers go on
between steps; Stop ends the run after the step under way and keeps what it learnt, and Resume continues it from
there to the adapter the run would have given had it never stopped. One run at a time, of at most MAX_STEPS
steps; the last MAX_TRAINED trained adapters stay served, the oldest giving way.
"""

from __future__ import annotations

import math
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .added_adapters import AddedAdapters, Sight, served_sight
from .config import ModelArgs
from .engine import Engine, Engines
from .finetune import RunHooks, TrainConfig, TrainingStopped, TrainResult, checkpoint, train
from .finetune.config import adapter_kind
from .finetune.logs import LOG, records_until
from .finetune.plots import gate_curves, loss_curves
from .finetune.records import MISSING_PICTURE, DataError
from .formats.common import write_zip
from .formats.native import save_adapter
from .images import gather_uploads
from .loading import load_sharing
from .model import Transformer

MAX_STEPS = 2000  # optimizer steps one run may take by default (the app's --train-max-steps; finetune has no limit)
MAX_TRAINED = 4  # trained adapters served at once
TRAINED_PREFIX = "trained-"
MICRO_BATCH = 16  # examples per forward pass at most (a batch above it accumulates gradients)
MAX_SEQ_LEN = 512  # tokens per example at most (fewer where the base's context is shorter)
# a page's request bounds what one run adds to the served process (a LoRA rank of 1,000,000 asked for 22 GB and
# the kernel killed the app); the official releases use 10 prompt tokens and rank 16
MAX_PROMPT_LEN, MAX_LORA_RANK = 64, 64
WARMUP = 0.1  # of the epochs: linear warm-up, then cosine decay to a twentieth of the peak
REFRESH_S = 0.5  # the progress shown at most this often
VALIDATIONS = 10  # validation losses over a run, evenly (a curve, not one point at the end of a one-epoch run)
RUN_FILES = ("log.jsonl", "loss.png", "gates.png")  # what the zip holds beside the adapter


@dataclass(frozen=True)
class TrainRequest:
    """What the Train tab asks for; `config` turns it into adapter.finetune's TrainConfig, whose checks name the
    setting at fault by its flag (--epochs, --lr, ...)."""

    data: str | None  # a records file in any layout fine-tuning reads
    mode: str = "v1"  # v1 (prompts and gates), v2 (also biases and norms, optional LoRA) or lora (LoRA alone)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-2
    prompt_len: int = 10
    prompt_layers: int = 30
    lora_rank: int = 0  # v2: 0 = none; lora: needed
    prompt_format: str = "alpaca"
    seed: int = 0
    start_from: str | None = None  # a served adapter to train further (None: a fresh one)
    images: tuple[str, ...] = ()  # the pictures image records (LLaVA layout) name, uploaded beside them
    keep_best: bool = False  # serve the adapter of the lowest validation loss, not the last step's
    early_stop: int = 0  # end the run after this many validations in a row without a lower loss (0: never)

    def config(self, base: str, out: Path, base_args: ModelArgs, start: StartingPoint | None = None,
               sight: Sight | None = None, image_folder: Path | None = None) -> TrainConfig:
        """adapter.finetune's settings for this request on a base shaped `base_args`; from `start`, its kind and
        prompt format are the adapter's (the mode, shape, LoRA rank and prompt format asked for are not used). A
        vision run reads `sight`'s tower, and a new one gets its visual prompt's shape; `image_folder` holds the
        pictures. More adapted layers than the base has are refused (finetune caps them with a notice, which a page
        would not show)."""
        if not self.data:
            raise ValueError("data: give a records file to train on (.json, .jsonl or .parquet) or plain text (.txt)")
        if not 0 < self.lr < math.inf:  # before the decay's floor, a twentieth of it, is checked
            raise ValueError(f"lr: must be a finite number above 0, got {self.lr:g}")
        if self.early_stop < 0:
            raise ValueError(f"early_stop: give 0 (never) or how many validations without a lower loss end the run, "
                             f"got {self.early_stop}")
        for name, bound in (("prompt_len", MAX_PROMPT_LEN), ("lora_rank", MAX_LORA_RANK)):
            if getattr(self, name) > bound:
                raise ValueError(f"{name}: at most {bound} here (the app trains beside what it serves), got "
                                 f"{getattr(self, name)}; python -m adapter.finetune takes more")
        if start is None and self.mode != "lora" and self.prompt_layers > base_args.n_layers:
            raise ValueError(f"prompt_layers: the served base has {base_args.n_layers} layers; adapt 1 to "
                             f"{base_args.n_layers} of them, got {self.prompt_layers}")
        shape = dict(mode=self.mode, lora_rank=self.lora_rank if self.mode in ("v2", "lora") else 0,
                     prompt_format=self.prompt_format)
        if start is not None:
            shape = dict(mode=start.mode, lora_rank=0, prompt_format=start.prompt_format,
                         init_adapter=str(start.path))
        if sight is not None:
            seen = sight.args
            shape.update(clip=sight.encoder.name, clip_model=seen.clip_model, visual=seen.visual,
                         visual_dim=seen.visual_dim, visual_depth=seen.visual_depth, visual_heads=seen.visual_heads)
        return TrainConfig(
            base=base, data=self.data, out=str(out), epochs=self.epochs, warmup_epochs=WARMUP * self.epochs,
            lr=self.lr, min_lr=self.lr / 20, batch_size=self.batch_size,
            micro_batch_size=math.gcd(self.batch_size, MICRO_BATCH),
            max_seq_len=min(MAX_SEQ_LEN, base_args.max_seq_len),
            prompt_len=self.prompt_len, prompt_layers=self.prompt_layers, seed=self.seed, progress=False,
            keep_best=self.keep_best, early_stop=self.early_stop or None,
            image_folder=None if image_folder is None else str(image_folder), **shape)


@dataclass(frozen=True)
class StartingPoint:
    """A served adapter as a run starts from it: its tensors as served, written in our format, and its kind."""

    path: Path
    mode: str
    prompt_format: str
    sight: Sight | None = None  # the tower it reads, when it sees


@dataclass
class TrainProgress:
    """A run as far as it has gone: its log records, and once it has ended the name it is served under and the
    zip of its adapter."""

    records: list[dict[str, Any]]
    seconds: float  # since this run (or its resumption) began
    start_step: int = 0  # the step it began from (a resumed run's checkpoint)
    name: str | None = None
    archive: Path | None = None
    first_layer: int = field(init=False)
    steps: int = field(init=False)  # the run's optimizer steps in all
    mode: str = field(init=False)

    def __post_init__(self) -> None:
        start = self.records[0]  # a run's first record
        self.first_layer, self.steps, self.mode = start["first_prompt_layer"], start["steps"], start["config"]["mode"]

    @property
    def done(self) -> int:
        return max((r["step"] for r in self.records if r.get("type") == "train"), default=0)

    def status(self) -> str:
        """One line of Markdown: where the run is, or what it gave."""
        train = [r for r in self.records if r.get("type") == "train"]
        val = [r["val_loss"] for r in self.records if r.get("type") == "val"]
        parts = [f"step {self.done} / {self.steps}"]
        if train:
            parts.append(f"loss {train[-1]['loss']:.4f}")
            parts.append(f"{train[-1]['tokens_per_s']:,.0f} tokens/s")
        if val:
            parts.append(f"validation loss {val[-1]:.4f}")
        parts.append(f"{self.seconds:.1f} s")
        if self.name is None and self.start_step < self.done < self.steps:  # at this run's pace so far
            parts.append(f"about {_duration((self.steps - self.done) * self.seconds / (self.done - self.start_step))} "
                         "left")
        line = " · ".join(parts)
        if self.name is None:
            return line
        ended = "Stopped" if self.stopped else "Stopped early" if self.early_stop else "Trained"
        if self.early_stop:
            line += (f" · {self.records[0]['config']['early_stop']} validations in a row without a loss below "
                     f"{self.early_stop['best_val_loss']:.4f} (step {self.early_stop['best_step']})")
        best = self.best
        if best is not None:
            line += f" · the adapter served is step {best['step']}'s, of the lowest validation loss"
        scale = "the delta scale (Advanced)" if self.mode == "lora" else "the gate slider"  # LoRA alone has no gates
        after = ("; ask it about a picture in the Image tab. The zip below holds it for `--adapter`, with `--clip` "
                 "naming the tower it reads." if self.mode == "vision"  # the zip does not hold the served tower
                 else "; the zip below holds it for `--adapter`.")
        resume = " Resume continues the run from this step to its end." if self.stopped else ""
        return (f"**{ended}** ({line}): served as **{self.name}**, chosen in the adapter menu above, so {scale} now "
                f"moves between the frozen base (0) and what it learnt (1){after}{resume}")

    @property
    def stopped(self) -> bool:
        """Whether the run ended before its last step by Stop (not by its early stop)."""
        return self.done < self.steps and self.early_stop is None

    @property
    def early_stop(self) -> dict[str, Any] | None:
        """The record of the run's early stop, if it ended so."""
        return next((r for r in self.records if r.get("type") == "early_stop"), None)

    @property
    def best(self) -> dict[str, Any] | None:
        """With "keep best", the validation record whose adapter the run gives (the first of the lowest)."""
        if not self.records[0]["config"].get("keep_best"):
            return None
        return min((r for r in self.records if r.get("type") == "val"), key=lambda r: (r["val_loss"], r["step"]),
                   default=None)

    def loss_points(self) -> list[tuple[int, float, str]]:
        """(step, loss, "train" or "validation") for a line plot drawn by the browser (cheap to send as it
        grows; a figure drawn here would take CPU from the run)."""
        train, val = loss_curves(self.records)
        return [(step, loss, "train") for step, loss in train] + [(step, loss, "validation") for step, loss in val]

    def gate_points(self) -> list[tuple[int, float, str]]:
        """(step, mean |effective gate| over heads, "layer N") per adapted layer, from 0 at step 0."""
        steps, layers = gate_curves(self.records)
        return [(step, gate, f"layer {self.first_layer + layer}") for layer, curve in enumerate(layers)
                for step, gate in zip(steps, curve)]


def _duration(seconds: float) -> str:
    """A time left, as people say it: 8 s, 3 min 5 s, 1 h 2 min."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


@dataclass(frozen=True)
class StoppedRun:
    """A run stopped before its last step, as Resume continues it: the name its adapter is served under, the folder
    it ran in (which that adapter holds), its settings and the tower it reads."""

    name: str
    folder: Path
    config: TrainConfig
    sight: Sight | None


class LiveTraining:
    """Trains adapters on the base that `engines` serve and serves them there too (`make_engine` wraps a trained
    model as the app wraps the others)."""

    def __init__(self, engines: Engines, make_engine: Callable[[Transformer], Engine],
                 folder: str | Path | None = None, private: bool = False, max_steps: int = MAX_STEPS) -> None:
        self.engines, self.max_steps = engines, max_steps  # max_steps: the optimizer steps one run may take
        self.trained = AddedAdapters(engines, make_engine, TRAINED_PREFIX, MAX_TRAINED, private)
        self.folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "llama-adapter-train"
        self._one_run = threading.Lock()
        self._owner: str | None = None
        self._stop: threading.Event | None = None
        self._stopped: dict[str | None, StoppedRun] = {}  # each session's last run, where it was stopped

    def run(self, request: TrainRequest, owner: str | None = None) -> Iterator[TrainProgress]:
        """The run's progress as it goes (at most every REFRESH_S), and last what it gave. Closing this early (a
        page closed) ends the run after its step under way, and nothing is served. `owner` is the session that asked
        (it may stop the run and resume it; with private adapters, the trained one is served to it alone, and it
        alone may start from one of its own). ValueError for bad settings or records, and while another run is
        under way."""
        return self._alone(owner, lambda stop: self._run(request, stop))

    def resume(self, owner: str | None = None) -> Iterator[TrainProgress]:
        """`owner`'s last run, stopped, continued from the step it stopped at to its end: the same schedule and
        batches, so the adapter of a run that never stopped; it is then served in the stopped one's place, under its
        name. Its progress as `run`'s (the curves from the first step); closed early, the run stops again, and the
        stopped adapter stays served as it was. ValueError where that session's last run was not stopped or its
        adapter is served no more, and while another run is under way."""
        return self._alone(owner, self._resume)

    def _alone(self, owner: str | None, work: Callable[[threading.Event], Iterator[TrainProgress]]
               ) -> Iterator[TrainProgress]:
        """`work`, the one run under way, that `owner` may stop."""
        if not self._one_run.acquire(blocking=False):
            raise ValueError("train: another adapter is being trained here; try again when it is done")
        try:
            self._owner, self._stop = owner, threading.Event()
            yield from work(self._stop)
        finally:
            self._owner = self._stop = None
            self._one_run.release()

    def stop(self, owner: str | None = None) -> bool:
        """End the run that `owner` started after its step under way; False when it has none."""
        stop = self._stop
        if stop is None or owner != self._owner:
            return False
        stop.set()
        return True

    def forget(self, owner: str) -> None:
        """Session `owner` is gone (its page closed): its stopped run is resumed no more."""
        self._stopped.pop(owner, None)

    def _run(self, request: TrainRequest, stop: threading.Event) -> Iterator[TrainProgress]:
        base = self.engines.default.model
        self.folder.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.folder))
        try:
            start = None if request.start_from is None else self._starting_point(request.start_from, folder)
            if start is not None:
                sight = start.sight  # the tower of the adapter trained further, if it sees
            elif request.mode == "vision":
                sight = served_sight(self.engines, "mode: vision trains a visual prompt that")
            else:
                sight = None
            images = folder / "images"
            images.mkdir()
            gather_uploads(request.images, images)
            config = request.config(base.base_path or "the served base", folder / "run", base.args,
                                    start, sight, images)
            try:
                result, progress = yield from self._train(config, self._hooks(sight, stop))
            except DataError as error:
                if request.images or MISSING_PICTURE not in str(error):
                    raise
                raise DataError(f"{error}\nimages: upload the pictures the records name beside the file "
                                "(none was given)") from None
            name = self.trained.add(load_sharing(base, _given(result)), folder, sight,  # exactly what the zip holds
                                    self._owner)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        yield self._ended(progress, StoppedRun(name, folder, config, sight), result)

    def _resume(self, stop: threading.Event) -> Iterator[TrainProgress]:
        stopped = self._stopped.get(self._owner)
        if stopped is None:
            raise ValueError("resume: your last run here was not stopped; Stop ends a run and keeps what it learnt "
                             "served, and Resume then continues it")
        if not self.trained.holds(stopped.name, stopped.folder):
            del self._stopped[self._owner]
            raise ValueError(f"resume: {stopped.name}, the adapter of your stopped run, is served no more (removed, or "
                             "given way to newer ones); train anew")
        config = replace(stopped.config, resume=True)
        out = config.out_path
        with self.trained.in_use(stopped.name):
            earlier = records_until(out / LOG, checkpoint.read_state(checkpoint.latest(out)).step)
            result, progress = yield from self._train(config, self._hooks(stopped.sight, stop), earlier)
            self.trained.replace(stopped.name, load_sharing(self.engines.default.model, _given(result)),
                                 stopped.sight)
        yield self._ended(progress, stopped, result)

    def _hooks(self, sight: Sight | None, stop: threading.Event) -> RunHooks:
        """A run on the served base (and `sight`'s tower), each step the device's work, stopped by `stop`."""
        engine = self.engines.default
        return RunHooks(base=engine.model, image_encoder=None if sight is None else sight.encoder, stop=stop,
                        step_runner=engine.work.run, max_steps=self.max_steps, validations=VALIDATIONS)

    def _ended(self, progress: TrainProgress, run: StoppedRun, result: TrainResult) -> TrainProgress:
        """The last progress of `run`, served as `run.name`, with its zip; a stopped run is kept for Resume."""
        if progress.stopped:
            self._stopped[self._owner] = run
        else:
            self._stopped.pop(self._owner, None)
        return replace(progress, name=run.name, archive=self._archive(result, run.name, run.folder))

    def _starting_point(self, name: str, folder: Path) -> StartingPoint:
        """Served adapter `name` written as it is served (whatever format it was read from) for the run to start
        from, with the tower it reads if it sees; the bare base is refused."""
        try:
            model = self.engines.seen_by(self._owner).get(name).model
        except ValueError as error:  # not served (any longer), or another session's own
            raise ValueError(f"start_from: {error}") from None
        args = model.adapter_args
        if args.learns_nothing:
            raise ValueError(f"start_from: {name} is the frozen base without an adapter; start from a new adapter")
        if args.visual != "none" and model.image_encoder is None:
            raise ValueError(f"start_from: {name} has a visual prompt but is served without its CLIP tower; serve "
                             "it with --clip to train it further")
        sight = None if model.image_encoder is None else Sight(model.image_encoder, args)
        path = save_adapter(model, folder / "start")
        return StartingPoint(path, adapter_kind(args), model.prompt_format, sight)

    @staticmethod
    def _train(config: TrainConfig, hooks: RunHooks, earlier: Iterable[dict[str, Any]] = ()
               ) -> Generator[TrainProgress, None, tuple[TrainResult, TrainProgress]]:
        """`train` in a thread of its own, its progress yielded as it goes (after the `earlier` records of a run
        resumed); returns its result and last progress. Closed early, it stops the run and waits for the step under
        way to end."""
        events: queue.Queue = queue.Queue()
        outcome: Future[TrainResult] = Future()

        def work() -> None:
            try:
                outcome.set_result(train(config, replace(hooks, on_record=events.put)))
            except BaseException as error:  # handed to the caller's thread
                outcome.set_exception(error)
            finally:
                events.put(None)

        records: list[dict[str, Any]] = list(earlier)
        start_step = max((r["step"] for r in records if r.get("type") == "train"), default=0)
        started = shown = time.perf_counter()
        thread = threading.Thread(target=work, name="live-training", daemon=True)
        thread.start()
        try:
            while (record := events.get()) is not None:
                records.append(record)
                if events.empty() and time.perf_counter() - shown >= REFRESH_S:
                    shown = time.perf_counter()
                    yield TrainProgress(list(records), shown - started, start_step)
        finally:
            hooks.stop.set()
            thread.join()
        try:
            result = outcome.result()
        except TrainingStopped as error:  # a NaN loss or gradient: the user's settings, not a fault here
            raise ValueError(str(error)) from error
        except torch.OutOfMemoryError as error:  # the settings asked more than the device holds beside the base
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the run held goes back to the served models
            raise ValueError(f"batch_size: the device ran out of memory in a step of {config.micro_batch_size} "
                             f"examples of up to {config.max_seq_len} tokens; train with a smaller batch size (a "
                             "step holds at most its batch), fewer adapted layers or shorter records") from error
        return result, TrainProgress(records, time.perf_counter() - started, start_step)

    @staticmethod
    def _archive(result: TrainResult, name: str, folder: Path) -> Path:
        """`NAME.zip`: a folder NAME holding the adapter served and the run's log and plots, which `--adapter NAME`
        reads once unzipped (and the app's Gates tab shows its gates.png)."""
        run = result.out
        files = sorted(_given(result).parent.iterdir()) + [run / f for f in RUN_FILES if (run / f).is_file()]
        return write_zip(folder / f"{name}.zip", name, files)


def _given(result: TrainResult) -> Path:
    """The adapter a run gives: with "keep best", that of its lowest validation loss; else its last step's."""
    return result.best if result.best is not None else result.adapter
