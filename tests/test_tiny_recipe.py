"""The whole tiny-model recipe at micro scale (a few steps of every stage): it runs end to end, its
artifacts load through the short names, it is bit-for-bit reproducible, and eval writes its reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import adapter
from adapter import cpu_features
from adapter.cpu_features import describe_cpu
from adapter.generate import generate_batch
from adapter.prompts import STOP_STRINGS, image_question
from adapter.tiny import assets
from adapter.tiny.build import MANIFEST, STAGES, Build
from adapter.tiny.card import CARD, write_card
from adapter.tiny.clip_probe import clip_probe
from adapter.tiny.evaluate import FROZEN, MAX_NEW_TOKENS, answers, evaluate, held_out
from adapter.tiny.probe import probe, scores
from adapter.tiny.questions import IMAGE_CATEGORIES
from adapter.tiny.recipe import MICRO
from adapter.tiny.report import ACCURACY_PNG, HEADING, write_accuracy, write_benchmarks

TEXT_STAGES = [s for s in STAGES if s != "image"]


def build(out, work, stages=TEXT_STAGES):
    threads = torch.get_num_threads()
    try:
        return Build(MICRO, out, work, log=lambda _: None).run(stages)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    manifest = build(root / "out", root / "work")
    return root, manifest


def test_every_stage_writes_its_artifacts(micro):
    root, manifest = micro
    out = root / "out"
    for name in ("base/params.json", "base/consolidated.00.pth", "base/tokenizer.model", "text/adapter.safetensors",
                 "text/gates.png", assets.CLIP_CONFIG, assets.CLIP_WEIGHTS, "examples/examples.json", MANIFEST, CARD):
        assert (out / name).is_file(), name
    assert (out / "text/gates.png").read_bytes() == (root / "work/text-run/gates.png").read_bytes(), "the run's plot"
    assert set(manifest["stages"]) == set(TEXT_STAGES)
    assert manifest["files"]["base/consolidated.00.pth"]["sha256"]
    assert all(t.dtype == torch.float16 for t in torch.load(out / "base/consolidated.00.pth").values())
    card = (out / CARD).read_text()
    assert "Build time" in card
    where = f"{describe_cpu()}, {MICRO.threads} threads"
    assert all(info["cpu"] == where for info in manifest["stages"].values()) and where in card, "times name their CPU"


def test_the_artifacts_load_through_the_short_names(micro):
    out = micro[0] / "out"
    base, text_adapter, _, _ = assets.resolve("tiny", None, None, None, root=out)
    assert (base, text_adapter) == (out / "base", out / "text")
    model = adapter.load(base, adapter=text_adapter, device="cpu")
    assert model.adapter_args.prompt_len == MICRO.text.prompt_len and model.args.dim == MICRO.dim
    assert isinstance(model.generate(adapter.alpaca("What colour is the star?"), temperature=0.0, max_new_tokens=4),
                      str)
    _, _, clip, clip_model = assets.resolve("x", None, "tiny", None, root=out)
    from adapter.visual import load_image_encoder

    encoder = load_image_encoder(clip, clip_model)
    assert encoder.image_size == 64 and encoder.output_dim == MICRO.clip.embed_dim


def test_fp32_turns_off_bf16_in_every_stage_and_nothing_else():
    fp32 = MICRO.in_fp32()
    assert MICRO.bf16_stages == ("base", "clip", "text", "image") and fp32.bf16_stages == ()

    def without_bf16(recipe):
        return {name: {k: v for k, v in value.items() if k != "bf16"} if isinstance(value, dict) else value
                for name, value in recipe.to_dict().items()}

    assert without_bf16(fp32) == without_bf16(MICRO)


def test_a_build_on_a_cpu_that_emulates_bf16_says_so_for_its_bf16_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_bf16", lambda: "emulated")
    build = Build(MICRO, tmp_path / "out", tmp_path / "work")
    said = build.bf16_warning(["data", "clip", "text", "examples"])
    assert said.startswith("warning: bf16 autocast in stage(s) clip, text: this CPU has neither AMX nor AVX512-BF16")
    assert "--fp32" in said
    assert build.bf16_warning(["data", "examples", "card"]) is None, "those stages do not train"
    assert Build(MICRO.in_fp32(), tmp_path / "out", tmp_path / "work").bf16_warning(STAGES) is None
    monkeypatch.setattr(cpu_features, "cpu_bf16", lambda: "amx")
    assert build.bf16_warning(STAGES) is None


def test_a_rebuild_gives_the_same_bytes(micro, tmp_path):
    root, manifest = micro
    again = build(tmp_path / "out", tmp_path / "work", ["data", "tokenizer", "base", "clip", "text"])
    for name, entry in again["files"].items():
        assert manifest["files"][name]["sha256"] == entry["sha256"], name


def test_the_image_stage_trains_through_finetune(micro, tmp_path):
    root, _ = micro
    manifest = build(root / "out", root / "work", ["image"])
    assert (root / "out" / "image" / "adapter.safetensors").is_file() and "image" in manifest["stages"]
    model = adapter.load(*assets.resolve("tiny", "tiny-image", None, None, root=root / "out")[:2], device="cpu")
    assert model.adapter_args.visual == MICRO.image.visual
    # the adapter names its CLIP config relative to itself, so a copied folder loads by path alone
    config = json.loads((root / "out" / "image" / "adapter.json").read_text())
    assert config["adapter_args"]["clip_model"] == "../clip/tiny-clip.json"
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "out", moved)
    model = adapter.load(moved / "base", adapter=moved / "image", clip=moved / assets.CLIP_WEIGHTS, device="cpu")
    assert model.adapter_args.clip_model == str(moved / "image" / "../clip/tiny-clip.json")
    assert model.image_encoder is not None


def built_image_stage(micro) -> Path:
    """The micro build's out folder with its image adapter (built here when this test runs before the image
    stage's own test, e.g. alone)."""
    root = micro[0]
    out = root / "out"
    if not (out / assets.IMAGE).exists():
        build(out, root / "work", ["image"])
    return out


def test_eval_writes_accuracy_plot_card_and_its_benchmarks_section(micro, tmp_path):
    out = built_image_stage(micro)
    results, counts = evaluate(MICRO.seed, MICRO.eval_per_category, MICRO.gate_scales, out, log=lambda _: None)
    assert set(results["text"]) == {"0", "1"} and 0 <= results["text"]["1"]["all"] <= 1
    assert set(results["image"]) == {"0", "1", FROZEN}, "the image adapter's biases stay on at gate 0"
    native = scores(probe(out, MICRO.seed, MICRO.eval_per_category)["dialogue"])
    assert set(native) == {"colour", "shape", "count", "position", "comparison", "listing", "all"}
    clip_read = clip_probe(out / assets.CLIP, MICRO.seed, MICRO.clip_probe_pictures, MICRO.clip_probe_epochs,
                           MICRO.eval_per_category, log=lambda _: None)
    assert set(clip_read) == {"global", "tokens"} and set(clip_read["tokens"]) == {*IMAGE_CATEGORIES, "all"}
    write_accuracy(results, out, counts, native, clip_read)
    write_card(out)
    card = (out / CARD).read_text()
    assert f"({100 * native['all']:.0f}% in all)" in card
    assert f"answers the held-out image questions {100 * clip_read['global']['all']:.0f}% right from its global" in card
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    write_benchmarks(results, counts, benchmarks, out / ACCURACY_PNG)
    text = benchmarks.read_text()
    assert f"## {HEADING}" in text and "## Other\n\nkept" in text and "| 0 |" in text
    assert "| frozen base (gate 0, delta scale 0) |" in text
    assert (out / ACCURACY_PNG).read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "accuracy.json").read_text())["questions"]["text"] == counts["text"]


def test_a_stage_re_run_on_another_cpu_is_named_in_the_card(micro, tmp_path):
    root, manifest = micro
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    changed = json.loads(json.dumps(manifest))  # the fixture's own stays as built
    changed["stages"]["text"]["cpu"] = "Another CPU, 2 threads"
    del changed["stages"]["data"]["cpu"]
    (out / MANIFEST).write_text(json.dumps(changed))
    card = write_card(out).read_text()
    first = f"{describe_cpu()}, {MICRO.threads} threads"
    assert (f"on machines shared with other jobs (data on a CPU the manifest does not record; tokenizer, base, "
            f"clip, examples, card on {first}; text on Another CPU, 2 threads)") in card


def test_the_frozen_row_answers_as_the_bare_base_does(micro):
    out = built_image_stage(micro)
    base_path, image, clip, clip_model = assets.resolve("tiny", "tiny-image", None, None, root=out)
    image_model = adapter.load(base_path, adapter=image, clip=clip, clip_model=clip_model, device="cpu")
    base = adapter.load(out / assets.BASE, device="cpu")
    questions = held_out("image", MICRO.seed, 3)
    bare = generate_batch(base, [image_question(q.question) for q in questions], temperature=0.0,
                          max_new_tokens=MAX_NEW_TOKENS, stop=list(STOP_STRINGS))
    assert answers(image_model, questions, 0.0, images=True, delta_scale=0.0) == [a.strip() for a in bare]


def test_names_point_at_the_shipped_files_unless_a_local_path_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="build it with `python -m adapter.tiny build`"):
        assets.resolve("tiny", None, None, None, root=tmp_path / "missing")
    (tmp_path / "tiny").mkdir()
    assert assets.resolve("tiny", None, None, None, root=tmp_path / "missing") == ("tiny", None, None, None)
    assert assets.resolve("/some/base", "/some/adapter", None, None) == ("/some/base", "/some/adapter", None, None)


def test_repeated_windows_say_a_corpus_span_again_in_the_corpus_shape():
    from adapter.tiny.pretrain import repeated_windows

    windows = torch.arange(5 * 257).reshape(5, 257)
    got = repeated_windows(windows, 3, torch.Generator().manual_seed(0))
    assert got.shape == (3, 257)
    for row in got:
        start = int(row[0])
        assert start % 257 == 0, "a span starts where a corpus window starts"
        assert torch.equal(row[:128], torch.arange(start, start + 128))
        assert torch.equal(row[128:256], row[:128]) and int(row[256]) == start
