"""The app's serving logic without gradio: settings, prompts that fit, cancellation, the gate views, the model
panel, and the flags (`python app.py` stops with one line before loading anything)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import adapter
import app
from adapter.app_config import NO_ADAPTER, TINY_FOLDER, check_listening, load_engines, parse_config, tiny_available
from adapter.engine import Engine, Settings, check_text, device_lock, gate_scales
from adapter.footprint import footprint
from adapter.gate_layers import describe, gate_scale_rows
from adapter.gate_view import find_gate_plot
from adapter.openai_api import main as openai_api_main
from adapter.prompts import STOP_STRINGS
from adapter.random_demo import DemoFiles, write_random_demo
from tests import app_helpers
from tests.app_helpers import QUESTION, one_torch_thread
from tests.conftest import V1, randomize_adapter

ROOT = Path(__file__).resolve().parent.parent
GREEDY = Settings(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def demo_files(base_folder, tmp_path_factory) -> DemoFiles:
    return write_random_demo(tmp_path_factory.mktemp("demo"), base=base_folder)


@pytest.fixture(scope="module")
def engine(demo_files) -> Engine:
    model = adapter.load(demo_files.base, adapter=demo_files.adapter, clip=demo_files.clip,
                         clip_model=str(demo_files.clip_model), device="cpu")
    return Engine(model, max_new_tokens=64)


@pytest.mark.parametrize("field, value, message", [
    ("gate_scale", 2.5, r"gate_scale: must be in \[0, 2\], got 2.5"),
    ("gate_scale", float("nan"), "gate_scale: expected a number"),
    ("delta_scale", -0.1, r"delta_scale: must be in \[0, 2\]"),
    ("temperature", 3, r"temperature: must be in \[0, 2\]"),
    ("top_p", 0.0, r"top_p: must be in \(0, 1\]"),
    ("top_p", "0.5", "top_p: expected a number"),
    ("max_new_tokens", 0, "max_new_tokens: must be >= 1"),
    ("max_new_tokens", 2.5, "max_new_tokens: expected a whole number"),
    ("seed", -1, "seed: must be a whole number from 0 to 9223372036854775807, got -1"),
    ("gate_layers", 3, "gate_layers: expected text such as 'all', 'top 2', '28-31' or '31:0-3', got 3"),
    ("gate_layers", "1," * 150, r"gate_layers: 300 characters is too long \(at most 200\)"),
])
def test_settings_name_the_field_at_fault(field, value, message):
    with pytest.raises(ValueError, match=message):
        Settings(**{field: value})


def test_settings_accept_slider_values():
    settings = Settings(gate_scale=0, max_new_tokens=24.0, seed=None)
    assert settings.max_new_tokens == 24 and isinstance(settings.max_new_tokens, int) and settings.gate_scale == 0.0


def test_questions_must_be_there_and_not_too_long(engine):
    assert check_text("  hi  ") == "hi"
    with pytest.raises(ValueError, match="question: is empty"):
        check_text(" \n ")
    with pytest.raises(ValueError, match="question: 100,000 characters is too long"):
        check_text("x" * 100_000)
    with pytest.raises(ValueError, match="max_new_tokens: must be between 1 and 64"):
        next(engine.chat([], QUESTION, Settings(max_new_tokens=65)))


def test_chat_prompts_drop_the_oldest_turns_to_fit(base_folder):
    small = Engine(adapter.load(base_folder, device="cpu", max_seq_len=200))
    history = [(f"question {i} about the red circle", "the blue square is on the left " * 2) for i in range(6)]
    prompt = small.chat_prompt(history, QUESTION, Settings(max_new_tokens=40))
    assert prompt.endswith(adapter.chat(history[-1:], QUESTION)[len(adapter.prompts.ALPACA_HEADER):])
    assert "question 0" not in prompt
    assert len(small.model.tokenizer.encode(prompt)) + 40 <= 200
    with pytest.raises(ValueError, match="message: too long for this model's context of 200 tokens"):
        small.chat_prompt([], "circle " * 400, Settings(max_new_tokens=1))


def test_a_long_history_is_fitted_in_a_few_writings_keeping_the_most_turns_that_fit(base_folder, monkeypatch):
    """Dropping one turn at a time wrote and tokenized the prompt once a turn: a long history (an API client's
    whole conversation) held the server for seconds, quadratic in its length."""
    small = Engine(adapter.load(base_folder, device="cpu", max_seq_len=200))
    history = [(f"question {i}", "red") for i in range(400)]
    written = []
    chat = small.prompts.chat
    monkeypatch.setattr(small.prompts, "chat", lambda turns, *rest: written.append(len(turns)) or chat(turns, *rest))
    prompt = small.chat_prompt(history, QUESTION, Settings(max_new_tokens=40))
    assert len(written) <= 12, written
    kept = written[-1]
    assert 0 < kept < len(history) and prompt == chat(history[-kept:], QUESTION, None)
    encode = small.model.tokenizer.encode
    assert len(encode(prompt)) + 40 <= 200 < len(encode(chat(history[-kept - 1:], QUESTION, None))) + 40


def test_closing_an_answer_stops_decoding_and_releases_the_lock(engine, monkeypatch):
    steps = []
    original = engine.model.step
    monkeypatch.setattr(engine.model, "step", lambda *a, **k: steps.append(1) or original(*a, **k))
    answer = engine.chat([], QUESTION, Settings(temperature=1.0, max_new_tokens=64))
    next(answer)
    assert engine.lock.locked() and engine.lock is device_lock("cpu")
    decoded = len(steps)
    answer.close()
    assert not engine.lock.locked()
    assert len(steps) == decoded < 64


def test_compare_is_one_batch_with_the_frozen_base_in_row_zero(engine, base_folder, monkeypatch):
    batches = []
    original = engine.model.step
    monkeypatch.setattr(engine.model, "step",
                        lambda tokens, cache, **k: batches.append((tokens.shape[0], k["gate_scale"])) or
                        original(tokens, cache, **k))
    base, adapted = list(engine.compare(QUESTION, GREEDY))[-1]
    assert {rows for rows, _ in batches} == {2} and batches[0][1] == [0.0, 1.0]
    frozen = adapter.load(base_folder, device="cpu")
    assert base == frozen.generate(adapter.alpaca(QUESTION), temperature=0.0, max_new_tokens=12, stop=STOP_STRINGS)
    assert adapted == list(engine.chat([], QUESTION, GREEDY))[-1]


def test_a_gate_sweep_is_one_batch_and_each_row_is_that_gate_alone(engine, monkeypatch):
    batches = []
    original = engine.model.step
    monkeypatch.setattr(engine.model, "step",
                        lambda tokens, cache, **k: batches.append((tokens.shape[0], k["gate_scale"])) or
                        original(tokens, cache, **k))
    settings = Settings(temperature=0.0, max_new_tokens=12, delta_scale=0.5)
    answers = list(engine.sweep(QUESTION, "0, 0.5 1.25,2", settings))[-1]
    assert {rows for rows, _ in batches} == {4} and batches[0][1] == [0.0, 0.5, 1.25, 2.0]
    monkeypatch.undo()
    alone = [engine.model.generate(adapter.alpaca(QUESTION), gate_scale=gate, delta_scale=0.5, temperature=0.0,
                                   max_new_tokens=12, stop=STOP_STRINGS) for gate in (0.0, 0.5, 1.25, 2.0)]
    assert answers == alone and len(set(alone)) > 1


def test_a_gate_sweep_that_would_outgrow_the_served_cache_decodes_in_turns(engine, monkeypatch):
    """One sweep of 9 scales held 9 answers' KV cache where the Space fit check counted --concurrency's (1): rows
    beyond Engine.max_cached_tokens decode in turns, each answer still that gate's alone."""
    prompt = len(engine.model.tokenizer.encode(adapter.alpaca(QUESTION)))
    bounded = Engine(engine.model, threading.Lock(), max_cached_tokens=2 * (prompt + 12) + 1)  # two rows' worth
    caches = []
    original = engine.model.new_cache
    monkeypatch.setattr(engine.model, "new_cache", lambda batch, max_len=None, **k: caches.append((batch, max_len))
                        or original(batch, max_len, **k))
    settings = Settings(temperature=0.0, max_new_tokens=12)
    answers = list(bounded.sweep(QUESTION, "0, 0.5, 1, 1.5, 2", settings))[-1]
    assert caches == [(2, prompt + 12)] * 2 + [(1, prompt + 12)]  # 2 + 2 + 1 rows, one group after another
    monkeypatch.undo()
    assert answers == list(engine.sweep(QUESTION, "0, 0.5, 1, 1.5, 2", settings))[-1]


def test_with_a_seed_the_gate_alone_changes_a_sampled_answer_in_every_view(engine):
    # delta 0: the compare tab's base row (gate and delta 0) is then the sweep's gate-0 row
    sampled = Settings(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5, delta_scale=0.0)
    base, adapted = list(engine.compare(QUESTION, sampled))[-1]
    swept = list(engine.sweep(QUESTION, "0, 0.5, 1", sampled))[-1]
    assert swept[0] == base and swept[2] == adapted
    assert list(engine.chat([], QUESTION, sampled))[-1] == adapted
    other_seed = Settings(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=6, delta_scale=0.0)
    assert list(engine.chat([], QUESTION, other_seed))[-1] != adapted


@pytest.mark.parametrize("scales, message", [
    ("0, 1, x", "gate_scales: 'x' is not a number"),
    ("0 2.5", r"gate_scales: must be in \[0, 2\], got 2.5"),
    (" , ", "gate_scales: give 1 to 9 scales, got 0"),
    ([0.5] * 10, "gate_scales: give 1 to 9 scales, got 10"),
    ([float("inf")], "gate_scales: expected a number"),
    (None, r"gate_scales: give 1 to 9 scales such as \"0, 0.5, 1\", got None"),  # an API client's empty box
])
def test_bad_gate_sweeps_name_the_fault(scales, message):
    with pytest.raises(ValueError, match=message):
        gate_scales(scales)


def test_text_only_adapters_answer_image_questions_from_the_text(base_folder):
    text_only = Engine(adapter.load(base_folder, device="cpu"))
    assert not text_only.can_see_images
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    answer = list(text_only.ask_image(red, "What colour?", GREEDY))[-1]
    assert answer == text_only.model.generate(adapter.image_question("What colour?"), temperature=0.0,
                                              max_new_tokens=12, stop=STOP_STRINGS)


def test_follow_up_questions_about_a_picture_are_a_conversation(engine):
    """Earlier turns about the picture are written as fine-tuning writes image conversations (the chat format),
    in every image view alike; the oldest give way when the context is full."""
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    first = list(engine.ask_image(red, "What colour?", GREEDY))[-1]
    assert engine.image_prompt("What colour?", GREEDY) == engine.prompts.image_question("What colour?")
    history = [("What colour?", first)]
    prompt = engine.image_prompt("And its shape?", GREEDY, history)
    assert prompt == engine.prompts.chat(history, "And its shape?")
    follow_up = list(engine.ask_image(red, "And its shape?", GREEDY, history))[-1]
    assert follow_up == engine.model.generate(prompt, image=red, temperature=0.0, max_new_tokens=12,
                                              stop=STOP_STRINGS)
    assert list(engine.sweep_image(red, "And its shape?", [1.0], GREEDY, history))[-1] == [follow_up]
    with_history = engine.next_tokens_image(red, "And its shape?", [1.0], GREEDY, history).rows()
    assert with_history != engine.next_tokens_image(red, "And its shape?", [1.0], GREEDY).rows()
    long_turns: list[tuple[str, str]] = []  # twice what the context holds
    while len(engine.model.tokenizer.encode(engine.prompts.chat(long_turns, "?"))) < 2 * engine.model.args.max_seq_len:
        long_turns.append((f"Question {len(long_turns)}: what is it?", "It is red. " * 5))
    trimmed = engine.image_prompt("And its shape?", GREEDY, long_turns)
    assert f"Question {len(long_turns) - 1}:" in trimmed and "Question 0:" not in trimmed
    assert engine._fits(trimmed, GREEDY.max_new_tokens)


@pytest.mark.parametrize("history, message", [  # (IndexErrors, unpacking errors, None + str inside the template)
    ([("What colour?",)], r"history\[0\]: expected a \(question, answer\) pair of texts, got \('What colour\?',\)"),
    ([("What colour?", "red"), ("Why?", None)], r"history\[1\]: expected a \(question, answer\) pair of texts"),
    ("What colour?", r"history: expected a list of \(question, answer\) turns, got str"),
])
def test_malformed_histories_are_named(engine, history, message):
    with pytest.raises(ValueError, match=message):
        engine.chat(history, "And its shape?", GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.image_prompt("And its shape?", GREEDY, history)


def test_non_images_are_refused_clearly(engine, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image file"):
        next(engine.ask_image(str(notes), "What is it?", GREEDY))


def test_a_layer_sweep_is_one_batch_from_no_layer_to_all_and_each_row_is_those_layers_alone(engine, monkeypatch):
    model = engine.model
    layers = list(range(model.first_prompt_layer, model.args.n_layers))
    batches = []
    original = model.step
    monkeypatch.setattr(model, "step", lambda tokens, cache, **k: batches.append(tokens.shape[0]) or
                        original(tokens, cache, **k))
    settings = Settings(temperature=0.0, max_new_tokens=12, gate_scale=1.5, gate_layers="top 1")  # layers: swept
    labels, rows = engine.layer_sweep(QUESTION, settings)
    answers = list(rows)[-1]
    monkeypatch.undo()
    assert set(batches) == {len(layers) + 1}
    assert labels == ["top 0: none"] + [f"top {n}: {describe(layers[-n:])}" for n in range(1, len(layers) + 1)]

    def alone(gate_scale) -> str:
        return model.generate(adapter.alpaca(QUESTION), gate_scale=gate_scale, temperature=0.0, max_new_tokens=12,
                              stop=STOP_STRINGS)

    assert answers[0] == alone(0.0) and answers[-1] == alone(1.5)
    assert answers == [alone(gate_scale_rows(model, [1.5], layers[len(layers) - n:])) for n in range(len(layers) + 1)]
    assert list(engine.chat([], QUESTION, settings))[-1] == answers[1], "the chat speaks through the top layer only"


def test_layer_selections_reach_every_request_and_bad_ones_name_the_layers(engine):
    model = engine.model
    top = model.args.n_layers - 1
    settings = Settings(temperature=0.0, max_new_tokens=12, gate_layers=f" {top} ")
    only_top = model.generate(adapter.alpaca(QUESTION), gate_scale=gate_scale_rows(model, [1.0], [top]),
                              temperature=0.0, max_new_tokens=12, stop=STOP_STRINGS)
    assert list(engine.compare(QUESTION, settings))[-1][1] == only_top
    found = engine.next_tokens(QUESTION, "1", settings).probabilities
    assert found == engine.next_tokens(QUESTION, "1", Settings(max_new_tokens=12, gate_layers="top 1")).probabilities
    assert found != engine.next_tokens(QUESTION, "1", GREEDY).probabilities
    figure = engine.gate_heatmap(1.0, f"{top}")
    shown = torch.tensor(figure.axes[0].images[0].get_array().data)
    assert not shown[:-1].any() and torch.allclose(shown[-1], model.effective_gates(1.0)[-1])
    assert f"only layers {top} speaking" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match=rf"gate_layers: layer\(s\) {top + 1} have no adaption prompt"):
        list(engine.chat([], QUESTION, Settings(max_new_tokens=12, gate_layers=str(top + 1))))
    with pytest.raises(ValueError, match="gate_layers: 'x' is not a layer number"):
        engine.gate_heatmap(1.0, "x")


def test_single_heads_speak_in_the_heatmap_the_answers_and_the_prompt_shares(engine):
    model = engine.model
    top = model.args.n_layers - 1
    settings = Settings(temperature=0.0, max_new_tokens=12, gate_layers=f"{top}:1-2")
    figure = engine.gate_heatmap(1.0, settings.gate_layers)
    shown = torch.tensor(figure.axes[0].images[0].get_array().data)
    expected = torch.zeros_like(shown)
    expected[-1, 1:3] = model.effective_gates(1.0)[-1, 1:3]
    assert torch.allclose(shown, expected) and f"only layers {top}:1-2 speaking" in figure.axes[0].get_title()
    gates = [layer.attention.gate for layer in model.layers[model.first_prompt_layer:]]
    saved = [gate.detach().clone() for gate in gates]
    with torch.no_grad():  # the reference: every other gate zeroed
        for gate in gates[:-1]:
            gate.zero_()
        gates[-1][0, [h for h in range(model.args.n_heads) if h not in (1, 2)]] = 0.0
        silenced = model.generate(adapter.alpaca(QUESTION), temperature=0.0, max_new_tokens=12, stop=STOP_STRINGS)
        for gate, old in zip(gates, saved):
            gate.copy_(old)
    assert list(engine.compare(QUESTION, settings))[-1][1] == silenced
    shares = engine.token_shares(engine.chat_prompt([], QUESTION, settings), "The red circle.", settings)
    assert shares.per_layer[:-1] == [0.0] * (len(shares.layers) - 1) and shares.per_layer[-1] > 0


def test_gate_heatmap_shows_the_effective_gates(engine):
    figure = engine.gate_heatmap(1.5)
    shown = figure.axes[0].images[0].get_array()
    assert torch.allclose(torch.tensor(shown.data), engine.model.effective_gates(gate_scale=1.5))
    assert "gate scale 1.5" in figure.axes[0].get_title()


def test_token_shares_colour_the_answer_by_the_prompt_path(engine):
    prompt = engine.chat_prompt([], QUESTION, GREEDY)
    answer = "The red circle is on the left."
    shares = engine.token_shares(prompt, answer, Settings(gate_scale=1.0))
    assert "".join(piece for piece, _ in shares.pieces) == answer
    assert all(0 < share < 1 for _, share in shares.pieces)
    layers = list(range(engine.model.first_prompt_layer, engine.model.args.n_layers))
    assert shares.layers == layers and all(0 < share < 1 for share in shares.per_layer)
    closed = engine.token_shares(prompt, answer, Settings(gate_scale=0.0))
    assert [share for _, share in closed.pieces] == [0.0] * len(closed.pieces) and closed.per_layer == [0.0] * 3
    top = engine.token_shares(prompt, answer, Settings(gate_layers="top 1"))
    assert top.per_layer[:-1] == [0.0, 0.0] and top.per_layer[-1] > 0  # (its input changed with the layers below)
    # a piece's share is its tokens' mean over the layers, a layer's its mean over the tokens: the two means agree
    tokens = len(engine.model.tokenizer.encode(answer, bos=False, eos=False))
    assert len(shares.pieces) == tokens, "one piece per token for this ASCII answer"
    assert sum(s for _, s in shares.pieces) / tokens == pytest.approx(sum(shares.per_layer) / len(layers), rel=1e-5)
    bars = shares.figure().axes[0].patches
    assert [round(bar.get_height(), 4) for bar in bars] == [round(100 * s, 4) for s in shares.per_layer]
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    with_image = engine.token_shares(engine.image_prompt("What colour?"), answer, Settings(), red)
    assert with_image != engine.token_shares(engine.image_prompt("What colour?"), answer, Settings())
    assert engine.token_shares(prompt, "", Settings()).pieces == []


def test_the_training_gate_plot_is_found_next_to_the_adapter(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"")
    assert find_gate_plot(run / "adapter") is None
    (run / "gates.png").write_bytes(b"png")
    assert find_gate_plot(run / "adapter") == run / "gates.png"
    assert find_gate_plot(run / "adapter" / "adapter.safetensors") == run / "gates.png"
    assert find_gate_plot(None) is None and find_gate_plot("hf:owner/adapter") is None


def test_model_info_says_what_is_loaded(engine, demo_files):
    info = engine.model_info()
    assert info["base"] == str(demo_files.base) and info["adapter"] == str(demo_files.adapter)
    assert info["parameters"] == engine.model.count_parameters() > info["trainable_parameters"] > 0
    assert (info["quantization"], info["dtype"], info["adapter_layers"], info["adapter_layer_numbers"],
            info["sees_images"]) == ("none", "float32", 3, "1-3", True)
    assert info["process_memory_mb"] > 10
    args = engine.model.args  # the base alone (not the adapter's tensors or the CLIP tower), and its cache
    assert info["base_weights_mib"] == round(footprint(args, None, torch.float32).weights / 2**20, 1)
    assert info["kv_cache_mib_per_1000_tokens"] == round(1000 * 2 * args.n_layers * args.dim * 4 / 2**20, 1)
    assert (info["tokenizer"], info["rope_scaling"]) == ("SentencePiece, 512 pieces", "none")
    assert (info["v2_parts"], info["prompt_keys_values"]) == (", ".join(engine.model.adapter_args.v2_parts),
                                                              "frozen")


@pytest.mark.parametrize("system", ["macos", "windows"])
def test_model_info_holds_on_systems_without_proc(engine, monkeypatch, system):
    """Without /proc (macOS) the memory is the process's peak; without `resource` either (Windows) it is unknown
    (null): the Model tab failed there with an ImportError."""
    import resource

    from adapter import engine as engine_module

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(engine_module, "open", no_proc, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin" if system == "macos" else "win32")
    if system == "windows":
        monkeypatch.setitem(sys.modules, "resource", None)
        assert engine.model_info()["process_memory_mb"] is None
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS (kilobytes on Linux)
    memory = engine.model_info()["process_memory_mb"]
    assert round(before, 1) <= memory <= round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)


def test_flags_come_from_the_environment_and_flags_win(demo_files):
    environ = {"ADAPTER_BASE": str(demo_files.base), "ADAPTER_ADAPTER": str(demo_files.adapter),
               "ADAPTER_MAX_NEW_TOKENS": "99", "ADAPTER_SHARE": "1", "GRADIO_SERVER_NAME": "0.0.0.0",
               "ADAPTER_COMPILE": "yes"}
    config = parse_config(["--max-new-tokens", "7"], environ)
    assert (config.base, config.adapter, config.max_new_tokens, config.share, config.host, config.port,
            config.compile) == (str(demo_files.base), (str(demo_files.adapter),), 7, True, "0.0.0.0", 7860, True)
    assert not parse_config(["--base", str(demo_files.base)], {}).compile
    assert parse_config(["--base", str(demo_files.base), "--compile"], {}).compile
    scales = parse_config(["--delta-scale", "0"], {**environ, "ADAPTER_GATE_SCALE": "0.5", "ADAPTER_DELTA_SCALE": "2"})
    assert (scales.gate_scale, scales.delta_scale) == (0.5, 0.0)


@pytest.mark.parametrize("value, private", [("ON", True), (" 1 ", True), ("off", False), ("0", False), ("", False)])
def test_on_off_variables_read_their_words(demo_files, value, private):
    base = ["--base", str(demo_files.base)]
    assert parse_config(base, {"ADAPTER_PRIVATE_ADAPTERS": value}).private_adapters is private


@pytest.mark.parametrize("variable, value, expected", [("ADAPTER_PORT", "abc", "a whole number"),
                                                       ("ADAPTER_MAX_NEW_TOKENS", "1e3", "a whole number"),
                                                       ("ADAPTER_GATE_SCALE", "half", "a number")])
def test_a_number_variable_that_is_no_number_is_refused_naming_the_variable(demo_files, variable, value, expected):
    """(argparse's words named the flag, --port, that the user never gave)"""
    with pytest.raises(ValueError, match=f"^{variable}: '{value}' is not {expected}$"):
        parse_config(["--base", str(demo_files.base)], {variable: value})


def test_a_flag_wins_over_its_variable_even_one_that_cannot_be_read(demo_files, capsys):
    """A bad variable was refused while the parser was built: with its flag given, and with --help."""
    base = ["--base", str(demo_files.base)]
    assert parse_config([*base, "--port", "7890"], {"ADAPTER_PORT": "abc"}).port == 7890
    assert parse_config([*base, "--share"], {"ADAPTER_SHARE": "y"}).share is True
    assert parse_config([*base, "--concurrency", "2"], {"ADAPTER_CONCURRENCY": "2.0"}).concurrency == 2
    with pytest.raises(SystemExit, match="^0$"):
        parse_config(["--help"], {"ADAPTER_PORT": "abc"})
    assert "usage: python app.py" in capsys.readouterr().out


def test_a_gradio_port_variable_that_is_no_number_is_one_line(tmp_path):
    """gradio reads GRADIO_SERVER_PORT as it is imported: a traceback from inside it."""
    done = subprocess.run([sys.executable, "app.py"], cwd=Path(app.__file__).parent, capture_output=True, text=True,
                          env={**os.environ, "GRADIO_SERVER_PORT": "abc"}, timeout=120)
    assert (done.returncode, done.stderr) == (2, "error: GRADIO_SERVER_PORT: 'abc' is not a whole number\n")


def test_a_server_stopped_by_sigterm_ends_normally_and_removes_what_it_kept(tmp_path):
    """(SIGTERM, as docker stop, systemd or a Space restarting send it, ended the process at once: every saved
    conversation, download, upload and trained adapter stayed on disk, restart after restart)"""
    import signal
    import time

    import httpx
    from gradio_client import Client

    port = app_helpers.free_port()
    environ = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--no-train-tab"],
                              cwd=Path(app.__file__).parent, env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        history = [{"role": role, "content": [{"type": "text", "text": text}]}
                   for role, text in (("user", "Hi"), ("assistant", "Hello"))]
        Client(f"http://127.0.0.1:{port}/", verbose=False).predict(history, "", api_name="/save_conversation")
        assert any((tmp_path / "llama-adapter-conversations").iterdir())
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, server.stdout.read().decode()[-3000:]
    finally:
        server.kill()
    assert not any((tmp_path / "llama-adapter-conversations").iterdir()), "removed as the process ended"


def test_an_on_off_variable_of_another_word_is_refused_by_name(demo_files):
    """(anything but 1/true/yes/on was read as off: ADAPTER_PRIVATE_ADAPTERS=y served every page's adapters to
    everyone)"""
    with pytest.raises(ValueError, match="^ADAPTER_PRIVATE_ADAPTERS: 'y' is not one of 1/true/yes/on"):
        parse_config(["--base", str(demo_files.base)], {"ADAPTER_PRIVATE_ADAPTERS": "y"})


def test_several_adapters_come_from_flags_or_the_environment(demo_files, tmp_path):
    one, two = str(demo_files.adapter), str(shutil.copytree(demo_files.adapter, tmp_path / "second"))
    base = ["--base", str(demo_files.base)]
    assert parse_config([*base, "--adapter", one, two], {}).adapter == (one, two)
    assert parse_config([*base, "--adapter", one, "--adapter", two], {}).adapter == (one, two)
    assert parse_config(base, {"ADAPTER_ADAPTER": f"{one}, {two}"}).adapter == (one, two)
    assert parse_config([*base, "--adapter", two], {"ADAPTER_ADAPTER": one}).adapter == (two,), "the flag wins"
    assert parse_config(base, {}).adapter == ()
    with pytest.raises(ValueError, match=f"--adapter: {one} is given twice"):
        parse_config([*base, "--adapter", one, two, one], {})
    with pytest.raises(FileNotFoundError, match="--adapter: nowhere does not exist"):
        parse_config([*base, "--adapter", one, "nowhere"], {})


def test_adapters_served_together_share_the_base_and_clip_goes_to_those_that_see(demo_files, base_folder, tmp_path):
    text = adapter.save_adapter(randomize_adapter(adapter.load(base_folder, adapter=V1, device="cpu")),
                                tmp_path / "text").parent
    flags = ["--base", str(demo_files.base), "--adapter", str(text), str(demo_files.adapter), "--clip",
             str(demo_files.clip), "--clip-model", str(demo_files.clip_model), "--device", "cpu"]
    engines = load_engines(parse_config(flags, {}))
    assert engines.names == [str(text), str(demo_files.adapter)] and engines.for_images == str(demo_files.adapter)
    first, second = (engines.get(name) for name in engines.names)
    assert engines.get(None) is first and not first.can_see_images and second.can_see_images
    assert second.model.layers[0].attention.wq is first.model.layers[0].attention.wq
    alone = Engine(adapter.load(base_folder, adapter=text, device="cpu"))
    assert list(first.compare(QUESTION, GREEDY))[-1] == list(alone.compare(QUESTION, GREEDY))[-1]
    picture = Image.new("RGB", (40, 40), "red")
    assert list(second.ask_image(picture, QUESTION, GREEDY))[-1] == \
        list(Engine(adapter.load(demo_files.base, adapter=demo_files.adapter, clip=demo_files.clip,
                                 clip_model=str(demo_files.clip_model), device="cpu")).ask_image(
                                     picture, QUESTION, GREEDY))[-1]
    with pytest.raises(ValueError, match=f"adapter: 'other' is not served here; choose from {text}, "):
        engines.get("other")
    with pytest.raises(ValueError, match=r"adapter: \['a'\] is not served here"):  # (was "unhashable type")
        engines.get(["a"])
    with pytest.raises(ValueError, match=r"clip: none of the adapters \(.*text\) has a visual prompt to feed"):
        load_engines(parse_config([*flags[:4], *flags[5:]], {}))
    bare = load_engines(parse_config([*flags[:2], "--device", "cpu"], {}))
    assert bare.names == [NO_ADAPTER] and not bare.default.has_gates and bare.default.adapter is None


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_a_compiling_engine_gives_the_same_answers(demo_files, engine):
    model = adapter.load(demo_files.base, adapter=demo_files.adapter, device="cpu")
    compiled = Engine(model, max_new_tokens=64, compile=True)
    steps = []
    original = model.step
    model.step = lambda *a, **k: steps.append(k.get("compile")) or original(*a, **k)
    assert list(compiled.chat([], QUESTION, GREEDY))[-1] == list(engine.chat([], QUESTION, GREEDY))[-1]
    assert steps[0] is None and set(steps[1:]) == {True}, "the prompt eagerly, every one-token step compiled"
    assert compiled.model_info()["compiled_decode"] and not engine.model_info()["compiled_decode"]
    with pytest.raises(ValueError, match="compile: must be True or False, got 'yes'"):
        Engine(model, compile="yes")


@pytest.mark.parametrize("flags, message", [
    (["--clip", "missing/clip.safetensors", "--adapter", "{adapter}"],
     "--clip: missing/clip.safetensors does not exist"),
    (["--clip", "{clip}"], "--clip: needs an --adapter with a visual prompt"),
    (["--clip-model", "ViT-B-32"], "--clip-model: only used together with --clip"),
    (["--adapter", "nowhere/adapter"], "--adapter: nowhere/adapter does not exist"),
    (["--quantize", "int4"], "--quantize: unknown mode 'int4'"),
    (["--kv-cache", "fp8"], "--kv-cache: unknown kind 'fp8'"),
    (["--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
    (["--port", "70000"], "--port: must be between 1 and 65535"),
    (["--gate-scale", "2.5"], r"--gate-scale: must be in \[0, 2\], got 2.5"),
    (["--delta-scale", "-1"], r"--delta-scale: must be in \[0, 2\], got -1.0"),
    (["--concurrency", "0"], "--concurrency: must be between 1 and 64"),
])
def test_bad_flags_stop_before_loading(demo_files, flags, message):
    flags = [f.format(adapter=demo_files.adapter, clip=demo_files.clip) for f in flags]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_config(["--base", str(demo_files.base), *flags], {})


def test_the_default_is_the_embedded_tiny_model(demo_files):
    if tiny_available():
        assert parse_config([], {}).base == "tiny"
        return
    with pytest.raises(FileNotFoundError, match=f"--base: the embedded tiny model is not built yet \\({TINY_FOLDER}"):
        parse_config([], {})
    with pytest.raises(FileNotFoundError, match="--adapter: the embedded tiny model is not built yet"):
        parse_config(["--base", str(demo_files.base), "--adapter", "tiny-image"], {})


def test_python_app_py_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--base", str(tmp_path / "nowhere")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --base: {tmp_path / 'nowhere'} does not exist"]


def test_where_the_app_cannot_listen_it_says_so_before_loading(monkeypatch):
    """gradio said "Cannot find empty port" for all three, after the model had loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"^--port: {port} is in use on 127.0.0.1; choose another$"):
            check_listening("127.0.0.1", port)
        monkeypatch.setattr("app.load_engines", lambda config: pytest.fail("loaded before the check"))
        assert app.main(["--port", str(port)]) == 2
        monkeypatch.setattr("adapter.app_config.load_engines", lambda config: pytest.fail("loaded before the check"))
        assert openai_api_main(["--port", str(port)]) == 2, "the API alone: uvicorn said so after loading"
    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with monkeypatch.context() as offline:  # no name looked up in a test
        offline.setattr(socket, "getaddrinfo", unknown)
        with pytest.raises(ValueError, match=r"^--host: cannot listen on 'nowhere\.invalid' \(Name or service not "
                                             r"known\)$"):
            check_listening("nowhere.invalid", 7860)
    with pytest.raises(ValueError, match=r"^--host: cannot listen on '192\.0\.2\.1' \(Cannot assign requested"):
        check_listening("192.0.2.1", 7860)  # TEST-NET-1: no machine's own
    with pytest.raises(ValueError, match=r"^--host: '::1': the app listens on an IPv4 address or a name"):
        check_listening("::1", 7860, ipv6=False)  # gradio's URL for it failed inside httpx
    check_listening("127.0.0.1", port)  # free again


def test_the_engine_does_not_need_gradio():
    code = "import sys, adapter.engine, adapter.app_config; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
