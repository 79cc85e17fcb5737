"""One greedy decode loop for both sides, and the check that they compute the same thing before either is timed.

Ours decodes with `Transformer.step` and its static KV cache (what adapter.generate runs); the peer with
transformers' own cache (`past_key_values`, a DynamicCache) and `logits_to_keep=1` on the prompt, as HF
`generate` does. Both take the argmax of each step's logits, so the loop around them is identical and only
the models differ.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from adapter.config import AdapterArgs
from adapter.static_decode import StaticDecoder
from bench.peers import Weights, pair
from bench.report import table

# relative tolerance on the first token's logits (max |ours - peer| / max |ours|), per precision. fp32 sees only
# summation order (about 1e-6); bf16 rounds every activation (about 1e-2 at dim 512); nf4 groups the
# double-quantized scales over rows that the q/k permutation reorders (about 5e-3); int8 quantizes the
# activations of every matmul per token, and peft sends the prompt's output through o_proj on its own while
# we add it before wo, so the two round differently (about 3e-2; exactly equal at gate 0).
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "nf4": 2e-2, "int8": 6e-2}


class PeerMismatch(RuntimeError):
    """The peer does not compute our model, so timing it would compare different things."""


class Ours:
    """Our model behind the loop's two calls (with an image's visual prompt, when given; with `compile`, the
    one-token steps through `Transformer.step(compile=True)`; with `static`, through that decoder: see
    adapter.static_decode; with `plain`, never through a static step, the model's `cuda_graphs` off for them)."""

    def __init__(self, model, visual_prompt: torch.Tensor | None = None, compile: bool = False,
                 static: StaticDecoder | None = None, plain: bool = False) -> None:
        self.model, self.visual_prompt, self.static, self.plain, self.cache = model, visual_prompt, static, plain, None
        self.options = {"compile": True} if compile or static is not None else {}

    def prefill(self, tokens: torch.Tensor, max_len: int) -> torch.Tensor:
        self.cache = self.model.new_cache(tokens.shape[0], max_len, visual_prompt=self.visual_prompt)
        return self.model.step(tokens, self.cache)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.static is not None:  # sides sharing one model take turns in the same rounds
            self.model.static_decoders[True] = self.static
        graphs = self.model.cuda_graphs
        self.model.cuda_graphs = graphs and not self.plain
        try:
            return self.model.step(ids[:, None], self.cache, **self.options)
        finally:
            self.model.cuda_graphs = graphs


class Peer:
    """transformers + peft behind the loop's two calls."""

    def __init__(self, model) -> None:
        import transformers

        self.model, self.cache = model, None
        # transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a warning)
        forward = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    def prefill(self, tokens: torch.Tensor, max_len: int) -> torch.Tensor:
        return self._run(tokens, logits_to_keep=1)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids[:, None], **{self.cache_arg: self.cache})

    def _run(self, tokens: torch.Tensor, **options) -> torch.Tensor:
        out = self.model(input_ids=tokens, use_cache=True, **options)
        self.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1].float()


@dataclass
class Greedy:
    tokens: torch.Tensor  # [B, new_tokens]
    first_logits: torch.Tensor  # [B, vocab]
    margins: list[float]  # row 0's top-1 minus top-2 logit at each step (when asked for)
    first_token_s: float  # prefill and the first argmax
    decode_s: float  # the other new_tokens - 1 steps

    @property
    def tokens_per_s(self) -> float:
        batch, steps = self.tokens.shape
        if steps < 2:
            raise ValueError("tokens_per_s: one new token has no decode steps to time")
        return batch * (steps - 1) / self.decode_s


def prompt(batch: int, length: int, vocab: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random token ids (no special ids), the same for a given seed on every side and device."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def greedy(side: Ours | Peer, tokens: torch.Tensor, new_tokens: int, margins: bool = False) -> Greedy:
    """Greedy decode of `new_tokens` tokens after `tokens`, timing the first token and the rest."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens: must be at least 1, got {new_tokens}")
    gaps = []
    with torch.inference_mode():
        start = time.perf_counter()
        logits = side.prefill(tokens, tokens.shape[1] + new_tokens)
        ids = synced(logits.argmax(-1))
        first = time.perf_counter()
        first_logits, out = logits.clone(), [ids]
        for _ in range(new_tokens - 1):
            if margins:
                gaps.append(_margin(logits))
            logits = side.step(ids)
            ids = logits.argmax(-1)
            out.append(ids)
        synced(ids)
        end = time.perf_counter()
    if margins:
        gaps.append(_margin(logits))
    return Greedy(torch.stack(out, 1), first_logits, gaps, first - start, end - first)


def synced(ids: torch.Tensor) -> torch.Tensor:
    """Wait for the GPU to finish (CUDA runs asynchronously), so that the clock reads the work's end."""
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return ids


def _margin(logits: torch.Tensor) -> float:
    top = logits[0].float().topk(2).values
    return float(top[0] - top[1])


@dataclass(frozen=True)
class Check:
    """What the equality check saw: the first-token logits' relative difference and the greedy tokens."""

    precision: str
    difference: float
    tolerance: float
    equal_tokens: int
    new_tokens: int

    def cells(self) -> tuple[str, str, str, str]:
        tokens = f"{self.equal_tokens} / {self.new_tokens}"
        if self.equal_tokens < self.new_tokens:
            tokens += " (then a near tie)"
        return self.precision, f"{self.difference:.1e}", f"{self.tolerance:.0e}", tokens


CHECK_PROMPT, CHECK_TOKENS = 64, 16


def check_same(ours: Ours, peer: Peer, precision: str, tokens: torch.Tensor, new_tokens: int = CHECK_TOKENS,
               tolerance: float | None = None) -> Check:
    """Greedy-decode the same prompt on both sides; raise PeerMismatch unless the first-token logits agree
    within the precision's tolerance and the greedy tokens are equal, up to a step where our top two logits
    are within that tolerance of each other (a near tie that rounding may break either way). `tolerance`
    overrides the precision's."""
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    a = greedy(ours, tokens[:1], new_tokens, margins=True)
    b = greedy(peer, tokens[:1], new_tokens)
    scale = float(a.first_logits.abs().max())
    difference = float((a.first_logits - b.first_logits).abs().max()) / max(scale, 1e-12)
    if difference > tolerance:
        raise PeerMismatch(f"{precision}: the first token's logits differ by {difference:.1e} (relative), more than "
                           f"the {tolerance:.0e} allowed; the peer does not compute our model, so it is not timed")
    mismatches = (a.tokens[0] != b.tokens[0]).nonzero()
    equal = int(mismatches[0]) if len(mismatches) else new_tokens
    if equal < new_tokens and a.margins[equal] > tolerance * scale:
        ours_ids, peer_ids = a.tokens[0, :equal + 1].tolist(), b.tokens[0, :equal + 1].tolist()
        raise PeerMismatch(f"{precision}: greedy tokens differ at step {equal} (ours {ours_ids}, peer {peer_ids}) "
                           "where our top two logits are "
                           f"{a.margins[equal]:.3g} apart; the peer does not compute our model, so it is not timed")
    return Check(precision, difference, tolerance, equal, new_tokens)


def checked_pair(weights: Weights, precision: str, adapter: AdapterArgs) -> tuple[Ours, Peer, Check]:
    """Both sides at `precision` on `weights` (see bench.peers.pair), checked to compute the same thing."""
    model, peer = pair(weights, precision, adapter)
    ours, theirs = Ours(model), Peer(peer)
    return ours, theirs, check_same(ours, theirs, precision, prompt(1, CHECK_PROMPT, weights.args.vocab_size, seed=7))


def check_lines(checks: list[Check], on_mismatch: str = "stops the run") -> list[str]:
    """The section's account of the checks: what was compared, and a table of what was seen."""
    return [(f"Checked before measuring: the first token's logits ({CHECK_PROMPT}-token prompt) and {CHECK_TOKENS} "
             f"greedy tokens on both sides; a pair that differs {on_mismatch}."),
            "",
            *table(("precision", "first-token logits, max relative difference", "allowed", "greedy tokens equal"),
                   (c.cells() for c in checks))]
