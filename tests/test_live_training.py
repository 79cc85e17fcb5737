"""Training on a base already in memory (`adapter.finetune.RunHooks`) and the app's runs on the served base
(`adapter.live_training`): the same adapter as a run that loads the base itself, the served base untouched bit
for bit and laid out as it was, every step under the device's lock, Stop keeping what was learnt, one run at a
time, and the result served beside the other adapters."""

from __future__ import annotations

import json
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file

import adapter
from adapter import live_training
from adapter.config import AdapterArgs, ModelArgs
from adapter.engine import Engine, Engines, Settings
from adapter.finetune import RunHooks, train
from adapter.finetune.config import TrainConfig
from adapter.finetune.logs import read_log
from adapter.live_training import LiveTraining, TrainProgress, TrainRequest
from tests.finetune_helpers import (
    alpaca_records,
    one_thread_and_own_rng,  # noqa: F401  (autouse)
    tiny_config,
    write_json,
    write_jsonl,
)
from tests.test_finetune_vision import image_data  # noqa: F401  (fixture)
from tests.test_visual import CLIP_CONFIG, clip_files  # noqa: F401  (fixture)

GREEDY = Settings(temperature=0.0, max_new_tokens=8)
QUESTION = "the red circle left"


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "data.json", alpaca_records(32))


@pytest.fixture
def served(base_folder):
    """The base as the app holds it (adapter.load: wide fp32 weights laid out column-major for decoding)."""
    return adapter.load(base_folder, device="cpu")


def base_tensors(model) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Every frozen tensor of `model`, copied, with its strides (its layout in memory)."""
    return {name: (tensor.detach().clone(), tensor.stride()) for name, tensor in model.state_dict().items()
            if not model.is_adapter_parameter(name)}


class CountingRunner:
    """A step runner that counts the work it runs and checks it never runs two at once."""

    def __init__(self) -> None:
        self.lock, self.ran = threading.Lock(), 0

    def __call__(self, work):
        assert self.lock.acquire(blocking=False), "two at once"
        try:
            self.ran += 1
            return work()
        finally:
            self.lock.release()


def test_training_on_a_loaded_base_gives_the_adapter_of_a_run_that_loads_it_and_leaves_the_base_as_it_was(
        tmp_path, base_folder, data, served):
    config = dict(epochs=3, val_fraction=0.25, micro_batch_size=8)
    alone = train(tiny_config(base_folder, data, tmp_path / "alone", **config))
    before = base_tensors(served)
    assert any(stride[0] == 1 for _, stride in before.values()), "the served base has column-major weights"
    records, runner = [], CountingRunner()
    shared = train(tiny_config(base_folder, data, tmp_path / "shared", **config),
                   RunHooks(base=served, on_record=records.append, step_runner=runner))
    a, b = load_file(alone.adapter), load_file(shared.adapter)
    assert a.keys() == b.keys()
    for name in a:  # the same floats but for the order the CPU sums them in (the weights' layouts differ)
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    assert shared.val_losses[-1][1] == pytest.approx(alone.val_losses[-1][1], rel=1e-5)
    after = base_tensors(served)
    for name, (tensor, stride) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == stride, f"{name} changed"
    assert records == read_log(tmp_path / "shared" / "log.jsonl"), "the listener gets every record as written"
    assert runner.ran == 6 + 3 + 2, "each optimizer step, each validation, and putting the base in training mode and " \
        "back run as the device's work"


def test_a_stop_ends_the_run_after_its_step_with_what_it_learnt_saved(tmp_path, base_folder, data, served):
    stop = threading.Event()

    def after_two(record: dict) -> None:
        if record.get("type") == "train" and record["step"] == 2:
            stop.set()

    stopped = train(tiny_config(base_folder, data, tmp_path / "stopped", epochs=4),
                    RunHooks(base=served, on_record=after_two, stop=stop))
    assert stopped.steps == 2 and len(stopped.train_losses) == 2
    cut = train(tiny_config(base_folder, data, tmp_path / "cut", epochs=4, max_steps=2), RunHooks(base=served))
    a, b = load_file(stopped.adapter), load_file(cut.adapter)
    assert all(torch.equal(a[name], b[name]) for name in a), "stopped at step 2 = --max-steps 2"


def test_a_run_longer_than_allowed_is_refused_before_anything_is_written(tmp_path, base_folder, data, served):
    out = tmp_path / "long"
    with pytest.raises(ValueError, match=r"^epochs: 4 epoch\(s\) of 2 steps are 8 optimizer steps, more than the 5 "):
        train(tiny_config(base_folder, data, out, epochs=4), RunHooks(base=served, max_steps=5))
    assert not out.exists()


def test_the_apps_bound_on_a_runs_steps_refuses_a_longer_run_and_trains_one_within_it(tmp_path, data, served):
    from adapter.app_config import parse_config

    engines = Engines({"base": Engine(served)})
    training = LiveTraining(engines, lambda model: Engine(model, engines.default.lock), tmp_path / "runs", max_steps=6)
    with pytest.raises(ValueError, match=r"^epochs: 4 epoch\(s\) of 2 steps are 8 optimizer steps, more than the 6 a "
                                         r"run may take here"):
        list(training.run(request(data)))
    assert list(training.run(request(data, epochs=3)))[-1].steps == 6 and engines.names == ["base", "trained-1"]
    flags = ["--base", str(served.base_path)]
    assert parse_config([*flags, "--train-max-steps", "6"], environ={}).train_max_steps == 6
    assert parse_config(flags, environ={"ADAPTER_TRAIN_MAX_STEPS": "50"}).train_max_steps == 50
    assert parse_config(flags, environ={}).train_max_steps == 2000
    with pytest.raises(ValueError, match=r"^--train-max-steps: must be at least 1, got 0$"):
        parse_config([*flags, "--train-max-steps", "0"], environ={})


def live(served_model, tmp_path) -> tuple[LiveTraining, Engines]:
    engines = Engines({"base": Engine(served_model)})
    return LiveTraining(engines, lambda model: Engine(model, engines.default.lock), tmp_path / "runs"), engines


def request(data: Path | None, **overrides) -> TrainRequest:
    settings = dict(data=None if data is None else str(data), epochs=4, batch_size=16, lr=0.1, prompt_len=4,
                    prompt_layers=4)
    return TrainRequest(**{**settings, **overrides})


def test_an_infinite_learning_rate_is_refused_before_the_run(tmp_path, data):
    """(it started, and stopped on a NaN loss without naming lr)"""
    with pytest.raises(ValueError, match="^lr: must be a finite number above 0, got inf$"):
        request(data, lr=float("inf")).config("tiny", tmp_path / "run", ModelArgs(max_seq_len=128))


def test_more_adapted_layers_than_the_base_has_are_refused_by_name(tmp_path, data):
    """(they were cut to the base's layers with a note on the server's stdout, which the page does not show)"""
    shaped = ModelArgs(n_layers=4)
    refusal = "^prompt_layers: the served base has 4 layers; adapt 1 to 4 of them, got 5$"
    with pytest.raises(ValueError, match=refusal):
        request(data, prompt_layers=5).config("tiny", tmp_path / "run", shaped)
    assert request(data, prompt_layers=4).config("tiny", tmp_path / "run", shaped).prompt_layers == 4
    assert request(data, mode="lora", lora_rank=2, prompt_layers=5).config("tiny", tmp_path / "run", shaped)


@pytest.mark.parametrize("setting", ["prompt_len", "lora_rank"])
def test_a_prompt_length_or_lora_rank_beyond_the_apps_bound_is_refused_before_the_run(tmp_path, data, setting):
    """A page's lora_rank of 1,000,000 grew the app to 22.7 GB and the kernel killed it; a prompt_len of 1,000,000
    held the device for minutes."""
    from adapter.live_training import MAX_LORA_RANK, MAX_PROMPT_LEN

    bound = {"prompt_len": MAX_PROMPT_LEN, "lora_rank": MAX_LORA_RANK}[setting]
    asked = request(data, mode="v2", **{"lora_rank": 2, setting: bound + 1})
    with pytest.raises(ValueError, match=f"^{setting}: at most {bound} here .*got {bound + 1}; python -m "
                                         "adapter.finetune takes more$"):
        asked.config("tiny", tmp_path / "run", ModelArgs(n_layers=4, max_seq_len=128))
    assert request(data, mode="v2", **{"lora_rank": 2, setting: bound}).config(
        "tiny", tmp_path / "run", ModelArgs(n_layers=4, max_seq_len=128)) is not None


def test_a_live_run_shows_its_progress_and_is_served_beside_the_others(tmp_path, data, served, base_folder):
    training, engines = live(served, tmp_path)
    shown = list(training.run(request(data)))
    final = shown[-1]
    assert [p.name for p in shown[:-1]] == [None] * (len(shown) - 1) and final.name == "trained-1"
    assert engines.names == ["base", "trained-1"]
    assert final.steps == 8 and final.done == 8 and final.first_layer == 0
    assert final.status().startswith("**Trained** (step 8 / 8 · loss ") and "served as **trained-1**" in final.status()
    names = zipfile.ZipFile(final.archive).namelist()
    assert names == ["trained-1/adapter.json", "trained-1/adapter.safetensors", "trained-1/log.jsonl",
                     "trained-1/loss.png", "trained-1/gates.png"]
    unzipped = tmp_path / "unzipped"
    zipfile.ZipFile(final.archive).extractall(unzipped)
    trained = engines.get("trained-1")
    assert trained.model.tok_embeddings is served.tok_embeddings, "on the served base, not a copy"
    from_zip = adapter.load(base_folder, adapter=unzipped / "trained-1", device="cpu")
    answer = list(trained.chat([], QUESTION, GREEDY))[-1]
    assert answer == list(Engine(from_zip).chat([], QUESTION, GREEDY))[-1], "served = what the zip holds"
    base_answer = list(engines.get("base").chat([], QUESTION, GREEDY))[-1]
    at_zero = list(trained.chat([], QUESTION, Settings(temperature=0.0, max_new_tokens=8, gate_scale=0.0)))[-1]
    assert at_zero == base_answer != answer, "gate 0 is the frozen base; gate 1 what it learnt"
    assert trained.training_plot().name == "gates.png", "the Gates tab shows how its gates opened"
    assert [r["type"] for r in json.loads("[" + ",".join(
        zipfile.ZipFile(final.archive).read("trained-1/log.jsonl").decode().splitlines()) + "]")][-1] == "end"


def test_a_runs_status_says_about_how_long_is_left_at_its_own_pace():
    start = {"type": "start", "step": 0, "steps": 400, "first_prompt_layer": 0, "config": {"mode": "v1"}}
    steps = [{"type": "train", "step": s, "loss": 1.0, "tokens_per_s": 100.0} for s in range(1, 101)]
    assert TrainProgress([start, *steps], 50.0).status() == \
        "step 100 / 400 · loss 1.0000 · 100 tokens/s · 50.0 s · about 2 min 30 s left"  # 2 steps a second
    assert TrainProgress([start, *steps], 50.0, start_step=75).status().endswith(" · about 10 min 0 s left"), \
        "a resumed run's pace: its own 25 steps in 50 s"
    assert TrainProgress([start, *steps], 2400.0).status().endswith(" · about 2 h 0 min left")
    assert TrainProgress([start], 0.5).status() == "step 0 / 400 · 0.5 s", "no pace before a step"
    assert "left" not in TrainProgress([start, *steps], 50.0, name="trained-1").status(), "an ended run"


def test_only_the_owner_stops_a_live_run_and_a_stopped_run_is_served(tmp_path, data, served):
    training, engines = live(served, tmp_path)
    runs = training.run(request(data, epochs=20), owner="me")
    first = next(runs)
    assert first.name is None
    assert not training.stop("someone else") and training.stop("me")
    final = list(runs)[-1]
    assert final.name == "trained-1" and final.done < final.steps == 40
    assert final.status().startswith("**Stopped** (step ")
    assert not training.stop("me"), "no run under way any more"


def stopped_run(training: LiveTraining, data: Path, owner: str = "me"):
    """A 40-step run stopped once its progress is first shown (some steps in)."""
    runs = training.run(request(data, epochs=20), owner=owner)
    next(runs)
    assert training.stop(owner)
    return list(runs)[-1]


def adapter_tensors(engines: Engines, name: str) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in engines.get(name).model.adapter_state_dict().items()}


def test_a_stopped_run_resumed_gives_the_adapter_of_a_run_that_never_stopped_in_its_place(tmp_path, data, served):
    training, engines = live(served, tmp_path)
    stopped = stopped_run(training, data)
    assert stopped.stopped and stopped.status().endswith("Resume continues the run from this step to its end.")
    shown = list(training.resume("me"))
    final = shown[-1]
    assert [p.name for p in shown[:-1]] == [None] * (len(shown) - 1)
    assert (final.name, final.done, final.steps, engines.names) == ("trained-1", 40, 40, ["base", "trained-1"])
    assert final.status().startswith("**Trained** (step 40 / 40") and "Resume" not in final.status()
    assert [step for step, _, kind in final.loss_points() if kind == "train"] == list(range(1, 41)), \
        "the curves go on from the stopped run's"
    whole_training, whole_engines = live(served, tmp_path / "whole")
    assert list(whole_training.run(request(data, epochs=20)))[-1].done == 40
    resumed, whole = adapter_tensors(engines, "trained-1"), adapter_tensors(whole_engines, "trained-1")
    assert all(torch.equal(resumed[key], whole[key]) for key in whole), "as if it had never stopped"
    log = [json.loads(line) for line in zipfile.ZipFile(final.archive).read("trained-1/log.jsonl").splitlines()]
    assert [r["type"] for r in log].count("start") == 1 and [r["type"] for r in log if r["type"] == "end"] == ["end"]
    assert log[-1] == {**log[-1], "type": "end", "step": 40}
    from_zip = load(zipfile.ZipFile(final.archive).read("trained-1/adapter.safetensors"))
    assert all(torch.equal(from_zip[key], resumed[key]) for key in from_zip), "the zip holds the resumed adapter"
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped; Stop ends a run"):
        list(training.resume("me"))


def test_resume_needs_the_sessions_own_stopped_run_still_served_and_keeps_it_while_it_runs(tmp_path, data, served):
    training, engines = live(served, tmp_path)
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped"):
        list(training.resume("me"))
    stopped_run(training, data)
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped"):
        list(training.resume("someone else"))
    before = adapter_tensors(engines, "trained-1")
    runs = training.resume("me")
    next(runs)
    with pytest.raises(ValueError, match="^adapter: trained-1's run is being resumed in its folder; stop it first"):
        training.trained.remove("trained-1")
    runs.close()  # the page was closed: the run stops again, and what was served stays
    after = adapter_tensors(engines, "trained-1")
    assert engines.names == ["base", "trained-1"] and all(torch.equal(before[k], after[k]) for k in before)
    assert list(training.resume("me"))[-1].done == 40, "resumed again, from its last checkpoint"
    stopped_run(training, data)  # trained-2
    assert training.trained.remove("trained-2")
    with pytest.raises(ValueError, match="^resume: trained-2, the adapter of your stopped run, is served no more"):
        list(training.resume("me"))
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped"):
        list(training.resume("me"))
    stopped_run(training, data)
    training.forget("me")  # the page was closed
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped"):
        list(training.resume("me"))


def test_one_run_at_a_time_and_a_run_closed_early_serves_nothing(tmp_path, data, served):
    training, engines = live(served, tmp_path)
    runs = training.run(request(data, epochs=20))
    next(runs)
    with pytest.raises(ValueError, match="^train: another adapter is being trained here"):
        next(training.run(request(data)))
    runs.close()  # the page was closed
    assert engines.names == ["base"] and not any((tmp_path / "runs").iterdir()), "nothing kept"
    assert list(training.run(request(data, epochs=1)))[-1].name == "trained-1", "the next run may start"


def test_the_oldest_trained_adapter_gives_way(tmp_path, data, served, monkeypatch):
    monkeypatch.setattr(live_training, "MAX_TRAINED", 2)
    training, engines = live(served, tmp_path)
    archives = [list(training.run(request(data, epochs=1, seed=seed)))[-1].archive for seed in range(3)]
    assert engines.names == ["base", "trained-2", "trained-3"]
    assert not archives[0].exists() and archives[1].exists() and archives[2].exists()


def test_bad_records_and_settings_are_named_and_nothing_is_served(tmp_path, served):
    training, engines = live(served, tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "no output"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing .output."):
        list(training.run(request(bad)))
    with pytest.raises(ValueError, match="^--epochs: must be a positive integer, got 0"):
        list(training.run(request(bad, epochs=0)))
    with pytest.raises(ValueError, match="^data: give a records file"):
        list(training.run(request(None)))
    with pytest.raises(ValueError, match="^--mode: must be one of"):
        list(training.run(request(bad, mode="v3")))
    assert engines.names == ["base"] and not any((tmp_path / "runs").iterdir())


def test_a_run_out_of_device_memory_is_named_with_what_to_change_and_the_app_trains_on(tmp_path, data, served,
                                                                                       monkeypatch):
    from adapter.finetune import trainer

    real, steps = trainer.optimizer_step, []

    def step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", step)
    training, engines = live(served, tmp_path)
    with pytest.raises(ValueError, match=r"^batch_size: the device ran out of memory in a step of 16 examples of up "
                                         r"to \d+ tokens; train with a smaller batch size"):
        list(training.run(request(data)))
    assert engines.names == ["base"] and not any((tmp_path / "runs").iterdir())
    assert not any(m.training for m in served.modules()), "the served model put back"
    assert list(training.run(request(data, epochs=1)))[-1].name == "trained-1", "the next run goes"


def test_lora_alone_is_served_with_the_delta_scale_to_blend_it(tmp_path, data, served):
    training, engines = live(served, tmp_path)
    final = list(training.run(request(data, mode="lora", lora_rank=2)))[-1]
    assert "so the delta scale (Advanced) now moves between" in final.status()
    assert final.gate_points() == [] and [row[2] for row in final.loss_points()].count("train") == 8
    trained = engines.get(final.name)
    assert not trained.has_gates and trained.model.adapter_args.lora_rank == 2
    base_answer = list(engines.get("base").chat([], QUESTION, GREEDY))[-1]
    at_zero = Settings(temperature=0.0, max_new_tokens=8, delta_scale=0.0)
    assert list(trained.chat([], QUESTION, at_zero))[-1] == base_answer != list(trained.chat([], QUESTION, GREEDY))[-1]


def test_plain_text_trains_in_the_app_as_the_command_line_trains_it(tmp_path, served, base_folder):
    """A .txt file from the Train tab (one document, in windows of the run's length): the adapter the same settings
    give adapter.finetune."""
    (tmp_path / "story.txt").write_text(" ".join(f"The star {i} is red and the circle is blue." for i in range(150)))
    training, engines = live(served, tmp_path)
    asked = request(tmp_path / "story.txt", epochs=3, batch_size=2)
    final = list(training.run(asked))[-1]
    alone = train(asked.config(str(base_folder), tmp_path / "cli", served.args))
    assert final.name == "trained-1" and final.steps == alone.steps > 3, "a step per two windows, every epoch"
    served_tensors = adapter_tensors(engines, "trained-1")
    for name, value in load_file(alone.adapter).items():  # the same floats but for the order the CPU sums them in
        torch.testing.assert_close(served_tensors[name], value, rtol=1e-4, atol=1e-5)


def test_an_early_stop_ends_a_live_run_and_keep_best_serves_its_lowest_validations_adapter(tmp_path, data, served,
                                                                                            base_folder):
    training, engines = live(served, tmp_path)
    asked = request(data, epochs=10, lr=1.0, keep_best=True, early_stop=2)
    final = list(training.run(asked))[-1]
    alone = train(asked.config(str(base_folder), tmp_path / "cli", served.args))
    assert alone.early_stopped and final.done == alone.steps < final.steps == 20, "the loss rises here: it ends early"
    best_step, best_loss = alone.best_val
    assert best_step < alone.steps, "the lowest loss is not the last step's (else this would show little)"
    status = final.status()
    assert status.startswith(f"**Stopped early** (step {alone.steps} / 20 · ") and not final.stopped
    assert f" · 2 validations in a row without a loss below {best_loss:.4f} (step {best_step})" in status
    assert f" · the adapter served is step {best_step}'s, of the lowest validation loss): served as **trained-1**" \
        in status and "Resume" not in status
    served_tensors, best, last = adapter_tensors(engines, "trained-1"), load_file(alone.best), load_file(alone.adapter)
    for name, value in best.items():  # the same floats but for the order the CPU sums them in
        torch.testing.assert_close(served_tensors[name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(best[name], last[name], atol=1e-3) for name in best), "not the last step's"
    zipped = load(zipfile.ZipFile(final.archive).read("trained-1/adapter.safetensors"))
    assert all(torch.equal(zipped[name], served_tensors[name]) for name in zipped), "the zip holds what is served"
    with pytest.raises(ValueError, match="^resume: your last run here was not stopped"):
        list(training.resume())
    with pytest.raises(ValueError, match=r"^early_stop: give 0 \(never\) or how many validations"):
        list(training.run(request(data, early_stop=-1)))


def test_a_served_adapter_is_trained_further_in_its_own_kind_and_format(tmp_path, data, served, base_folder):
    training, engines = live(served, tmp_path)
    first = list(training.run(request(data)))[-1]
    served_tensors = engines.get(first.name).model.adapter_state_dict()
    # asked for LoRA at another shape: the starting adapter's own kind and shape are what trains
    again = list(training.run(request(data, start_from=first.name, lr=1e-12, epochs=1, mode="lora", prompt_len=9)))[-1]
    further = engines.get(again.name).model
    assert further.adapter_args == engines.get(first.name).model.adapter_args and again.mode == "v1"
    for name, tensor in served_tensors.items():
        torch.testing.assert_close(further.adapter_state_dict()[name], tensor, rtol=0, atol=1e-6)
    moved = list(training.run(request(data, start_from=first.name, epochs=1)))[-1]
    assert not torch.equal(engines.get(moved.name).model.adapter_state_dict()["adapter_query.weight"],
                           served_tensors["adapter_query.weight"]), "at a real learning rate it learns on"


def test_the_bare_base_an_unknown_name_and_a_blind_image_adapter_are_not_trained_further(tmp_path, data, served):
    blind = adapter.load_sharing(served, AdapterArgs(prompt_len=2, prompt_layers=2, visual="v1", clip_dim=8))
    engines = Engines({"base": Engine(served), "blind": Engine(blind)})
    training = LiveTraining(engines, lambda model: Engine(model, engines.default.lock), tmp_path / "runs")
    with pytest.raises(ValueError, match="^start_from: blind has a visual prompt but is served without its CLIP"):
        list(training.run(request(data, start_from="blind")))
    with pytest.raises(ValueError, match="^start_from: base is the frozen base without an adapter"):
        list(training.run(request(data, start_from="base")))
    with pytest.raises(ValueError, match="^start_from: adapter: 'gone' is not served here"):
        list(training.run(request(data, start_from="gone")))
    with pytest.raises(ValueError, match="^mode: vision trains a visual prompt that reads a CLIP tower, and no adapter served here sees"):
        list(training.run(request(data, mode="vision")))
    assert engines.names == ["base", "blind"] and not any((tmp_path / "runs").iterdir())


@pytest.fixture
def seeing(served, clip_files):
    """The served base with an image adapter reading a tiny CLIP tower beside the bare base, as the app serves."""
    config_json, weights, _ = clip_files
    sees = adapter.load_sharing(served, AdapterArgs(prompt_len=2, prompt_layers=2, visual="v1",
                                                    clip_dim=CLIP_CONFIG["embed_dim"], clip_model=str(config_json)),
                                clip=weights)
    return Engines({"base": Engine(served), "sees": Engine(sees)})


def test_an_image_adapter_trains_on_the_served_tower_and_is_served_with_it(tmp_path, seeing, image_data,
                                                                           base_folder, clip_files):
    _, weights, _ = clip_files
    records, folder = image_data
    tower = seeing.get("sees").model.image_encoder
    held = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    training = LiveTraining(seeing, lambda model: Engine(model, seeing.default.lock), tmp_path / "runs")
    pictures = tuple(str(p) for p in sorted(folder.iterdir()))
    asked = request(records, mode="vision", images=pictures, epochs=4, batch_size=4, prompt_len=2, prompt_layers=2)
    final = list(training.run(asked))[-1]
    assert final.mode == "vision" and "ask it about a picture in the Image tab" in final.status()
    trained = seeing.get(final.name)
    assert trained.can_see_images and trained.model.image_encoder is tower, "the served tower, not another"
    assert not tower.training and all(torch.equal(tower.state_dict()[n], t) for n, t in held.items())
    assert trained.model.adapter_args.visual == "v1" and trained.model.adapter_args.prompt_len == 2

    # the same run by adapter.finetune, loading the base and the tower itself, learns the same adapter
    log = json.loads((final.archive.parent / "run" / "log.jsonl").read_text().splitlines()[0])["config"]
    alone = train(replace(TrainConfig(**{**log, "out": str(tmp_path / "alone"), "base": str(base_folder),
                                          "clip": str(weights), "image_folder": str(folder)})))
    own = load_file(alone.adapter)
    learnt = trained.model.adapter_state_dict()
    assert any(name.startswith("visual_prompt.") for name in own)
    for name, tensor in own.items():
        torch.testing.assert_close(learnt[name].float(), tensor.float(), rtol=1e-4, atol=1e-5)

    def red_answer(picture: str, scale: float) -> float:  # log-probability of "red" for the question
        question = trained.image_prompt("What colour is the picture?")
        rows = trained.answer_logprobs(question, "red", Settings(gate_scale=scale), Image.open(folder / picture))
        return sum(row.logprob for row in rows)

    assert red_answer("red.png", 1.0) > red_answer("red.png", 0.0), "what it learnt speaks at gate 1"
    assert red_answer("red.png", 1.0) != red_answer("blue.png", 1.0), "and reads the picture"
    assert red_answer("red.png", 0.0) == red_answer("blue.png", 0.0), "gate 0: the base, blind"

    again = list(training.run(request(records, start_from=final.name, images=pictures, epochs=1, lr=1e-12)))[-1]
    further = seeing.get(again.name).model
    assert again.mode == "vision" and further.image_encoder is tower, "an image adapter trains further on its tower"
    for name, tensor in learnt.items():
        torch.testing.assert_close(further.adapter_state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_a_stopped_image_run_resumes_on_the_served_tower_to_an_uninterrupted_runs_adapter(tmp_path, seeing,
                                                                                          image_data):
    records, folder = image_data
    tower = seeing.get("sees").model.image_encoder
    pictures = tuple(str(p) for p in sorted(folder.iterdir()))
    asked = request(records, mode="vision", images=pictures, epochs=20, batch_size=4, prompt_len=2, prompt_layers=2)
    results = []
    for name, stop in (("whole", False), ("stopped", True)):
        training = LiveTraining(seeing, lambda model: Engine(model, seeing.default.lock), tmp_path / name)
        runs = training.run(asked, owner="me")
        next(runs)
        if stop:
            assert training.stop("me")
            assert list(runs)[-1].stopped
            runs = training.resume("me")
        final = list(runs)[-1]
        assert final.done == final.steps and not final.stopped
        served = seeing.get(final.name)
        assert served.can_see_images and served.model.image_encoder is tower, "on the served tower"
        results.append({key: value.clone() for key, value in served.model.adapter_state_dict().items()})
        seeing.remove(final.name)
    assert any(key.startswith("visual_prompt.") for key in results[0])
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0]), "as if it had never stopped"


def test_image_records_name_their_missing_pictures_and_need_vision_mode(tmp_path, seeing, image_data):
    records, folder = image_data
    training = LiveTraining(seeing, lambda model: Engine(model, seeing.default.lock), tmp_path / "runs")
    with pytest.raises(ValueError, match=r"llava\.json \[index 0\]: image file \S*/images/red\.png does not exist"):
        list(training.run(request(records, mode="vision", images=(str(folder / "blue.png"),))))
    pictures = tuple(str(p) for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"^image records need an adapter that sees \(--mode vision"):
        list(training.run(request(records, images=pictures)))
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "red.png").write_bytes((folder / "red.png").read_bytes())
    with pytest.raises(ValueError, match="^images: two uploads are named red.png; rename one"):
        list(training.run(request(records, mode="vision", images=(*pictures, str(twice / "red.png")))))
    assert seeing.names == ["base", "sees"] and not any((tmp_path / "runs").iterdir())


def test_the_served_layers_change_layout_only_as_the_devices_work(tmp_path, base_folder, data, monkeypatch):
    """Putting the shared base in training mode (4-bit layers re-laid out in place) and back ran outside the device's
    lock: a chat decoding meanwhile could read a layer's new codes with its old quantization state."""
    import adapter.quantize

    served = adapter.load(base_folder, quantize="nf4", device="cpu")
    inside, seen = threading.local(), []

    def step_runner(work):
        inside.now = True
        try:
            return work()
        finally:
            inside.now = False

    relaid = adapter.quantize.training_layout
    monkeypatch.setattr(adapter.quantize, "training_layout",
                        lambda model: (seen.append(("train", getattr(inside, "now", False))), relaid(model)))
    serving_state = adapter.quantize.serving_state

    def watched(model):
        restore = serving_state(model)
        return lambda: (seen.append(("restore", getattr(inside, "now", False))), restore())

    monkeypatch.setattr("adapter.finetune.trainer.serving_state", watched)
    train(tiny_config(base_folder, data, tmp_path / "run", epochs=1), RunHooks(base=served, step_runner=step_runner))
    assert ("train", True) in seen and ("restore", True) in seen and all(held for _, held in seen), seen


def test_a_4_bit_base_serves_exactly_as_before_once_a_run_on_it_ends(tmp_path, base_folder, data):
    """On a CPU with AVX512-BF16 bitsandbytes repacks 4-bit layers for inference at their first forward, and
    training needs them unpacked; the served model gets its repacked layers and its eval mode back."""
    served = adapter.load(base_folder, quantize="nf4", device="cpu")
    tokens = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.inference_mode():
        before = served(tokens)
    layers = [m for m in served.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    stored = [(m.weight.data.clone(), m.support_avx512bf16_for_cpu) for m in layers]
    train(tiny_config(base_folder, data, tmp_path / "run", epochs=2), RunHooks(base=served))
    assert not any(m.training for m in served.modules()), "back in eval mode"
    with torch.inference_mode():
        after = served(tokens)
    assert torch.equal(after, before)
    for m, (data_before, allowed) in zip(layers, stored):
        assert m.support_avx512bf16_for_cpu == allowed and torch.equal(m.weight.data, data_before)


def test_stop_without_a_run_under_way_says_one_in_the_queue_still_starts(served, tmp_path, monkeypatch):
    """A run waiting for the device could not be stopped, and the page was told no training of its was under way
    (then its run started anyway)."""
    from types import SimpleNamespace

    from adapter import app_handlers

    training, engines = live(served, tmp_path)
    told = []
    monkeypatch.setattr(app_handlers.gr, "Info", told.append)
    app_handlers.Handlers(engines, training).stop_training(SimpleNamespace(session_hash="page"))
    assert told == ["No training of yours is under way. One still waiting in the queue starts once the device is "
                    "free; reload the page to drop it."]
