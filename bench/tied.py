"""Tied head: the memory a Llama 3.2 1B-shaped HF checkpoint (tied embeddings, random bf16 weights, 2.5 GB
written once) takes loaded as `adapter.load` loads it, the head being the embedding matrix itself, beside the
same weights saved with a separate `lm_head` copy, which a loader must hold twice.

    python -m bench.tied [--folder /tmp/llama32-1b-random] [--threads 2] [--smoke] [--write BENCHMARKS.md]

Each load runs in a fresh process: the bytes of its distinct parameter tensors (what a GPU holds), its resident
memory after loading (VmRSS) and its peak while loading (VmHWM), and its resident memory after one forward pass:
16-bit tensors are read in place from the memory-mapped file, so on a CPU their pages count only once a forward
pass has touched them. The logits of that pass must be equal between the two (the same numbers, held once or
twice).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.args import positive_int, run_main
from bench.decode import machine
from bench.report import command_line, publish, table, versions

HEADING = "Tied head (CPU)"
VARIANTS = ("tied", "untied")  # the checkpoint as shipped; the same weights with lm_head saved on its own
MODES = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "nf4": ("bfloat16", "nf4")}
# Llama 3.2 1B: 2048 wide, 16 layers, 32 heads (8 kv), SwiGLU 8192, vocab 128256, llama3 RoPE x32, tied
LLAMA32_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 8192, "vocab_size": 128256}
SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 4096}


def hf_config(shape: dict, tied: bool) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": tied,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, **shape}


def write_folders(root: Path, shape: dict) -> dict[str, Path]:
    """`root/tied` (config + model.safetensors without lm_head, as Meta ships Llama 3.2 on the hub) and
    `root/untied`: the same file (linked) plus head.safetensors holding a copy of the embeddings."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapter.random_model import train_tokenizer

    folders = {variant: root / variant for variant in VARIANTS}
    weights = folders["tied"] / "model.safetensors"
    if not weights.is_file():
        folders["tied"].mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            reference = LlamaForCausalLM(LlamaConfig(**hf_config(shape, True)))
        generator = torch.Generator().manual_seed(0)
        state = {}
        for name, tensor in reference.state_dict().items():
            if name != "lm_head.weight":
                values = torch.ones(tensor.shape) if name.endswith("norm.weight") else torch.randn(
                    tensor.shape, generator=generator) * 0.02
                state[name] = values.to(torch.bfloat16)
        save_file(state, folders["tied"] / "model.safetensors.partial")
        (folders["tied"] / "model.safetensors.partial").rename(weights)
        untied = folders["untied"]
        untied.mkdir(parents=True, exist_ok=True)
        save_file({"lm_head.weight": state["model.embed_tokens.weight"].clone()}, untied / "head.safetensors")
        index = {"weight_map": {**dict.fromkeys(state, "weights.safetensors"), "lm_head.weight": "head.safetensors"}}
        (untied / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
        link = untied / "weights.safetensors"
        link.unlink(missing_ok=True)
        link.symlink_to(weights)
        for variant, folder in folders.items():
            config = json.dumps(hf_config(shape, variant == "tied"), indent=2)
            (folder / "config.json").write_text(config, encoding="utf-8")
            train_tokenizer(folder / "tokenizer.model")  # small: the benchmark only needs the weights
    return folders


def worker(folder: str, mode: str, logits_path: str) -> dict:
    """In this (fresh) process: load, measure, run one forward pass and save its logits."""
    import adapter
    from bench.rss import current_mb, peak_mb

    dtype, quantize = MODES[mode]
    model = adapter.load(folder, device="cpu", dtype=dtype, quantize=quantize)
    loaded, peak = current_mb(), peak_mb()
    tensors = {id(p): p for p in model.parameters()}  # one entry per distinct tensor
    parameter_mb = sum(p.numel() * p.element_size() for p in tensors.values()) / 2**20
    tokens = torch.tensor([model.tokenizer.encode("The red circle is above the blue square.")])
    with torch.no_grad():
        torch.save(model(tokens)[0, -1].clone(), logits_path)
    return {"loaded_mb": loaded, "peak_mb": peak, "parameter_mb": parameter_mb, "used_mb": current_mb(),
            "shared": model.output.weight is model.tok_embeddings.weight}


def run_worker(folder: Path, mode: str, logits: Path, threads: int) -> dict:
    code = ("import json, sys, torch; from bench.tied import worker; torch.set_num_threads(int(sys.argv[4])); "
            "print(json.dumps(worker(sys.argv[1], sys.argv[2], sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, str(folder), mode, str(logits), str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.tied worker ({folder.name}, {mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tied", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="where the checkpoints are written once (default /tmp/llama32-1b-random; "
                                         "a temporary folder with --smoke)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape: checks the harness")
    parser.add_argument("--write", help="replace this benchmark's section of a markdown file (e.g. BENCHMARKS.md)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(options.folder or (scratch if options.smoke else "/tmp/llama32-1b-random"))
        folders = write_folders(root, SMOKE if options.smoke else LLAMA32_1B)
        rows, checks = [], []
        for mode in MODES:
            results = {}
            for variant in VARIANTS:
                logits = Path(scratch) / f"{mode}-{variant}.pt"
                results[variant] = run_worker(folders[variant], mode, logits, options.threads)
                results[variant]["logits"] = torch.load(logits, weights_only=True)
            tied, untied = results["tied"], results["untied"]
            if not tied["shared"] or untied["shared"]:
                raise RuntimeError(f"bench.tied: {mode}: expected the tied load to share its head and the other not")
            difference = float((tied["logits"] - untied["logits"]).abs().max())
            checks.append(f"{mode}: logits of the two loads differ by at most {difference:.1e}")
            for measure, key in (("distinct parameter tensors, MB", "parameter_mb"),
                                 ("resident after loading, MB", "loaded_mb"), ("peak while loading, MB", "peak_mb"),
                                 ("resident after one forward pass, MB", "used_mb")):
                rows.append((mode, measure, f"{tied[key]:.0f}", f"{untied[key]:.0f}", f"{tied[key] / untied[key]:.2f}"))
    shape = SMOKE if options.smoke else LLAMA32_1B
    text = "\n".join([
        f"## {HEADING}", "",
        f"Machine: {machine()}; {versions()}. Command: "
        f"`{command_line('bench.tied', argv)}`. A Llama 3.2 1B-shaped HF checkpoint ({shape['hidden_size']} wide, "
        f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, tied embeddings, random bf16 weights), "
        "each load in a fresh process. Tied: the checkpoint as shipped, loaded with the head reading the embedding "
        "tensor itself; untied: the same weights with lm_head saved as a copy (what a loader that copies the "
        "embeddings into the head holds). 16-bit weights are read in place from the memory-mapped file, so their "
        "pages count as resident only once the forward pass has touched them, and a forward pass reads only the "
        "embedding rows of its tokens: on a CPU an untied 16-bit head costs little more than a tied one, while a "
        "GPU, which copies every tensor, holds the distinct parameter bytes. Checked first: "
        + "; ".join(checks) + ".", "",
        *table(("precision", "measure", "tied (shared)", "untied (copy)", "tied / untied"), rows), "",
    ])
    publish(text, HEADING, options.write, smoke=options.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
