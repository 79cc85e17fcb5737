"""Chat requests and image questions of several users decoded together, a row each.

Answered one after another, N users wait N decodes. A decode step costs about the same for a few rows as for
one (a GPU reads every weight once per step whatever the batch; on the CPU the tiny model's 8-row gate sweep
takes about as long as one answer), so the chat requests that wait for the device are decoded together: each is
a row with its own prompt, gate and delta scale, layers, sampling, seed and length (adapter.generate.stream_batch's
`rows`), and streams its own answer. A row whose user stops or leaves is no longer shown; the batch stops when
every row has finished or been left. A seeded row gives the answer it gives alone (one generator per row).
Rows are padded on the left to the longest prompt, whose length the context then holds for every row: a job that
would get less room for its answer beside the others than alone waits for the next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .device_work import DeviceWork
from .generate import fits_together, stream_batch
from .prompt_ids import prompt_ids
from .token_logprob import TokenLogprob

if TYPE_CHECKING:
    from .model import Transformer

_END = object()  # put on a job's queue after its last piece


@dataclass
class ChatJob:
    """One chat request or image question: its prompt, its row of gate scales (a number, or one per adapter
    layer and head as adapter.gate_layers.gate_scale_rows gives them), its delta scale, its sampling options and
    its image (None: none; rows without one get no visual query, adapter.visual.encode_images); `generated`, when
    given, is told every token its row decodes up to the piece last read (the batch may decode ahead of a reader
    that stops at a stop string or leaves), and `scores` each one's log-probability beside it (options asking
    `logprobs`, adapter.generate.GenerationRequest)."""

    prompt: str
    gate: float | torch.Tensor
    delta: float
    options: dict[str, Any]
    image: Any = None
    generated: list[int] | None = None
    scores: list[TokenLogprob] | None = None
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    left: threading.Event = field(default_factory=threading.Event)
    length: int | None = None  # the prompt's tokens, once the batcher has counted them
    decoded: list[int] = field(default_factory=list)  # every token its row decoded so far
    scored: list[TokenLogprob] = field(default_factory=list)  # their log-probabilities, when asked


class ChatBatcher:
    """Decodes the chat jobs of one model in batches of at most `max_rows`: a thread of its own gathers them and
    hands each batch to the device's work (`work`: holding the device's lock, on its compute thread if it has one).
    A batch is every job that waited for the device, up to `max_rows`: a job that finds the device idle waits
    `gather_s` for others; jobs that arrive while a batch decodes make the next one. The thread ends after
    `idle_s` without a job (the next job starts another), so a batcher whose adapter is served no more lets its
    model go."""

    def __init__(self, model: "Transformer", work: DeviceWork, *, max_rows: int, stop: tuple[str, ...],
                 compile: bool, gather_s: float = 0.005, idle_s: float = 10.0,
                 max_cached_tokens: int | None = None) -> None:
        self.model, self.work, self.max_rows, self.max_cached_tokens = model, work, max_rows, max_cached_tokens
        self.stop, self.compile, self.gather_s, self.idle_s = stop, compile, gather_s, idle_s
        self.pending: queue.SimpleQueue[ChatJob] = queue.SimpleQueue()
        self._held: deque[ChatJob] = deque()  # taken, but waiting for a batch they fit in (first served next)
        self.submitted = 0  # jobs handed in so far
        self.batch_sizes: list[int] = []  # how many rows each batch had (for tests and benchmarks)
        self._thread: threading.Thread | None = None
        self._started = threading.Lock()

    def answer(self, job: ChatJob) -> Iterator[str]:
        """The job's answer so far, growing as its row decodes; closing the iterator leaves the batch."""
        self.pending.put(job)
        self._start()  # after the put: a thread ending meanwhile has seen the job, or is gone and started anew
        self.submitted += 1
        answer, shown = "", False
        try:
            while (item := job.pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                piece, tokens = item
                self._tell(job, tokens)
                answer += piece
                shown = True
                yield answer
            self._tell(job, len(job.decoded))
            if not shown:
                yield answer
        finally:
            job.left.set()

    @staticmethod
    def _tell(job: ChatJob, tokens: int) -> None:
        """Pass the row's first `tokens` decoded tokens on to `job.generated`, their scores to `job.scores`."""
        if job.generated is not None:
            job.generated.extend(job.decoded[len(job.generated):tokens])
        if job.scores is not None:
            job.scores.extend(job.scored[len(job.scores):tokens])

    def _start(self) -> None:
        with self._started:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="chat-batcher", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                jobs = [self._held.popleft() if self._held else self.pending.get(timeout=self.idle_s)]
            except queue.Empty:
                with self._started:
                    if self.pending.empty():
                        self._thread = None
                        return
                continue
            deadline = time.monotonic() + self.gather_s
            self._take(jobs, deadline)
            self.work.run(self._batch, jobs)

    def _batch(self, jobs: list[ChatJob]) -> None:
        """Once the device is free: the jobs, those that came while it was busy too, decoded but for those left."""
        self._take(jobs, None)
        for job in jobs:
            if job.left.is_set():
                job.pieces.put(_END)
        waiting = [job for job in jobs if not job.left.is_set()]
        if waiting:
            self._decode(waiting)

    def _take(self, jobs: list[ChatJob], deadline: float | None) -> None:
        """Add pending jobs to `jobs`, up to `max_rows`: those held back before, then those that arrive before
        `deadline`, or (None) those already there; a job that does not fit beside them is held for the next."""
        held, self._held = self._held, deque()
        while len(jobs) < self.max_rows:
            try:
                if held:
                    job = held.popleft()
                elif deadline is None:
                    job = self.pending.get_nowait()
                else:
                    job = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (jobs if self._fits(jobs, job) else self._held).append(job)
        self._held.extend(held)

    def _fits(self, jobs: list[ChatJob], job: ChatJob) -> bool:
        """Whether every row of `jobs` and `job` decoded together has the room for its answer it has alone: the
        batch's context holds the longest prompt for every row (left padding), so a short prompt beside a long
        one may reach the context's end sooner than its `max_new_tokens`."""
        rows = [*jobs, job]
        try:
            lengths = [self._length(row) for row in rows]
        except ValueError:  # a prompt the batch's decode refuses, naming it, to its user
            return True
        limit = self.model.args.max_seq_len
        return fits_together(lengths, [row.options.get("max_new_tokens", limit) for row in rows], limit)

    def _length(self, job: ChatJob) -> int:
        if job.length is None:
            model = self.model
            job.length = len(prompt_ids(model.tokenizer, job.prompt, model.args.vocab_size))
        return job.length

    def _decode(self, jobs: list[ChatJob]) -> None:
        """Decode `jobs` as one batch (the device's lock held), each row's pieces to its own queue."""
        self.batch_sizes.append(len(jobs))
        finished, ended = [False] * len(jobs), [False] * len(jobs)  # ended: its user was told the answer is whole
        try:
            images = [job.image for job in jobs]
            with closing(stream_batch(self.model, [job.prompt for job in jobs], stop=self.stop,
                                      images=images if any(image is not None for image in images) else None,
                                      gate_scale=self._gate_rows([job.gate for job in jobs]),
                                      delta_scale=[job.delta for job in jobs],
                                      rows=[job.options for job in jobs], compile=self.compile,
                                      generated=[job.decoded for job in jobs],
                                      scores=[job.scored for job in jobs], finished=finished,
                                      max_cached_tokens=self.max_cached_tokens)) as steps:
                for pieces in steps:
                    for row, (job, piece) in enumerate(zip(jobs, pieces)):
                        if piece and not job.left.is_set():
                            job.pieces.put((piece, len(job.decoded)))
                        if finished[row] and not ended[row]:  # not kept waiting for the batch's longest answer
                            job.pieces.put(_END)
                            ended[row] = True
                    if all(done or job.left.is_set() for done, job in zip(finished, jobs)):
                        break
        except Exception as error:  # the requests' own checks ran before; tell every user of the batch
            for job in jobs:
                job.pieces.put(error)
        finally:
            for job, told in zip(jobs, ended):
                if not told:
                    job.pieces.put(_END)

    def _gate_rows(self, gates: list[float | torch.Tensor]) -> list[float] | torch.Tensor:
        """One gate-scale row per job: numbers as they are, else each as [adapter layers, heads]."""
        if all(not isinstance(gate, torch.Tensor) for gate in gates):
            return [float(gate) for gate in gates]
        model = self.model
        shape = (model.args.n_layers - model.first_prompt_layer, model.args.n_heads)
        rows = []
        for gate in gates:
            row = torch.as_tensor(gate, dtype=torch.float32)
            rows.append((row if row.dim() != 1 else row[:, None]).expand(shape))
        return torch.stack(rows)
