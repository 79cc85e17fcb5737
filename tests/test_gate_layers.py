"""Gate scales per adapter layer and head: a layer (head) scaled to 0 is exactly that layer without its
prompt, per-row per-layer scales equal separate runs on every decode path, layer selections are parsed and
refused with the layers named, and the command lines (answers, sweeps, files of questions, next tokens, scores)
give what the adapter gives with the other layers' gates set to 0."""

from __future__ import annotations

import json

import pytest
import torch

import adapter
from adapter.evaluate import evaluate, table
from adapter.evaluate import main as evaluate_main
from adapter.gate_layers import (
    adapter_layers,
    describe,
    gate_scale_rows,
    layer_mask,
    normalized,
    parse_layers,
    top_layers,
)
from adapter.generate import GenerationRequest, decode_tokens
from adapter.generate import main as generate_main
from adapter.next_token import next_tokens
from adapter.prompts import STOP_STRINGS, alpaca
from adapter.sampling import SamplingParams
from tests.conftest import TINY, TINY_GQA, V1, V2, make_model, randomize_adapter
from tests.test_static_decode import assert_same_decode, decode, left_padded, with_static

CASES = {"mha-v1": (TINY, V1), "gqa-v2": (TINY_GQA, V2)}


def tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def without_gates(model, silenced: dict[int, list[int] | None]):
    """Set the gates of some layers (all their heads, or the ones listed) to 0; the old gates, for `restore`."""
    saved = {}
    for layer, heads in silenced.items():
        gate = model.layers[layer].attention.gate
        saved[layer] = gate.detach().clone()
        with torch.no_grad():
            if heads is None:
                gate.zero_()
            else:
                gate[0, heads] = 0.0
    return saved


def restore(model, saved) -> None:
    with torch.no_grad():
        for layer, gate in saved.items():
            model.layers[layer].attention.gate.copy_(gate)


@pytest.mark.parametrize("case", list(CASES))
def test_a_layer_or_head_scaled_to_zero_is_exactly_that_layer_or_head_without_its_prompt(case):
    args, prompts = CASES[case]
    model = make_model(args, prompts)
    t = tokens(2, 7, args.vocab_size)
    first, layers = model.first_prompt_layer, prompts.prompt_layers
    per_layer = torch.full((1, layers), 1.5)
    per_layer[0, 1] = 0.0
    per_head = torch.full((1, layers, args.n_heads), 1.5)
    per_head[0, 0, [1, 3]] = 0.0
    with torch.no_grad():
        by_layer, by_head = model(t, gate_scale=per_layer), model(t, gate_scale=per_head)
        saved = without_gates(model, {first + 1: None})
        assert torch.equal(by_layer, model(t, gate_scale=1.5))
        restore(model, saved)
        saved = without_gates(model, {first: [1, 3]})
        assert torch.equal(by_head, model(t, gate_scale=1.5))
        restore(model, saved)
        assert not torch.equal(by_layer, model(t, gate_scale=1.5))  # the silenced layer did speak
        # every layer at s is the scalar s, bit for bit; every layer at 0 is the frozen prompts' silence
        assert torch.equal(model(t, gate_scale=torch.full((1, layers), 0.7)), model(t, gate_scale=0.7))
        assert torch.equal(model(t, gate_scale=[[0.0] * layers]), model(t, gate_scale=0.0))


def test_per_row_per_layer_scales_equal_separate_runs_in_one_forward_and_through_the_cache():
    model = make_model(TINY, V2)
    t = tokens(1, 8, TINY.vocab_size).repeat(3, 1)
    rows = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.5, 1.0, 1.0]])
    with torch.no_grad():
        together = model(t, gate_scale=rows)
        stepped = model.step(t, model.new_cache(3, 8), gate_scale=rows)
        for row in range(3):
            alone = model(t[:1], gate_scale=rows[row:row + 1])
            torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stepped[row], alone[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_the_static_step_takes_per_layer_and_per_head_scales_that_change_every_step(case):
    args, prompts = CASES[case]
    model = make_model(args, prompts)
    tokens_, pad = left_padded(args.vocab_size)
    layers = prompts.prompt_layers

    def scales(step: int) -> dict:
        if step % 3 == 0:
            return {"gate_scale": [1.0, 0.0, 2.0]}  # one per row, between per-layer ones
        if step % 3 == 1:
            return {"gate_scale": torch.linspace(0, 2, 3 * layers).view(3, layers).roll(step, 1)}
        return {"gate_scale": torch.rand(1, layers, args.n_heads, generator=torch.Generator().manual_seed(step))}

    plain = decode(model, tokens_, pad, 20, compile=False, scales=scales)
    with_static(model)
    assert_same_decode(decode(model, tokens_, pad, 20, compile=True, scales=scales), plain)


def test_effective_gates_and_the_models_own_scale_take_per_layer_values():
    model = make_model(TINY, V1)
    row = torch.tensor([[0.0, 2.0]])
    gates = model.effective_gates(row)
    torch.testing.assert_close(gates[0], torch.zeros(TINY.n_heads))
    torch.testing.assert_close(gates[1], model.effective_gates(2.0)[1])
    t = tokens(1, 6, TINY.vocab_size)
    with torch.no_grad():
        expected = model(t, gate_scale=row)
        model.set_gate_scale(row)
        assert torch.equal(model(t), expected)
        torch.testing.assert_close(model.effective_gates(), gates)


def test_gate_scales_of_the_wrong_shape_are_refused_naming_the_shape_wanted():
    model = make_model(TINY, V1)  # 2 adapter layers of 4 heads
    t = tokens(2, 5, TINY.vocab_size)
    with pytest.raises(ValueError, match=r"gate_scale: shape \(2, 3\) does not fit 1 or 2 rows x 2 adapter layers$"):
        model(t, gate_scale=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 2\) does not fit 1 or 2 rows x 2 adapter layers"):
        model(t, gate_scale=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3\) does not fit 1 or 2 rows x 2 adapter layers x 4 heads"):
        model(t, gate_scale=torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match=r"gate_scale: expected a number, one per row, \[rows, adapter layers\]"):
        model(t, gate_scale=torch.ones(1, 1, 2, 4))
    with pytest.raises(ValueError, match=r"gate_scale: shape \(1, 5\) does not fit rows x 2 adapter layers"):
        model.set_gate_scale(torch.ones(1, 5))  # refused when set, not at the next call
    with pytest.raises(ValueError, match=r"shape \(2, 2\) does not fit 1 row x 2 adapter layers"):
        model.effective_gates(torch.ones(2, 2))
    with pytest.raises(ValueError, match="must be finite"):
        model(t, gate_scale=[[1.0, float("nan")]])


def test_layer_selections_name_the_bases_layer_numbers():
    model = make_model(TINY, V2)  # 4 layers, prompts in 1, 2 and 3
    assert parse_layers("all", model) == [1, 2, 3]
    assert parse_layers("top 2", model) == parse_layers("TOP2", model) == [2, 3]
    assert parse_layers("bottom 1", model) == [1]
    assert parse_layers("top 0", model) == []
    assert parse_layers("3, 1", model) == [1, 3]
    assert parse_layers("1-2", model) == [1, 2]
    assert top_layers(model, 3) == [1, 2, 3]
    assert describe([5, 1, 2, 3, 7, 8]) == "1-3, 5, 7-8"
    assert describe([]) == "none"
    torch.testing.assert_close(layer_mask(model, [1, 3]), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(gate_scale_rows(model, [0.5, 2.0], [2]),
                               torch.tensor([[0.0, 0.5, 0.0], [0.0, 2.0, 0.0]]))
    assert gate_scale_rows(model, [0.5, 2], None) == [0.5, 2.0]


def test_heads_are_chosen_after_a_colon_as_the_heatmap_numbers_them():
    model = make_model(TINY, V2)  # prompts in layers 1-3, 4 heads each
    assert parse_layers("3:0-1", model) == [(3, 0), (3, 1)]
    assert parse_layers("2, 3:1, 3 : 0", model) == [2, (3, 0), (3, 1)]
    assert parse_layers("1-2:2", model) == [(1, 2), (2, 2)]
    assert parse_layers("3:0-3", model) == parse_layers("3, 3:1", model) == [3]  # every head, or the whole layer
    assert describe([2, (3, 1), (3, 0), (1, 2)]) == "2, 1:2, 3:0-1"
    assert describe([(3, 0), (3, 2), (3, 3)]) == "3:0, 3:2-3"
    for spec in ("2, 3:0-1", "1:2, 2:2", "1-2, 3:3", "3:0, 3:2-3", "none"):
        assert describe(parse_layers(spec, model)) == spec  # what describe writes parses back
    assert parse_layers("1 3", model) == parse_layers("1, 3", model) == [1, 3]  # (spaces ran the digits together)
    assert parse_layers("1 - 2, 3 : 0 - 1", model) == [1, 2, (3, 0), (3, 1)]
    assert normalized(model, [[3, 1], 2]) == [2, (3, 1)]  # pairs as JSON gives them back
    torch.testing.assert_close(layer_mask(model, [2, (3, 1)]),
                               torch.tensor([[0.0] * 4, [1.0] * 4, [0.0, 1.0, 0.0, 0.0]]))
    rows = gate_scale_rows(model, [0.5, 2.0], [(3, 1)])
    assert rows.shape == (2, 3, 4) and rows.sum() == 2.5 and rows[1, 2, 1] == 2.0


@pytest.mark.parametrize("spec, message", [
    ("0-2", r"layer\(s\) 0 have no adaption prompt; this adapter's prompts are in layers 1-3"),
    ("7", r"layer\(s\) 7 have no adaption prompt"),
    ("two", r"'two' is not a layer number or a range A-B"),
    ("3-", r"'3-' is not a layer number"),
    (" , ", "no layers named"),
    ("top 4", r"the top N layers needs N from 0 to 3 .*got 4"),
    ("3:4-5", r"head\(s\) 4-5 do not exist; this model's layers have heads 0-3"),
    ("0:1", r"layer\(s\) 0 have no adaption prompt"),
    ("3:", r"'3:' is not a layer number or a range A-B, each with heads after a colon"),
    ("3:1:2", r"'3:1:2' is not a layer number"),
    ("1, 3-2", r"'3-2' runs backwards; write the range low to high"),  # (it was dropped without a word)
    ("1, 3:2-1", r"'3:2-1' runs backwards"),
    ("0-30000000", r"layer\(s\) 0, 4-30000000 have no adaption prompt"),  # at once (it built the range first)
    ("3:1-99999999", r"head\(s\) 4-99999999 do not exist"),
    ("bottom 5", r"the bottom N layers needs N from 0 to 3 .*got 5"),
])
def test_bad_layer_selections_are_refused_naming_the_layers(spec, message):
    model = make_model(TINY, V2)
    with pytest.raises(ValueError, match="gate_layers: " + message):
        parse_layers(spec, model)


def test_selections_that_are_not_layers_or_pairs_are_refused():
    with pytest.raises(ValueError, match=r"gate_layers: '3' is neither a layer number nor a \(layer, head\) pair"):
        normalized(make_model(TINY, V2), [2, "3"])


def test_only_the_chosen_layers_speak_in_a_generated_answer():
    model = make_model(TINY, V2)
    prompt = [tokens(1, 6, TINY.vocab_size)[0].tolist()]

    def answer(scale) -> list[int]:
        request = GenerationRequest(max_new_tokens=8, sampling=SamplingParams(temperature=0))
        return [step[0] for step in decode_tokens(model, prompt, request, gate_scale=scale)]

    assert answer(gate_scale_rows(model, [1.0], [])) == answer(0.0)
    assert answer(gate_scale_rows(model, [1.0], [1, 2, 3])) == answer(1.0)
    saved = without_gates(model, {1: None, 3: None})
    only_2 = answer(1.0)
    restore(model, saved)
    assert answer(gate_scale_rows(model, [1.0], [2])) == only_2


@pytest.fixture(scope="module")
def saved_v2(base_folder, tmp_path_factory):
    """A randomized v2 adapter (prompts in layers 1-3 of the 4) on the random base, saved, and loaded."""
    model = randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"), std=0.6)
    path = adapter.save_adapter(model, tmp_path_factory.mktemp("v2") / "adapter")
    return path, model


def silenced(model, keep: list[int]):
    """`model`'s gates zeroed in every adapter layer but `keep`: the reference a layer selection must equal."""
    return without_gates(model, {layer: None for layer in adapter_layers(model) if layer not in keep})


def test_the_command_lines_answer_and_score_with_only_the_chosen_layers(base_folder, saved_v2, tmp_path, capsys):
    path, model = saved_v2
    question = "What is left of the star?"
    greedy = dict(temperature=0.0, max_new_tokens=8, stop=list(STOP_STRINGS))
    saved = silenced(model, [2])
    only_2 = [model.generate(alpaca(question), gate_scale=scale, **greedy) for scale in (1.0, 2.0)]
    restore(model, saved)
    flags = ["--base", str(base_folder), "--adapter", str(path), "--prompt", question, "--temperature", "0",
             "--max-new-tokens", "8", "--gate-layers", "2"]
    assert generate_main(flags) == 0
    out, err = capsys.readouterr()
    assert out == only_2[0] + "\n"
    assert err == "note: the prompts speak in layers 2 only, of this adapter's 1-3\n"
    assert generate_main([*flags, "--gate-sweep", "1,2"]) == 0
    assert capsys.readouterr().out == f"--- gate scale 1\n{only_2[0]}\n--- gate scale 2\n{only_2[1]}\n"
    assert generate_main([*flags[:-1], "0-1"]) == 2
    assert capsys.readouterr().err == ("error: --gate-layers: layer(s) 0 have no adaption prompt; this adapter's "
                                       "prompts are in layers 1-3\n")
    swept = []
    for count, label in enumerate(["top 0: none", "top 1: 3", "top 2: 2-3", "top 3: 1-3"]):
        saved = silenced(model, [1, 2, 3][3 - count:])
        swept.append(f"--- {label}\n{model.generate(alpaca(question), gate_scale=1.5, **greedy)}")
        restore(model, saved)
    assert generate_main([*flags[:-2], "--layer-sweep", "--gate-scale", "1.5"]) == 0
    assert capsys.readouterr().out == "\n".join(swept) + "\n"
    assert generate_main([*flags[:-2], "--layer-sweep", "--gate-sweep", "0,1"]) == 2
    assert capsys.readouterr().err == "error: --layer-sweep: not with --gate-sweep\n"
    with pytest.raises(SystemExit):
        generate_main([*flags, "--layer-sweep"])
    assert "not allowed with argument" in capsys.readouterr().err

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": question, "output": "The red circle."},
                                {"instruction": "Name a colour.", "input": "sky", "output": "blue"}]))
    scored = evaluate(model, data, gate_scales=[0.0, 1.5], layers=[3, 1], exact=True)
    saved = silenced(model, [1, 3])
    reference = evaluate(model, data, gate_scales=[0.0, 1.5], exact=True)
    restore(model, saved)
    assert [(s.loss, s.token_accuracy, s.exact) for s in scored.scores] == \
        [(s.loss, s.token_accuracy, s.exact) for s in reference.scores]
    assert scored.answers == reference.answers and scored.gate_layers == [1, 3]
    assert scored.scores[1].loss != evaluate(model, data, gate_scales=[1.5]).scores[0].loss
    assert "prompts only in layers 1, 3" in table(scored).splitlines()[0]


def test_answer_files_and_next_tokens_take_the_layers_and_say_which_spoke(base_folder, saved_v2, tmp_path):
    path, model = saved_v2
    questions = tmp_path / "questions.jsonl"
    questions.write_text('"Name a colour."\n{"instruction": "Add them.", "input": "2 3"}\n')
    out = tmp_path / "answers.jsonl"
    assert generate_main(["--base", str(base_folder), "--adapter", str(path), "--prompts-file", str(questions),
                          "--out", str(out), "--temperature", "0", "--max-new-tokens", "6", "--gate-layers",
                          "top 1"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    saved = silenced(model, [3])
    expected = [model.generate(alpaca("Name a colour."), temperature=0.0, max_new_tokens=6, stop=list(STOP_STRINGS)),
                model.generate(alpaca("Add them.", "2 3"), temperature=0.0, max_new_tokens=6,
                               stop=list(STOP_STRINGS))]
    probabilities = next_tokens(model, "Name a colour.", [0.5, 2.0], template="alpaca").probabilities
    restore(model, saved)
    assert [line["answer"] for line in lines] == expected
    assert {line["gate_layers"] for line in lines} == {"top 1"}
    chosen = next_tokens(model, "Name a colour.", [0.5, 2.0], template="alpaca", layers=[3])
    torch.testing.assert_close(torch.tensor(chosen.probabilities), torch.tensor(probabilities))


def test_evaluate_sweeps_the_top_layers_in_one_command(base_folder, saved_v2, tmp_path, capsys):
    path, model = saved_v2
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue."}]))
    flags = ["--base", str(base_folder), "--data", str(data), "--gate-sweep", "0.5,1"]
    assert evaluate_main([*flags, "--adapter", str(path), "--layer-sweep", "--json", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    assert [e["gate_layers"] for e in written] == [[], [3], [2, 3], [1, 2, 3]]
    for entry in written:
        direct = evaluate(model, data, gate_scales=[0.5, 1.0], layers=entry["gate_layers"])
        assert [s["loss"] for s in entry["scores"]] == [s.loss for s in direct.scores]
    tables = capsys.readouterr().out.split("\n\n")
    assert "every prompt silent" in tables[0] and "prompts only in layers 2-3" in tables[2]
    assert evaluate_main([*flags, "--layer-sweep"]) == 2
    assert capsys.readouterr().err == "error: --layer-sweep: this model has no adaption prompts (no layers to choose " \
                                      "from)\n"
    with pytest.raises(SystemExit):
        evaluate_main([*flags, "--adapter", str(path), "--layer-sweep", "--gate-layers", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_only_the_chosen_heads_speak_in_answers_and_scores(base_folder, saved_v2, tmp_path, capsys):
    path, model = saved_v2
    question = "What is left of the star?"
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": question, "output": "The red circle."}]))
    saved = without_gates(model, {1: None, 3: [0, 3]})
    expected = model.generate(alpaca(question), gate_scale=1.0, temperature=0.0, max_new_tokens=8,
                              stop=list(STOP_STRINGS))
    reference = evaluate(model, data, gate_scales=[1.5], exact=True)
    restore(model, saved)
    flags = ["--base", str(base_folder), "--adapter", str(path), "--prompt", question, "--temperature", "0",
             "--max-new-tokens", "8", "--gate-layers", "2, 3:1-2"]
    assert generate_main(flags) == 0
    assert capsys.readouterr() == (expected + "\n", "note: the prompts speak in layers 2, 3:1-2 only, of this "
                                                    "adapter's 1-3\n")
    chosen = [2, (3, 1), (3, 2)]
    scored = evaluate(model, data, gate_scales=[1.5], layers=chosen, exact=True)
    assert scored.scores[0].loss == reference.scores[0].loss and scored.answers == reference.answers
    assert scored.scores[0].loss != evaluate(model, data, gate_scales=[1.5], layers=[2, 3]).scores[0].loss
    assert "prompts only in layers 2, 3:1-2" in table(scored).splitlines()[0]
    assert evaluate_main(["--base", str(base_folder), "--adapter", str(path), "--data", str(data), "--gate-sweep",
                          "1.5", "--gate-layers", "3:1-2,2", "--json", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    assert written[0]["gate_layers"] == [2, [3, 1], [3, 2]]
    assert written[0]["scores"][0]["loss"] == reference.scores[0].loss
