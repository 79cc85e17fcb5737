"""Two processes under torchrun (gloo, CPU) compute the same global batches as one process: the adapter and
the validation losses match, and only rank 0 writes. The last step of each epoch is smaller than the
others, so one process has nothing to do in it and still takes part in the gradient all-reduce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from adapter.finetune import train
from tests.finetune_helpers import (
    alpaca_records,
    one_thread_and_own_rng,  # noqa: F401  (autouse)
    tiny_config,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_processes_reach_the_same_adapter_as_one(tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(20))
    config = tiny_config(base_folder, data, tmp_path / "one", batch_size=8, micro_batch_size=2, epochs=2,
                         val_fraction=0.1, mode="v2", lora_rank=2, lr=0.05)
    single = train(config)
    assert single.steps == 6  # 18 training examples: steps of 8, 8 and 2 per epoch

    two = tmp_path / "two"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
             if v is not None and not isinstance(v, bool) and k != "out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "adapter.finetune", *flags, f"--out={two}", "--no-progress"]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    ours, theirs = load_file(single.adapter), load_file(two / "adapter" / "adapter.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() < 1e-5, name
    one_log, two_log = log_of(tmp_path / "one"), log_of(two)
    assert [r["step"] for r in two_log if r["type"] == "train"] == list(range(1, 7))  # written once, by rank 0
    assert two_log[0]["world_size"] == 2
    for a, b in zip([r for r in one_log if r["type"] in ("train", "val")],
                    [r for r in two_log if r["type"] in ("train", "val")]):
        assert a["type"] == b["type"] and a["step"] == b["step"]
        key = "loss" if a["type"] == "train" else "val_loss"
        assert abs(a[key] - b[key]) < 1e-5
