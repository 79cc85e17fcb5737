"""Fine-tuning runs on the tiny base (CPU): the loss goes down, gates open, the frozen base is bit-for-bit
untouched (also nf4), the micro-batch split does not change the result, an interrupted run resumes to the
same adapter, a NaN loss stops the run keeping the last good checkpoint, and the command line writes the
adapter, log, plots and export."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter
from adapter import cpu_features
from adapter import push as push_module
from adapter.config import AdapterArgs
from adapter.finetune import DataError, TrainConfig, train, trainer
from adapter.finetune import step as step_module
from adapter.finetune.cli import main
from adapter.finetune.logs import read_log
from adapter.model_card import training_of
from tests.conftest import TINY, randomize_adapter
from tests.finetune_helpers import (
    alpaca_records,
    one_thread_and_own_rng,  # noqa: F401  (autouse)
    tiny_config,
    write_json,
)


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "data.json", alpaca_records(16))


def spy_on_model(monkeypatch) -> dict:
    """Keep the model `train` loads, and a copy of its frozen base as loaded."""
    seen = {}

    def load(*args, **kwargs):
        model = trainer_load(*args, **kwargs)
        seen["model"] = model
        seen["base"] = frozen_state(model)
        return model

    trainer_load = trainer.load
    monkeypatch.setattr(trainer, "load", load)
    return seen


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not model.is_adapter_parameter(k)}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode, quantize", [("v1", None), ("v2", None), ("v1", "nf4")])
def test_training_lowers_the_loss_opens_the_gates_and_leaves_the_base_untouched(
        tmp_path, base_folder, data, monkeypatch, mode, quantize):
    seen = spy_on_model(monkeypatch)
    out = tmp_path / "run"
    result = train(tiny_config(base_folder, data, out, mode=mode, quantize=quantize,
                               lora_rank=2 if mode == "v2" else 0))
    losses = result.train_losses
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    model = seen["model"]
    after = frozen_state(model)
    assert after.keys() == seen["base"].keys()
    for name, before in seen["base"].items():
        assert torch.equal(after[name], before), f"{name} changed"
    if quantize == "nf4":
        assert model.layers[0].attention.wq.weight.dtype == torch.uint8  # the packed 4-bit bytes compared above
    trained = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    assert trained.adapter_args == model.adapter_args
    assert float(trained.effective_gates().abs().min()) > 1e-3, "every head's gate has moved off zero"
    if mode == "v2":
        deltas = [p for n, p in trained.adapter_state_dict().items() if n.endswith(("bias", ".delta"))]
        assert deltas and all(float(p.abs().max()) > 0 for p in deltas)


def test_neither_the_micro_batch_split_nor_checkpointing_changes_the_result(tmp_path, base_folder, data):
    # 16 examples, 4 steps an epoch: each step's examples are the same whatever forward passes it is cut into
    whole = train(tiny_config(base_folder, data, tmp_path / "a", batch_size=4, micro_batch_size=4, epochs=2))
    split = train(tiny_config(base_folder, data, tmp_path / "b", batch_size=4, micro_batch_size=1, epochs=2,
                              gradient_checkpointing=True))
    assert max_difference(load_file(whole.adapter), load_file(split.adapter)) < 1e-4  # split otherwise: 0.57


def test_bf16_autocast_on_cpu_trains_in_bf16_and_stays_close_to_fp32(tmp_path, base_folder, data, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(cpu_features, "cpu_bf16", lambda: "emulated")  # warned about, as on an AVX2-only CPU
    seen_dtypes = []
    real = trainer.optimizer_step

    def optimizer_step(model, *args, **kwargs):
        last_linear = model.layers[-1].feed_forward.w2
        handle = last_linear.register_forward_hook(lambda module, inputs, out: seen_dtypes.append(out.dtype))
        try:
            return real(model, *args, **kwargs)
        finally:
            handle.remove()

    attention_dtypes = set()
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def attention(q, *args, **kwargs):
        attention_dtypes.add(q.dtype)
        return real_attention(q, *args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", optimizer_step)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    bf16 = train(tiny_config(base_folder, data, tmp_path / "bf16", autocast="bf16", epochs=2))
    assert seen_dtypes and set(seen_dtypes) == {torch.bfloat16}
    assert "--autocast bf16: this CPU has neither AMX nor AVX512-BF16" in capsys.readouterr().err
    assert attention_dtypes == {torch.float32}, "on CPU attention runs in fp32 (its bf16 backward is slow)"
    seen_dtypes.clear()
    fp32 = train(tiny_config(base_folder, data, tmp_path / "fp32", epochs=2))
    assert set(seen_dtypes) == {torch.float32}, "auto means fp32 on CPU"
    assert "AVX512-BF16" not in capsys.readouterr().err, "fp32 training has nothing to warn about"
    assert bf16.train_losses[-1] < bf16.train_losses[0]
    assert abs(bf16.train_losses[0] - fp32.train_losses[0]) < 0.05 * fp32.train_losses[0]
    assert load_file(bf16.adapter)["layers.3.attention.gate"].dtype == torch.float32, "master weights stay fp32"


def interrupt_at(monkeypatch, step: int) -> None:
    """Kill the run (as a KeyboardInterrupt would) when it reaches optimizer step `step`."""
    real = trainer.optimizer_step

    def optimizer_step(*args, **kwargs):
        if kwargs["step"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", optimizer_step)


def test_an_interrupted_run_resumes_to_the_same_adapter(tmp_path, base_folder, monkeypatch):
    data = write_json(tmp_path / "data.json", alpaca_records(20, with_input=True))
    settings = dict(mode="v2", lora_rank=2, epochs=3, batch_size=8, micro_batch_size=4, val_fraction=0.2, lr=0.05,
                    warmup_epochs=1, save_every=2, max_seq_len=160)
    reference = train(tiny_config(base_folder, data, tmp_path / "whole", **settings))
    assert reference.steps == 6

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(base_folder, data, killed, **settings))
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000002"
    with pytest.raises(ValueError, match="--out: .* already holds a training run; pass --resume"):
        train(tiny_config(base_folder, data, killed, **settings))
    with pytest.raises(ValueError, match="--resume: --lr differ"):
        train(tiny_config(base_folder, data, killed, resume=True, **{**settings, "lr": 0.5}))
    resumed = train(tiny_config(base_folder, data, killed, resume=True, **settings))
    assert resumed.steps == 6 and len(resumed.train_losses) == 4
    assert max_difference(load_file(reference.adapter), load_file(resumed.adapter)) <= 1e-6

    stopped = tmp_path / "stopped"
    first = train(tiny_config(base_folder, data, stopped, max_steps=3, **settings))
    assert first.steps == 3
    train(tiny_config(base_folder, data, stopped, resume=True, **settings))
    assert max_difference(load_file(reference.adapter), load_file(first.adapter)) <= 1e-6
    ends = [r["step"] for r in map(json.loads, (stopped / "log.jsonl").read_text().splitlines()) if r["type"] == "end"]
    assert ends == [6], "the end of the run cut at step 3 is not kept in the log of the run that went on"
    assert training_of(stopped / "adapter").steps == 6, "the card names the step its adapter was saved at"

    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if r["type"] == "val"] == [2, 4, 6]


def test_a_resume_refuses_changed_validation_data_and_names_a_damaged_checkpoint(tmp_path, base_folder):
    """A changed --val-data was taken, its losses logged beside the old set's (best/ and --early-stop compared
    across them); a truncated optimizer state was a traceback from inside torch."""
    data = write_json(tmp_path / "data.json", alpaca_records(8, seed=1))
    val = write_json(tmp_path / "val.json", alpaca_records(4, seed=2))
    settings = dict(val_data=str(val), epochs=2, batch_size=4)
    out = tmp_path / "run"
    train(tiny_config(base_folder, data, out, max_steps=1, **settings))
    kept = val.read_bytes()
    write_json(val, alpaca_records(4, seed=3))
    with pytest.raises(ValueError, match=f"^--val-data: {val} has changed since the checkpoint "):
        train(tiny_config(base_folder, data, out, resume=True, **settings))
    val.write_bytes(kept)
    checkpoint = out / "checkpoints" / "step-000001"
    optimizer, whole = checkpoint / "optimizer.pt", (checkpoint / "optimizer.pt").read_bytes()
    optimizer.write_bytes(whole[:100])
    with pytest.raises(ValueError, match=r"^--resume: .*step-000001 is not a readable checkpoint \(RuntimeError: "):
        train(tiny_config(base_folder, data, out, resume=True, **settings))
    optimizer.write_bytes(whole)  # (the two below were tracebacks: a TypeError and a KeyError)
    trainer_state = json.loads((checkpoint / "trainer.json").read_text())
    (checkpoint / "trainer.json").write_text(json.dumps({**trainer_state, "python_random": None}))
    with pytest.raises(ValueError, match=r"^--resume: .*step-000001 is not a readable checkpoint \(TypeError: "):
        train(tiny_config(base_folder, data, out, resume=True, **settings))
    (checkpoint / "trainer.json").write_text(json.dumps(trainer_state))
    save_file({"other": torch.zeros(1)}, checkpoint / "rng.safetensors")
    with pytest.raises(ValueError, match=r"^--resume: .*step-000001 is not a readable checkpoint \(KeyError: "):
        train(tiny_config(base_folder, data, out, resume=True, **settings))


def test_a_resume_reads_what_a_killed_run_leaves_and_names_what_it_cannot(tmp_path, base_folder):
    """A log whose last line was cut short by a kill (it was a bare "Unterminated string" error), a checkpoint
    whose `latest` pointer is missing (the run started over and removed it), a trainer state of the wrong types
    (a TypeError from deep in the trainer)."""
    data = write_json(tmp_path / "data.json", alpaca_records(8, seed=1))
    settings = dict(epochs=2, batch_size=4)
    out = tmp_path / "run"
    train(tiny_config(base_folder, data, out, max_steps=1, **settings))
    (out / "checkpoints" / "latest").unlink()
    with (out / "log.jsonl").open("a") as log:
        log.write('{"type": "tr')
    with pytest.raises(ValueError, match="--out: .* already holds a training run; pass --resume"):
        train(tiny_config(base_folder, data, out, **settings))
    trainer_state = out / "checkpoints" / "step-000001" / "trainer.json"
    kept = trainer_state.read_text()
    trainer_state.write_text(json.dumps({**json.loads(kept), "step": "one"}))
    with pytest.raises(ValueError, match=r"^--resume: .*trainer.json is not a readable trainer state \(step: 'one'\)"):
        train(tiny_config(base_folder, data, out, resume=True, **settings))
    trainer_state.write_text(kept)
    resumed = train(tiny_config(base_folder, data, out, resume=True, **settings))
    assert resumed.steps == 4 and len(resumed.train_losses) == 3, "went on from step 1"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    (out / "log.jsonl").write_text('{"type": "train", "step": 1}\n[1, 2]\n{"type": "end", "step": 4}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON object, got \[1, 2\]"):
        train(tiny_config(base_folder, data, out, resume=True, **settings))


def interrupt_at_signal(monkeypatch, step: int, times: int, signum: int = signal.SIGINT) -> None:
    """Press Ctrl-C `times` times (a real SIGINT each; or send another signal) during optimizer step `step`."""
    real = trainer.optimizer_step

    def optimizer_step(*args, **kwargs):
        for _ in range(times if kwargs["step"] == step else 0):
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", optimizer_step)


@pytest.fixture
def ctrl_c_as_python_sets_it():
    """SIGINT handled as Python sets it up in a terminal (a job started in the background ignores it, as CI's may);
    the handler before it given back after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_the_command_line_after_its_step_with_what_it_learnt_saved_and_resume_goes_on(
        tmp_path, base_folder, data, monkeypatch, capsys, ctrl_c_as_python_sets_it):
    flags = ["--base", str(base_folder), "--data", str(data), "--batch-size", "8", "--micro-batch-size", "4",
             "--epochs", "2", "--lr", "0.05", "--max-seq-len", "128", "--prompt-len", "4", "--device", "cpu",
             "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        interrupt_at_signal(patch, 3, times=1)
        patch.setenv("HF_TOKEN", "hf_not_used")
        patch.setattr(push_module, "push", lambda *args, **kwargs: pytest.fail("a stopped run is not pushed"))
        assert main([*flags, "--out", str(stopped), "--push-to-hub", "you/name"]) == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: stopping after the step under way, its adapter and a checkpoint saved (Ctrl-C again" in err
    assert f"stopped at step 3: its adapter is in {stopped / 'adapter'} (not pushed); the same command with " \
           "--resume goes on to the end" in err
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C is Python's own again"
    assert main([*flags, "--out", str(stopped), "--resume"]) == 0
    whole, resumed = load_file(tmp_path / "whole" / "adapter" / "adapter.safetensors"), \
        load_file(stopped / "adapter" / "adapter.safetensors")
    assert all(torch.equal(whole[key], resumed[key]) for key in whole), "as if it had never stopped"

    aborted = tmp_path / "aborted"
    with monkeypatch.context() as patch:
        interrupt_at_signal(patch, 3, times=2)
        assert main([*flags, "--out", str(aborted), "--save-every", "2"]) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: the last checkpoint in {aborted} (if one was written) is "
                                            "kept; the same command with --resume goes on from it\n")
    assert (aborted / "checkpoints" / "latest").read_text().strip() == "step-000002", "at once: no step-3 save"
    assert not (aborted / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started in the background: Ctrl-C is not the run's to take
    with monkeypatch.context() as patch:
        interrupt_at_signal(patch, 3, times=2)
        assert main([*flags, "--out", str(tmp_path / "ignored")]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_stops_the_command_line_after_its_step_with_what_it_learnt_saved(tmp_path, base_folder, data,
                                                                                  monkeypatch, capsys):
    """What a preemptible machine sends before it ends the job: the run stops as at Ctrl-C, exit code 143, and
    a second SIGTERM does not cut the save short."""
    def unhandled(signum: int, frame: object) -> None:  # instead of the default, which would end the test run
        raise AssertionError("SIGTERM reached the handler the run started with")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with monkeypatch.context() as patch:
            interrupt_at_signal(patch, 3, times=2, signum=signal.SIGTERM)
            assert main(["--base", str(base_folder), "--data", str(data), "--batch-size", "8", "--micro-batch-size",
                         "4", "--epochs", "2", "--lr", "0.05", "--max-seq-len", "128", "--prompt-len", "4",
                         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled, "the handler before it given back"
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after the step under way, its adapter and a checkpoint saved\n" in err
    assert "stopped at step 3: its adapter is in" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()


def test_v2_input_scales_train_from_ones_and_load_back(tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(8))
    result = train(tiny_config(base_folder, data, tmp_path / "run", mode="v2", scale=True, epochs=1, batch_size=4,
                               micro_batch_size=4, val_fraction=0.0, lr=0.05, warmup_epochs=0, max_seq_len=160))
    saved = load_file(result.adapter)
    scales = {k: v for k, v in saved.items() if k.endswith("_delta.scale")}
    assert len(scales) == 7 * TINY.n_layers and all(v.dim() == 1 for v in scales.values())
    assert max(float((v - 1).abs().max()) for v in scales.values()) > 1e-3, "the scales moved from their ones"
    loaded = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    assert loaded.adapter_args.scale and torch.equal(loaded.layers[1].feed_forward.w2_delta.scale,
                                                     saved["layers.1.feed_forward.w2_delta.scale"])


def test_lora_and_bias_targets_choose_the_linears_that_learn(tmp_path, base_folder, data):
    result = train(tiny_config(base_folder, data, tmp_path / "run", mode="v2", lora_rank=2, lora_targets="wq,wv",
                               bias_targets="wk,w2", epochs=1))
    saved = load_file(result.adapter)
    lora = {k.split(".")[-3].removesuffix("_delta") for k in saved if ".lora_up." in k}
    biases = {k.split(".")[-2].removesuffix("_delta") for k in saved if k.endswith("_delta.bias")}
    assert (lora, biases) == ({"wq", "wv"}, {"wk", "w2"})
    loaded = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    assert (loaded.adapter_args.lora_targets, loaded.adapter_args.bias_targets) == (("wq", "wv"), ("wk", "w2"))


def test_keep_best_keeps_the_adapter_of_the_lowest_validation_loss_across_a_resume(tmp_path, base_folder):
    from adapter.evaluate import evaluate

    data = write_json(tmp_path / "data.json", alpaca_records(8, seed=1))
    val = write_json(tmp_path / "val.json", alpaca_records(8, seed=2))
    settings = dict(val_data=str(val), keep_best=True, epochs=8, lr=0.05, mode="v2", lora_rank=8, batch_size=8)
    whole = train(tiny_config(base_folder, data, tmp_path / "whole", **settings))
    step, loss = min(whole.val_losses, key=lambda pair: pair[1])
    assert whole.best_val == (step, loss) and whole.best == tmp_path / "whole" / "best" / "adapter.safetensors"
    assert step < whole.steps, "here the last epoch is not the best (else this would show little)"
    for path, expected in ((whole.best, loss), (whole.adapter, whole.val_losses[-1][1])):
        model = adapter.load(base_folder, adapter=path, device="cpu")
        scored = evaluate(model, val, gate_scales=[1.0], max_seq_len=128).scores[0]
        assert scored.loss == pytest.approx(expected, rel=1e-5)
    saved = json.loads((whole.best.parent / "adapter.json").read_text())
    assert (saved["step"], float(saved["val_loss"])) == (str(step), loss)

    for stop in (step - 1, step + 1):  # resumed before the best epoch, and after it (the best read from the log)
        out = tmp_path / f"stopped-{stop}"
        train(tiny_config(base_folder, data, out, max_steps=stop, **settings))
        resumed = train(tiny_config(base_folder, data, out, resume=True, **settings))
        assert resumed.best_val == whole.best_val
        assert max_difference(load_file(resumed.best), load_file(whole.best)) <= 1e-6
    # --keep-best first given on resuming: the lowest loss since (it named a best/ never written, from the log)
    out = tmp_path / "added"
    train(tiny_config(base_folder, data, out, max_steps=step + 1, **{**settings, "keep_best": False}))
    added = train(tiny_config(base_folder, data, out, resume=True, **settings))
    assert added.best.is_file()
    assert added.best_val == min((pair for pair in whole.val_losses if pair[0] > step + 1), key=lambda pair: pair[1])


def test_early_stop_ends_the_run_once_its_patience_is_spent_and_a_resume_keeps_it_ended(tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(8, seed=1))
    val = write_json(tmp_path / "val.json", alpaca_records(8, seed=2))
    settings = dict(val_data=str(val), keep_best=True, epochs=8, lr=0.05, mode="v2", lora_rank=8, batch_size=8)
    whole = train(tiny_config(base_folder, data, tmp_path / "whole", **settings))
    losses = [loss for _, loss in whole.val_losses]  # one validation a step
    for patience in (1, 2):
        # where patience runs out: the first validation `patience` after the lowest so far
        due = next(j for j in range(len(losses)) if j - min(range(j + 1), key=lambda i: (losses[i], i)) >= patience)
        assert due + 1 < whole.steps, "the loss rises before the end here (else this would show little)"
        out = tmp_path / f"patience-{patience}"
        early = train(tiny_config(base_folder, data, out, early_stop=patience, **settings))
        assert (early.steps, early.early_stopped, early.stopped) == (due + 1, True, False)
        assert early.best_val == min(whole.val_losses[:due + 1], key=lambda pair: pair[1])
        log = read_log(out / "log.jsonl")
        assert [r for r in log if r["type"] == "early_stop"] == [
            {"type": "early_stop", "step": due + 1, "best_step": early.best_val[0], "best_val_loss": early.best_val[1]}]
        assert early.best_val == whole.best_val and max_difference(load_file(early.best), load_file(whole.best)) \
            <= 1e-6, "the lowest loss comes before the rise here: the best adapter is the whole run's"
        again = train(tiny_config(base_folder, data, out, early_stop=patience, resume=True, **settings))
        assert again.steps == due + 1 and again.early_stopped and again.train_losses == [], "it stays ended"
    longer = train(tiny_config(base_folder, data, tmp_path / "patience-1", early_stop=8, resume=True, **settings))
    assert longer.steps == whole.steps and not longer.early_stopped, "more patience on resume: it goes on"
    assert max_difference(load_file(longer.adapter), load_file(whole.adapter)) <= 1e-6
    with pytest.raises(ValueError, match=r"--early-stop: needs a validation set"):
        tiny_config(base_folder, data, tmp_path / "run", early_stop=2)
    with pytest.raises(ValueError, match=r"--early-stop: must be a positive integer, got 0"):
        tiny_config(base_folder, data, tmp_path / "run", early_stop=0, val_fraction=0.25)


def test_a_set_with_no_response_token_within_max_seq_len_is_refused(tmp_path, base_folder, data):
    """Every example cut before its answer: the loss would read 0 (and a validation set's 0 would be the best)."""
    with pytest.raises(DataError, match=r"^--data: none of the 16 training examples keeps a response token within "
                                        r"--max-seq-len 8 \(each is cut before its answer\), so its loss would read 0"):
        train(tiny_config(base_folder, data, tmp_path / "run", max_seq_len=8))
    long = write_json(tmp_path / "long.json", [{"instruction": "star " * 120, "output": "Red."}] * 2)
    with pytest.raises(DataError, match=r"^--val-data: none of the 2 validation examples keeps a response token"):
        train(tiny_config(base_folder, data, tmp_path / "run", val_data=str(long)))
    assert not (tmp_path / "run").exists()


def test_keep_best_needs_a_validation_set(tmp_path, base_folder, data):
    with pytest.raises(ValueError, match=r"--keep-best: needs a validation set \(--val-fraction above 0"):
        tiny_config(base_folder, data, tmp_path / "run", keep_best=True)
    one = write_json(tmp_path / "one.json", alpaca_records(1))
    with pytest.raises(ValueError, match=r"--keep-best: 1 record\(s\) leave no validation example"):
        train(tiny_config(base_folder, one, tmp_path / "run", keep_best=True, val_fraction=0.5))
    assert not (tmp_path / "run").exists()


def test_val_every_validates_between_epochs_without_changing_what_is_learnt(tmp_path, base_folder):
    data = write_json(tmp_path / "data.json", alpaca_records(32))
    settings = dict(epochs=4, batch_size=8, micro_batch_size=8, val_fraction=0.25)  # 3 steps an epoch, 12 in all
    per_epoch = train(tiny_config(base_folder, data, tmp_path / "epochs", **settings))
    often = train(tiny_config(base_folder, data, tmp_path / "often", val_every=5, **settings))
    spread = train(tiny_config(base_folder, data, tmp_path / "spread", **settings), trainer.RunHooks(validations=5))
    assert [step for step, _ in per_epoch.val_losses] == [3, 6, 9, 12]
    assert [step for step, _ in often.val_losses] == [5, 10, 12], "every 5 steps, and at the end"
    assert [step for step, _ in spread.val_losses] == [0, 3, 6, 9, 12], "first, then 5 over 12 steps: every 3"
    a, b = load_file(per_epoch.adapter), load_file(often.adapter)
    assert all(torch.equal(a[name], b[name]) for name in a), "validating does not change the training"
    assert dict(often.val_losses)[12] == dict(per_epoch.val_losses)[12]
    with pytest.raises(ValueError, match="^--val-every: must be a positive integer, got 0"):
        tiny_config(base_folder, data, tmp_path / "bad", val_every=0)


def test_a_run_stopped_between_validations_validates_on_schedule_when_resumed(tmp_path, base_folder):
    """--max-steps (as a signal) stops off the schedule: no validation of its own there, which would go into the
    checkpoint's history, best/ and early stop; a resumed run's validations are an uninterrupted run's, once."""
    data = write_json(tmp_path / "data.json", alpaca_records(32))
    settings = dict(epochs=4, batch_size=8, micro_batch_size=8, val_fraction=0.25, val_every=5, keep_best=True)
    whole = train(tiny_config(base_folder, data, tmp_path / "whole", **settings))
    out = tmp_path / "stopped"
    stopped = train(tiny_config(base_folder, data, out, max_steps=7, **settings))
    assert [step for step, _ in stopped.val_losses] == [5]
    resumed = train(tiny_config(base_folder, data, out, resume=True, **settings))
    again = train(tiny_config(base_folder, data, out, resume=True, **settings))  # the run had ended: nothing new
    assert resumed.val_losses == [pair for pair in whole.val_losses if pair[0] > 7] and again.val_losses == []
    validated = [(r["step"], r["val_loss"]) for r in read_log(out / "log.jsonl") if r["type"] == "val"]
    assert validated == whole.val_losses == [(5, whole.val_losses[0][1]), (10, whole.val_losses[1][1]),
                                             (12, whole.val_losses[2][1])]
    assert resumed.best_val == whole.best_val


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, base_folder, data, monkeypatch,
                                                                      capsys):
    calls = []
    real = step_module.micro_batch_loss

    def poisoned(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) > 8 else loss  # 4 micro-batches a step: step 3 on

    monkeypatch.setattr(step_module, "micro_batch_loss", poisoned)
    out = tmp_path / "run"
    config = tiny_config(base_folder, data, out, save_every=2)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
            if v is not None and not isinstance(v, bool)]
    assert main(argv + ["--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "error: step 3: the loss is nan; training stopped; the last good checkpoint (step 2) is kept" in error
    checkpoint = out / "checkpoints" / "step-000002"
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "adapter.safetensors").values())
    assert not (out / "adapter").exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["type"] == "stopped"


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "python"])
def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_last_good_one_resumes(tmp_path, base_folder, data,
                                                                                    monkeypatch, capsys, writer):
    """A full disk made torch.save raise RuntimeError ("unexpected pos 64 vs 0") and safetensors its own error: a
    traceback from inside them at a checkpoint, after the run's work. Now one line naming the checkpoint's folder
    (and the space left), the half-written one removed, the last good one kept for --resume."""
    from safetensors import SafetensorError

    from adapter.finetune import checkpoint as checkpoint_module
    from adapter.formats import common

    failures = {"torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                               "error 28)"),
                "python": OSError(28, "No space left on device")}

    def full_disk(real):
        def write(*args, **kwargs):
            if any(".step-000004." in str(arg) for arg in args):  # into the second checkpoint's temporary folder
                raise failures[writer]
            return real(*args, **kwargs)
        return write

    if writer == "torch.save":
        monkeypatch.setattr(checkpoint_module.torch, "save", full_disk(torch.save))
    elif writer == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full_disk(safetensors.torch.save_file))
    else:
        monkeypatch.setattr(common.Path, "write_text", full_disk(common.Path.write_text))
    out = tmp_path / "run"
    config = tiny_config(base_folder, data, out, save_every=2)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items()
            if v is not None and not isinstance(v, bool)]
    assert main(argv + ["--no-progress"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(error) == 1 and error[0].startswith(f"error: {out / 'checkpoints' / 'step-000004'}: could not be "
                                                   f"written ({failures[writer]}); "), error
    assert error[0].endswith(" free on its disk")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    monkeypatch.undo()
    resumed = train(tiny_config(base_folder, data, out, save_every=2, resume=True))
    assert resumed.steps == 4 and len(resumed.train_losses) == 2, "went on from the last good checkpoint"


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_ended_before_its_first_checkpoint_starts_over(tmp_path, base_folder, data, monkeypatch, capsys,
                                                                  resume):
    """A second Ctrl-C (or a failure) in the first step leaves a log and no checkpoint: the same command, with
    --resume or without, starts the run over (the folder was refused both ways)."""
    real = step_module.micro_batch_loss

    def interrupted(model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module, "micro_batch_loss", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(base_folder, data, out))
    assert (out / "log.jsonl").is_file() and not (out / "checkpoints").exists()
    monkeypatch.setattr(step_module, "micro_batch_loss", real)
    again = train(tiny_config(base_folder, data, out, resume=resume))
    assert "holds a run that ended before its first checkpoint: starting it over" in capsys.readouterr().err
    clean = train(tiny_config(base_folder, data, tmp_path / "clean"))
    assert max_difference(load_file(again.adapter), load_file(clean.adapter)) == 0
    assert [r["type"] for r in read_log(out / "log.jsonl")] == [r["type"] for r in read_log(tmp_path / "clean" /
                                                                                            "log.jsonl")]


def test_the_command_line_writes_adapter_log_plots_and_export(tmp_path, base_folder, data, capsys):
    out = tmp_path / "run"
    code = main(["--base", str(base_folder), "--data", str(data), "--out", str(out), "--batch-size", "8",
                 "--micro-batch-size", "4", "--max-seq-len", "128", "--prompt-len", "10", "--max-steps", "2",
                 "--export", "official-v1", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--prompt-layers 30 is more than the base's 4 layers; using 4" in err
    assert "0 longer than --max-seq-len 128 were cut" in err
    for name in ("adapter/adapter.safetensors", "adapter/adapter.json", "log.jsonl", "loss.png", "gates.png",
                 "llama_adapter_len10_layer4.pth", "checkpoints/step-000002/optimizer.pt"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log] == ["start", "train", "train", "val", "end"]
    first = log[1]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= first.keys()
    assert len(first["gates"]) == 4 and len(first["gates"][0]) == 4
    assert first["lr"] == pytest.approx(0.0)  # the official warm-up starts at zero
    native = adapter.load(base_folder, adapter=out / "adapter", device="cpu")
    official = adapter.load(base_folder, adapter=out / "llama_adapter_len10_layer4.pth", device="cpu")
    assert torch.allclose(native.effective_gates(), official.effective_gates())
    assert main(["--base", str(base_folder), "--data", str(data), "--out", str(tmp_path / "p"),
                 "--export", "peft"]) == 2
    assert "--export peft: PEFT's adaption_prompt has one raw gate per layer" in capsys.readouterr().err


def init_file(source: str, base_folder: Path, folder: Path) -> Path:
    """An adapter in another format to start from: the official v1 release layout (raw gates) or a litgpt
    adapter v2 (output scales, tuned head, litgpt 0.5.5+'s prompt keys/values)."""
    from adapter.formats.official import write_official_v1
    from tests.test_litgpt_format import litgpt_state, write

    if source == "litgpt-v2":
        return write(folder, litgpt_state(TINY, v2="qkv"), name="lit_model.pth.adapter_v2")
    model = randomize_adapter(adapter.load(base_folder, adapter=AdapterArgs(prompt_len=4, prompt_layers=2,
                                                                             gate_activation="raw"), device="cpu"))
    folder.mkdir()
    return write_official_v1(model, folder / "llama_adapter_len4_layer2.pth")


@pytest.mark.parametrize("source, mode", [("official-v1", "v1"), ("litgpt-v2", "v2")])
def test_training_can_start_from_an_adapter_in_another_format(tmp_path, base_folder, data, source, mode):
    path = init_file(source, base_folder, tmp_path / "init")
    start = adapter.load(base_folder, adapter=path, device="cpu")
    still = train(tiny_config(base_folder, data, tmp_path / "still", mode=mode, init_adapter=str(path), lr=1e-12,
                              epochs=1, weight_decay=0.0))
    assert max_difference(load_file(still.adapter), start.adapter_state_dict()) < 1e-6, "it starts from the file"
    result = train(tiny_config(base_folder, data, tmp_path / "run", mode=mode, init_adapter=str(path), lr=0.02))
    trained = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    assert trained.adapter_args == start.adapter_args, "its shape, gate activation and prompt reading kept"
    assert result.train_losses[-1] < result.train_losses[0], result.train_losses
    assert max_difference(trained.adapter_state_dict(), start.adapter_state_dict()) > 1e-3


def test_init_adapter_must_match_the_mode_and_the_prompt_format(tmp_path, base_folder, data):
    path = init_file("litgpt-v2", base_folder, tmp_path / "init")
    with pytest.raises(ValueError, match=r"--init-adapter: .*lit_model.pth.adapter_v2 is a v2 adapter \(bias, output "
                                         r"scale, norm, head bias/scale\); train it with --mode v2"):
        train(tiny_config(base_folder, data, tmp_path / "a", init_adapter=str(path)))
    with pytest.raises(ValueError, match="--prompt-format: .* was trained in the alpaca prompt format; continue it "
                                         "with --prompt-format alpaca"):
        train(tiny_config(base_folder, data, tmp_path / "b", mode="v2", init_adapter=str(path),
                          prompt_format="llama2"))
    with pytest.raises(ValueError, match="--lora-rank: the adapter's shape comes from --init-adapter"):
        tiny_config(base_folder, data, tmp_path / "c", mode="v2", init_adapter=str(path), lora_rank=4)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_mode_lora_trains_lora_alone_and_exports_it_as_peft(tmp_path, base_folder, data, capsys):
    """The baseline the adapters are compared with: no prompts, no gates.png, the loss lower, the base untouched at
    delta scale 0, and peft loads the export with our logits."""
    import peft

    from bench.peers import hf_llama

    out = tmp_path / "lora"
    code = main(["--base", str(base_folder), "--data", str(data), "--out", str(out), "--mode", "lora",
                 "--lora-rank", "4", "--lora-targets", "wq,wk,w2", "--batch-size", "16", "--micro-batch-size", "4",
                 "--epochs", "3", "--warmup-epochs", "0", "--lr", "0.02", "--val-fraction", "0", "--export", "peft",
                 "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert not (out / "gates.png").exists() and (out / "loss.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert losses[-1] < losses[0] and log[1]["gates"] == []
    ours = adapter.load(base_folder, adapter=out / "adapter", device="cpu")
    assert not ours.adapter_args.has_prompts and ours.adapter_args.lora_targets == ("wq", "wk", "w2")
    tokens = torch.tensor([[1, 45, 300, 7, 99, 12, 5]])
    base = adapter.load(base_folder, device="cpu")
    with torch.no_grad():
        assert torch.equal(ours(tokens, delta_scale=0.0), base(tokens))
        assert not torch.allclose(ours(tokens), base(tokens), atol=1e-4)
        theirs = peft.PeftModel.from_pretrained(hf_llama(base), out / "peft").eval()
        assert torch.allclose(ours(tokens), theirs(tokens).logits.float(), atol=1e-5)
    assert main(["--base", str(base_folder), "--data", str(data), "--out", str(tmp_path / "x"), "--mode", "lora"]) == 2
    assert "--mode lora trains LoRA alone: give its rank" in capsys.readouterr().err


def test_the_embedded_tiny_base_is_named_as_every_command_line_names_it(tmp_path):
    from adapter.app_config import tiny_available
    from adapter.convert import convert
    from adapter.finetune.trainer import base_args
    from adapter.tiny.assets import ASSETS

    if not tiny_available():
        pytest.skip("assets/tiny not built yet")
    assert base_args("tiny") == adapter.load("tiny", device="cpu").args
    lora = AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=2, lora_targets=("wq",))
    adapter.save_adapter(randomize_adapter(adapter.load("tiny", adapter=lora, device="cpu")), tmp_path / "lora")
    assert (convert(tmp_path / "lora", tmp_path / "peft", "peft", "tiny") / "adapter_config.json").is_file()
    written, shipped = convert("tiny-text", tmp_path / "text", "native", "tiny"), load_file(ASSETS / "text" /
                                                                                           "adapter.safetensors")
    assert all(torch.equal(tensor, shipped[name]) for name, tensor in load_file(written).items()), \
        "the embedded adapter, named as every command line names it"


def test_finetune_takes_the_tiny_models_names_and_fits_its_context_by_default(tmp_path):
    """--init-adapter tiny-image and --clip tiny were missing paths (and the error named "adapter:"); without
    --max-seq-len the default 512 was refused on the tiny base's 256."""
    from adapter.app_config import tiny_available
    from adapter.tiny.assets import ASSETS

    if not tiny_available():
        pytest.skip("assets/tiny not built yet")
    folder = ASSETS / "examples"
    records = [{"image": "00.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                                     {"from": "gpt", "value": "red"}]}]
    data = write_json(tmp_path / "llava.json", records * 2)
    settings = dict(base="tiny", data=str(data), epochs=1, batch_size=2, micro_batch_size=2, val_fraction=0,
                    lr=1e-12, warmup_epochs=0, progress=False, device="cpu", image_folder=str(folder), mode="vision")
    result = train(TrainConfig(out=str(tmp_path / "image"), init_adapter="tiny-image", clip="tiny", **settings))
    trained = load_file(result.adapter)
    shipped = load_file(ASSETS / "image" / "adapter.safetensors")
    assert trained.keys() == shipped.keys() and max_difference(trained, shipped) < 1e-6, "lr 1e-12: as it was"
    assert json.loads((tmp_path / "image" / "checkpoints" / "step-000001" / "trainer.json").read_text())[
        "config"]["max_seq_len"] == 256, "the base's context, where shorter than 512"
    text = dict(settings, data=str(write_json(tmp_path / "text.json", alpaca_records(2))), image_folder=None,
                mode="v2")
    with pytest.raises(FileNotFoundError, match="^--init-adapter: nowhere does not exist$"):
        train(TrainConfig(out=str(tmp_path / "none"), init_adapter="nowhere", **text))


def test_one_epoch_from_the_command_line_warms_up_over_that_epoch(base_folder, data, tmp_path, capsys):
    """The flag's default was TrainConfig()'s resolved 2 epochs (of its default 5), so `--epochs 1` was refused."""
    out = tmp_path / "one"
    code = main(["--base", str(base_folder), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--prompt-len", "2", "--prompt-layers", "1", "--batch-size", "4", "--micro-batch-size", "4",
                 "--max-steps", "1", "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["config"]["epochs"] == 1 and start["config"]["warmup_epochs"] == 1.0


@pytest.mark.parametrize("change, message", [
    # each was a TypeError naming no setting ("'>=' not supported between instances of 'NoneType' and 'int'")
    ({"weight_decay": None}, "--weight-decay: must be a number, got None"),
    ({"lr": "0.1"}, "--lr: must be a number, got '0.1'"),
    ({"warmup_epochs": [1]}, r"--warmup-epochs: must be a number, got \[1\]"),
    ({"clip_grad": float("nan")}, "--clip-grad: must be a number, got nan"),
    ({"lora_targets": 5, "mode": "v2", "lora_rank": 2}, "--lora-targets: must be text, got 5"),
    ({"prompt_format": {}}, r"--prompt-format: must be text, got \{\}"),
    # taken as 1 and 'yes'
    ({"lora_rank": True, "mode": "v2"}, "--lora-rank: must be a non-negative integer, got True"),
    ({"keep_best": "yes"}, "--keep-best: must be true or false, got 'yes'"),
])
def test_a_setting_of_the_wrong_kind_is_named_from_python(tmp_path, change, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        tiny_config(tmp_path / "base", tmp_path / "data.json", tmp_path / "run", **change)
