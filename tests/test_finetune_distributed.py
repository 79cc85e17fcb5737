"""Two processes under torchrun (gloo, CPU) compute the same global batches as one process: the adapter and
the validation losses match, and only rank 0 writes. The last step of each epoch is smaller than the
others, so one process has nothing to do in it and still takes part in the gradient all-reduce. A Ctrl-C to
torchrun stops both after the same step, and --resume goes on to the same adapter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

from adapter.finetune import TrainConfig, train
from tests.finetune_helpers import (
    alpaca_records,
    one_thread_and_own_rng,  # noqa: F401  (autouse)
    tiny_config,
    write_json,
)
from tests.test_visual import clip_files  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}


def torchrun(config: TrainConfig, out: Path, *extra: str) -> list[str]:
    """The command line that trains `config` in two processes into `out`."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
             if v is not None and not isinstance(v, bool) and k != "out"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "adapter.finetune", *flags, f"--out={out}", "--no-progress", *extra]


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_processes_reach_the_same_adapter_as_one(tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(20))
    config = tiny_config(base_folder, data, tmp_path / "one", batch_size=8, micro_batch_size=2, epochs=2,
                         val_fraction=0.1, mode="v2", lora_rank=2, lr=0.05)
    single = train(config)
    assert single.steps == 6  # 18 training examples: steps of 8, 8 and 2 per epoch

    two = tmp_path / "two"
    run = subprocess.run(torchrun(config, two), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180,
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


def test_two_processes_train_a_visual_prompt_as_one_does(tmp_path, base_folder, clip_files):
    """A process whose share of a step holds no picture leaves the visual prompt out of its graph: gloo
    aborted on the collective mismatch (the last step of 10 records in steps of 4 is one micro-batch)."""
    config_json, weights, _ = clip_files
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for index, colour in enumerate(["red", "blue", "green", "yellow", "purple"] * 2):
        Image.new("RGB", (40, 40), colour).save(folder / f"{index}.png")
        records.append({"image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": colour}]})
    data = write_json(tmp_path / "llava.json", records)
    config = tiny_config(base_folder, data, tmp_path / "one", mode="vision", image_folder=str(folder),
                         clip=str(weights), clip_model=str(config_json), visual="v1", epochs=1, batch_size=4,
                         micro_batch_size=2, lr=0.05)
    single = train(config)
    assert single.steps == 3
    two = tmp_path / "two"
    run = subprocess.run(torchrun(config, two), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = load_file(single.adapter), load_file(two / "adapter" / "adapter.safetensors")
    assert ours.keys() == theirs.keys() and any(name.startswith("visual_prompt.") for name in ours)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() < 1e-5, name


def wait_for_step(job: subprocess.Popen, out: Path, step: int) -> None:
    """Until the log in `out` has the train record of `step` (the run still going)."""
    def steps() -> list[int]:  # of the lines written whole so far
        text = (out / "log.jsonl").read_text() if (out / "log.jsonl").exists() else ""
        return [r["step"] for r in map(json.loads, text.split("\n")[:-1]) if r["type"] == "train"]

    started = time.monotonic()
    while step not in steps():
        assert job.poll() is None and time.monotonic() - started < 120, f"the run ended before step {step}"
        time.sleep(0.02)


def worker_of_rank(job: subprocess.Popen, rank: int) -> int:
    """The process id of torchrun's worker of that rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):  # ended meanwhile
            continue
        if parent == job.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {job.pid}")


def stop_at(job: subprocess.Popen, out: Path, step: int) -> tuple[int, str]:
    """Wait for the job's stop (after a signal sent at `step`): the step it stopped at, as the log, the
    checkpoint and rank 0's one line agree; and what it wrote on stderr."""
    try:
        err = job.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        job.terminate()  # torchrun ends its workers too, TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later
        raise AssertionError(f"no stop within 120 s (processes that disagree on the step wait for each other): "
                             f"{job.communicate(timeout=60)[1][-3000:]}") from None
    assert job.returncode != 0, "torchrun reports the signal or its workers' exit code 130"
    stops = re.findall(r"stopped at step (\d+): its adapter is in", err)
    assert len(stops) == 1, err[-3000:]  # said by rank 0 alone
    stopped = int(stops[0])
    assert step <= stopped < 120
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:06d}"
    assert [r["step"] for r in log_of(out) if r["type"] == "train"] == list(range(1, stopped + 1))
    return stopped, err


def test_a_signal_to_torchrun_or_one_worker_stops_every_process_after_the_same_step_and_resume_goes_on(
        tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(20))
    config = tiny_config(base_folder, data, tmp_path / "one", batch_size=8, micro_batch_size=2, epochs=40,
                         lr=0.05)
    whole = train(config)
    assert whole.steps == 120
    two = tmp_path / "two"

    # a signal to rank 1 alone (as on one machine of several): rank 0 learns it before the next step
    job = subprocess.Popen(torchrun(config, two), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_step(job, two, 3)
    os.kill(worker_of_rank(job, 1), signal.SIGTERM)
    first_stop, err = stop_at(job, two, 3)
    assert "every process stops" not in err, "only rank 0 speaks, and it was not sent the signal"

    # Ctrl-C in torchrun's terminal: torchrun passes it on to its workers
    job = subprocess.Popen(torchrun(config, two, "--resume"), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_step(job, two, first_stop + 3)
    job.send_signal(signal.SIGINT)
    second_stop, err = stop_at(job, two, first_stop + 3)
    assert err.count("SIGINT: every process stops after the step under way, its adapter and a checkpoint saved") \
        == 1, err[-3000:]

    resumed = subprocess.run(torchrun(config, two, "--resume"), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=180, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert second_stop > first_stop
    ours, theirs = load_file(whole.adapter), load_file(two / "adapter" / "adapter.safetensors")
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() < 1e-5, name
    assert [r["step"] for r in log_of(two) if r["type"] == "train"] == list(range(1, 121))
