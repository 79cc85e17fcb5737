"""One-token decode steps of fixed shapes and addresses, so that a GPU replays each as one CUDA graph.

A decode step of a 7B model is hundreds of small kernels; launched one by one from Python they take longer
than the few milliseconds the GPU needs to read the weights. A CUDA graph launches them all at once, but it
replays fixed shapes reading fixed addresses. So this step:

- writes the new key/value at a position held in a tensor (`index_copy_`), not a Python int;
- attends over a fixed number of the cache's slots (a power of two, at least `BUCKET`), masked to the
  positions written so far and after each row's left padding: each such length is one graph, replayed step
  after step until the request outgrows it;
- reads its inputs (the token, the position, the gate and delta scales, the prompts' keys/values) from
  tensors of its own, copied in before each replay, so moving the slider never captures again;
- keeps the keys/values in storage of its own (a `Slot`, a power of two positions long), which later requests
  of the same batch size and at most that length reuse once the request that had it is gone, so their steps
  replay the graphs already captured; an idle slot too short for a new request is let go.

A request's `KVCache` moves into a slot at its first one-token step here: its keys/values so far are copied
in and its tensors become views of the slot's, so eager steps can still follow on the same cache. On the CPU
(the tests) the same step runs without capture.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .kv_cache import KVCache
from .step_context import StepContext

if TYPE_CHECKING:
    from .model import Transformer

BUCKET = 64  # the fewest cache positions a step attends over
WARMUPS = 2  # eager (or compiling) runs on a side stream before a capture, as CUDA graphs need


def bucket(length: int, limit: int) -> int:
    """The power of two (at least BUCKET) that holds `length` positions, at most `limit`."""
    size = BUCKET
    while size < length:
        size *= 2
    return min(size, limit)


@dataclass(eq=False)
class Slot:
    """Storage and inputs of fixed address for one batch size and cache length, and its captured graphs."""

    storage: KVCache  # its keys/values (int8 or not, as the caches it serves) and the prompts' keys/values
    tokens: torch.Tensor  # [B, 1]
    position: torch.Tensor  # [1]: where this step's token goes (left padding included)
    pad: torch.Tensor  # [B]
    gate: torch.Tensor  # [L, B, H, 1, 1] float32: one scale per adapter layer, row and head, whatever a call gives
    delta: torch.Tensor  # [B, 1, 1] in the model's dtype
    owner: Callable[[], KVCache | None] = lambda: None  # a weak reference to the cache that uses it
    scales: tuple[torch.Tensor, torch.Tensor] | None = None  # the CPU values last copied into gate/delta
    graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.storage.max_len


class SlotView:
    """What the layers see as the cache during a static step: writes at the slot's position tensor, and
    every key/value of the first `visible` positions (the mask hides those not written yet)."""

    visual_prompt = None  # the prompts' keys/values are already in the slot

    def __init__(self, slot: Slot, visible: int) -> None:
        self.slot, self.visible, self.prompt_kv = slot, visible, slot.storage.prompt_kv

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot.storage.store_at(layer, self.slot.position, k, v, self.visible)


class StaticDecoder:
    """One-token steps of `model` through slots: captured as CUDA graphs on a GPU (`capture`, the default
    there), run as they are on the CPU; with `compile`, the step is compiled first (torch.compile, dynamic
    shapes: one compilation serves every cache length)."""

    def __init__(self, model: Transformer, compile: bool = False, capture: bool | None = None) -> None:
        device = model.tok_embeddings.weight.device
        self.model = model
        self.capture = device.type == "cuda" if capture is None else capture
        self.body = torch.compile(self._logits, dynamic=True) if compile else self._logits
        self.slots: list[Slot] = []
        self.captures = 0  # graphs captured so far (each slot and visible length once)
        self.failure: str | None = None  # set by Transformer.step when a step failed: it then decodes plainly
        self.weights: tuple[int, ...] = ()  # the addresses the graphs read (see _check_weights)

    def step(self, tokens: torch.Tensor, cache: KVCache, gate_scale: torch.Tensor,
             delta_scale: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of `tokens` [B, 1] fed at `cache.length` (the caller advances the length). The
        scales are CPU tensors as `Transformer.step` checked them (`_row_scales`)."""
        slot = self._slot(cache)
        slot.tokens.copy_(tokens)
        slot.position.fill_(cache.length)
        if slot.scales is None or not all(torch.equal(a, b) for a, b in zip(slot.scales, (gate_scale, delta_scale))):
            slot.gate.copy_(gate_scale.expand(slot.gate.shape))
            slot.delta.copy_(delta_scale.expand(slot.delta.shape))
            slot.scales = (gate_scale.clone(), delta_scale.clone())  # the caller's may change in place
        visible = bucket(cache.length + 1, slot.length)
        if visible not in slot.graphs:
            slot.graphs[visible] = self._capture(slot, visible)
        graph, out = slot.graphs[visible]
        if graph is None:
            return self.body(slot, visible)
        graph.replay()
        return out.clone()

    def _logits(self, slot: Slot, visible: int) -> torch.Tensor:
        """The step itself: the rotation and the mask from the position and padding tensors, then the layers."""
        model = self.model
        rows = (slot.position - slot.pad).clamp_min(0)[:, None]  # each row's own position, [B, 1]
        keys = torch.arange(visible, device=slot.pad.device)
        written = (keys >= slot.pad[:, None]) & (keys <= slot.position)
        mask = (written | (keys == slot.position))[:, None, None]  # a padding query sees itself (no NaN)
        view = SlotView(slot, visible)
        ctx = StepContext(rope=model._rope_slice(rows), gate_scale=slot.gate, delta_scale=slot.delta,
                          attn_mask=mask, cache=view, fused=model.fused_inference,
                          fp32_attention=model.fp32_attention)
        return model._last_logits(slot.tokens, ctx, view, None)

    def _capture(self, slot: Slot, visible: int) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """The step at `visible` as a CUDA graph and its output tensor (None, None without capture). The warm-up
        runs compute the real step (the replay then writes the same keys/values again)."""
        if not self.capture:
            return None, None
        device = slot.tokens.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUPS):
                self.body(slot, visible)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.body(slot, visible)
        self.captures += 1
        return graph, out

    def _slot(self, cache: KVCache) -> Slot:
        """The slot `cache` lives in, moving it into a free one (or a new one) on its first step here."""
        for slot in self.slots:
            if slot.owner() is cache:
                return slot
        self._check_weights()
        length = bucket(cache.max_len, self.model.args.max_seq_len)
        idle = [s for s in self.slots if s.owner() is None]
        free = [s for s in idle if self._fits(s, cache, length)]
        if free:
            slot = min(free, key=lambda s: s.length)
        else:  # an idle slot of this batch size too short for this request would only hold memory
            self.slots = [s for s in self.slots if s not in idle or s.storage.batch != cache.batch]
            slot = self._new_slot(cache, length)
            self.slots.append(slot)
        written = cache.length
        for mine, theirs in zip(slot.storage.tensor_lists(), cache.tensor_lists()):
            for i in range(len(theirs)):
                mine[i][:, :, :written].copy_(theirs[i][:, :, :written])
                theirs[i] = mine[i][:, :, :cache.max_len]
        for i, (pk, pv) in cache.prompt_kv.items():
            mine = slot.storage.prompt_kv[i]
            mine[0].copy_(pk.expand_as(mine[0]))
            mine[1].copy_(pv.expand_as(mine[1]))
            cache.prompt_kv[i] = mine
        if cache.pad is None:
            slot.pad.zero_()
        else:
            slot.pad.copy_(cache.pad)
        slot.owner = weakref.ref(cache)
        return slot

    def _check_weights(self) -> None:
        """Forget every graph when a tensor the step reads has moved since they were captured (a parameter
        replaced, the model moved or cast): a graph reads the addresses it was captured with. Checked once per
        request; in-place changes (training, `load_adapter_state`) keep the addresses and need nothing."""
        model = self.model
        weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers(),
                                               *(() if model._rope is None else (model._rope,))))
        if weights != self.weights:
            for slot in self.slots:
                slot.graphs.clear()
            self.weights = weights

    @staticmethod
    def _fits(slot: Slot, cache: KVCache, length: int) -> bool:
        mine, k = slot.storage, cache.keys[0]
        return (slot.length >= length and mine.keys[0].shape[:2] == k.shape[:2] and mine.dtype == cache.dtype
                and mine.int8 == cache.int8 and mine.prompt_kv.keys() == cache.prompt_kv.keys()
                and all(mine.prompt_kv[i][0].dtype == pk.dtype for i, (pk, _) in cache.prompt_kv.items()))

    def _new_slot(self, cache: KVCache, length: int) -> Slot:
        batch, heads, _, head_dim = cache.keys[0].shape
        device = cache.keys[0].device

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # plain tensors even when made under inference_mode, so that no_grad steps may write them too
        with torch.inference_mode(False):
            storage = KVCache(len(cache.keys), batch, heads, length, head_dim, dtype=cache.dtype, device=device,
                              int8=cache.int8)
            storage.prompt_kv = {i: (zeros(batch, *pk.shape[1:], dtype=pk.dtype),
                                     zeros(batch, *pv.shape[1:], dtype=pv.dtype))
                                 for i, (pk, pv) in cache.prompt_kv.items()}
            return Slot(storage=storage, tokens=zeros(batch, 1, dtype=torch.long),
                        position=zeros(1, dtype=torch.long), pad=zeros(batch, dtype=torch.long),
                        gate=zeros(self.model.args.n_layers - self.model.first_prompt_layer, batch,
                                   self.model.args.n_heads, 1, 1, dtype=torch.float32),
                        delta=zeros(batch, 1, 1, dtype=self.model.tok_embeddings.weight.dtype))
