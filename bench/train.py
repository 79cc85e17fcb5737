"""Training benchmark: tokens/s and peak memory of one v1 adapter training step, ours beside transformers + peft
`adaption_prompt` training the same model (same weights, q/k rows permuted to HF's layout) on the same batches.

Shape: LLaMA dim 512, 8 layers, 8 heads, vocab 32000, fp32, prompt_len 10 on all 8 layers; 8 sequences of
64-192 tokens per optimizer step as 2 micro-batches of 4, loss on the last 60% of each, AdamW, clipping 1.0.
Each side runs in a fresh process (its ru_maxrss is the peak memory); both are causal-only (right padding,
padding masked in the labels), gates start at zero so both first losses are the base model's.

    python -m bench.train [--threads 2] [--steps 5] [--repeats 3] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from adapter.finetune.batching import Batch, collate
from adapter.finetune.encode import IGNORE_INDEX, Encoded
from bench.decode import ADAPTER, SHAPE, machine
from bench.report import publish

MICRO_BATCHES, MICRO_BATCH_SIZE = 2, 4
LENGTHS = (64, 192)
LR = 1e-3


def batches(steps: int) -> list[list[Batch]]:
    """Fixed random sequences: the first 40% of each is prompt (ignored), the rest is trained on."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(MICRO_BATCHES):
            items = []
            for _ in range(MICRO_BATCH_SIZE):
                length = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=generator))
                tokens = torch.randint(3, SHAPE.vocab_size, (length,), generator=generator).tolist()
                prompt = int(length * 0.4)
                items.append(Encoded(tokens, [IGNORE_INDEX] * prompt + tokens[prompt:]))
            step.append(collate(items))
        out.append(step)
    return out


def targets(step: list[Batch]) -> int:
    return sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in step)


def ours() -> torch.nn.Module:
    """The benchmark LLaMA with a fresh (zero-gate) v1 adapter, the same weights in every process."""
    from adapter.model import Transformer

    torch.manual_seed(0)
    return Transformer(SHAPE, ADAPTER).train()


def hf_peft(model: torch.nn.Module):
    """transformers LlamaForCausalLM sharing our weights (q/k rows in HF order), then peft adaption_prompt."""
    import peft
    import transformers

    from adapter.formats.hf import meta_to_hf_rows

    a = model.args
    config = transformers.LlamaConfig(
        hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False)
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        for meta, hf in names.items():
            w = layer.get_parameter(f"{meta}.weight").detach()
            if meta in ("attention.wq", "attention.wk"):
                w = meta_to_hf_rows(w, a.n_heads if meta == "attention.wq" else a.kv_heads)
            state[f"model.layers.{i}.{hf}.weight"] = w
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(config)
    hf_model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    hf_model.model.rotary_emb = type(hf_model.model.rotary_emb)(config=config)  # buffers off the meta device
    config = peft.AdaptionPromptConfig(adapter_len=ADAPTER.prompt_len, adapter_layers=ADAPTER.prompt_layers,
                                       task_type="CAUSAL_LM")
    return peft.get_peft_model(hf_model, config).train()


def worker(side: str, threads: int, steps: int) -> dict:
    """Train `steps` (+1 warm-up) steps in this process: tokens/s of each timed step, peak RSS, the losses."""
    from adapter.finetune.distributed import Processes
    from adapter.finetune.optimizer import build_optimizer
    from adapter.finetune.step import optimizer_step

    torch.set_num_threads(threads)
    model = ours()
    if side == "peft":
        model = hf_peft(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, LR, 0.02) if side == "ours" else torch.optim.AdamW(params, lr=LR,
                                                                                          betas=(0.9, 0.95))
    losses, speeds = [], []
    for index, step in enumerate(batches(steps + 1)):
        n = targets(step)
        start = time.perf_counter()
        if side == "ours":
            loss = optimizer_step(model, optimizer, step, n, Processes(), lr=LR, clip_grad=1.0, step=index + 1).loss
        else:
            loss = 0.0
            for batch in step:
                part = (batch.labels[:, 1:] != IGNORE_INDEX).sum() / n  # token mean over the whole step, as ours
                out = model(input_ids=batch.tokens, labels=batch.labels)
                (out.loss * part).backward()
                loss += float(out.loss * part)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if index:  # the first step is a warm-up
            speeds.append(sum(b.n_tokens for b in step) / (time.perf_counter() - start))
        losses.append(loss)
    return {"tokens_per_s": speeds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_loss": losses[0], "last_loss": losses[-1]}


def run_worker(side: str, threads: int, steps: int) -> dict:
    command = [sys.executable, "-m", "bench.train", "--worker", side, "--threads", str(threads), "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Median tokens/s over every timed step of every run (min / max beside it: steps slowed by other work
    on the machine stay out of the median), and the largest peak memory."""
    speeds = [speed for r in runs for speed in r["tokens_per_s"]]
    return {**runs[0], "tokens_per_s": statistics.median(speeds), "spread": (min(speeds), max(speeds)),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def render(results: dict[str, dict], command: str) -> str:
    a, b = results["ours"], results["peft"]
    rows = [("training tokens/s, median step (min / max)",
             f"{a['tokens_per_s']:.0f} ({a['spread'][0]:.0f} / {a['spread'][1]:.0f})",
             f"{b['tokens_per_s']:.0f} ({b['spread'][0]:.0f} / {b['spread'][1]:.0f})",
             f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}"),
            ("peak resident memory, MB", f"{a['peak_rss_mb']:.0f}", f"{b['peak_rss_mb']:.0f}",
             f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"),
            ("loss, first step (same base model)", f"{a['first_loss']:.4f}", f"{b['first_loss']:.4f}", ""),
            ("loss, last step", f"{a['last_loss']:.4f}", f"{b['last_loss']:.4f}", "")]
    return "\n".join([
        "## Training (CPU, fp32): LLaMA dim 512, 8 layers, vocab 32000, v1 adapter on 8 layers, vs transformers + peft",
        "",
        (f"Machine: {machine()}. Command: `{command}`. Each run in a fresh process, the two sides alternating; "
         f"8 sequences of {LENGTHS[0]}-{LENGTHS[1]} tokens per step (2 micro-batches of 4), AdamW, clipping 1.0, one "
         "warm-up step not timed; peak memory is the largest ru_maxrss of the runs. Peer: transformers "
         "LlamaForCausalLM + peft `adaption_prompt` on the same weights and batches."),
        "",
        "| measure | ours | transformers + peft | ours / peer |",
        "|---|---|---|---|",
        *(f"| {name} | {x} | {y} | {ratio} |" for name, x, y, ratio in rows),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side, alternating")
    parser.add_argument("--write", help="replace the training section of this markdown file (e.g. BENCHMARKS.md)")
    parser.add_argument("--worker", choices=("ours", "peft"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(worker(options.worker, options.threads, options.steps)))
        return 0
    command = "python -m bench.train " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(options.threads)  # as the workers run (and as the report's machine line says)
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for _ in range(options.repeats):
        for side, done in runs.items():
            done.append(run_worker(side, options.threads, options.steps))
    results = {side: summary(done) for side, done in runs.items()}
    text = render(results, command.strip())
    publish(text, "Training (CPU, fp32)", options.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
