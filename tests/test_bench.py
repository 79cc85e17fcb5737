"""The benchmark harness in --smoke mode (tiny shapes; nothing is timed against a threshold): `python -m bench`
writes well-formed sections with ours / peer ratios and the equality checks it ran, bench/gpu.sh --smoke runs
on the CPU, and a peer that does not compute our model is refused before anything is timed."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import __main__ as bench_main
from bench import carry, compare, decode_peers, peers, report
from bench.shapes import SMOKE, SMOKE_ADAPTER

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's and transformers' own deprecations


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-4000:]}"
    return done


def sections(text: str) -> dict[str, str]:
    """`## ` heading -> body."""
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def tables(section: str) -> list[list[list[str]]]:
    """Every markdown table of a section as rows of cells (header first), checking that it is well formed."""
    found, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            assert all(row.endswith("|") for row in current), current
            rows = [[cell.strip() for cell in row.strip("|").split("|")] for row in current]
            assert len(rows) >= 3, f"a table needs a header, a separator and rows: {current}"
            assert all(cell == "---" for cell in rows[1]), rows[1]
            assert all(len(row) == len(rows[0]) for row in rows), f"ragged table: {current}"
            found.append([rows[0]] + rows[2:])
            current = []
    return found


def ratio_column(rows: list[list[str]]) -> list[str]:
    """The `ours / peer` cells, each a number, "n/a" or empty (a row without a peer figure)."""
    index = rows[0].index("ours / peer")
    cells = [row[index] for row in rows[1:]]
    assert all(re.fullmatch(r"\d+\.\d\d|n/a|", cell) for cell in cells), cells
    return cells


def check_table(section: str, labels: list[str]) -> None:
    """The equality check ran for each label and passed within its tolerance."""
    table = next(t for t in tables(section) if "greedy tokens equal" in t[0])
    assert [row[0] for row in table[1:]] == labels
    for label, difference, allowed, equal in table[1:]:
        assert float(difference) <= float(allowed), label
        assert re.fullmatch(r"\d+ / 16( \(then a near tie\))?", equal), equal


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "BENCHMARKS.md"
    before = (ROOT / "BENCHMARKS.md").read_text()
    run([sys.executable, "-m", "bench", "--smoke", "--only",
         "decode_peers,memory,adapters,scaling,train,answers,tied,v2_parts,decode", "--write", str(out)])
    assert (ROOT / "BENCHMARKS.md").read_text() == before, "a smoke run must not touch the real BENCHMARKS.md"
    return folder, out.read_text()


def test_smoke_run_names_the_machine_and_what_ran(smoke_report):
    _, text = smoke_report
    first = text.split("\n## ")[1]
    assert first.startswith("This run: `python -m bench --smoke"), "the run's own section comes first"
    assert "bitsandbytes" in first and "torch" in first and "threads" in first
    assert "- ran: decode_peers, memory, adapters, scaling, train, answers, tied, v2_parts" in first
    assert "decode (no --smoke mode)" in first


def test_smoke_decode_peers_section(smoke_report):
    _, text = smoke_report
    section = next(body for head, body in sections(text).items() if head.startswith("Decode vs transformers"))
    compiled = ["fp32, compiled"] if decode_peers.COMPILE and "not available" not in section else []
    check_table(section, ["fp32", *compiled, *list(peers.PRECISIONS)[1:]])
    timed = next(t for t in tables(section) if "ours / peer" in t[0])
    names = {(row[0], row[1]) for row in timed[1:]}
    for precision in peers.PRECISIONS:
        for measure in ("greedy decode, batch 1, tokens/s", "greedy decode, batch 8, tokens/s",
                        "time to first token, 64-token prompt, ms", "time to first token, 512-token prompt, ms"):
            assert (precision, measure) in names
    assert ("fp32", decode_peers.BLAS_FLOOR) in names
    if decode_peers.COMPILE:  # the decode path's torch.compile option: checked, then timed (or why not)
        assert any(row[1].endswith("through `step(compile=True)`") for row in timed[1:] if row[0] == "fp32")
        if compiled:  # beside the floor of its own kernel
            assert ("fp32", decode_peers.REDUCTION_FLOOR) in names
    assert sum(bool(cell) for cell in ratio_column(timed)) >= 4 * len(peers.PRECISIONS)


def test_smoke_memory_scaling_and_training_sections(smoke_report):
    folder, text = smoke_report
    found = sections(text)
    memory = next(body for head, body in found.items() if head.startswith("Memory of generation"))
    check_table(memory, ["fp32"])
    rows = next(t for t in tables(memory) if "ours / peer" in t[0])
    assert {row[1] for row in rows[1:]} == {"512", "2048"}
    assert all(ratio_column(rows))

    scaling = next(body for head, body in found.items() if head.startswith("Scaling"))
    check_table(scaling, [f"fp32, {k} adapter layers" for k in (0, SMOKE.n_layers)])
    assert "![" in scaling and "(docs/scaling.png)" in scaling
    assert (folder / "docs" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ratio_column(next(t for t in tables(scaling) if "ours / peer" in t[0]))

    training = next(body for head, body in found.items() if head.startswith("Training (CPU"))
    rows = next(t for t in tables(training) if "ours / peer" in t[0])
    assert {(row[0], row[1]) for row in rows[1:]} == {(m, b) for m in ("v1", "v2") for b in ("fp32", "nf4")}
    first_losses = [row for row in rows[1:] if row[2].startswith("loss, first step")]
    assert all(row[3] == row[4] for row in first_losses), "both sides start from the same base model"
    assert all(ratio_column([rows[0], *(row for row in rows[1:] if "tokens/s" in row[2])]))


def test_smoke_adapters_section_compares_separate_and_shared_bases(smoke_report):
    _, text = smoke_report
    section = next(body for head, body in sections(text).items() if head.startswith("Several adapters on one base"))
    assert "gives exactly the logits it gives alone (fp32: 0.0)" in section
    rows = tables(section)[0]
    assert rows[0][:5] == ["precision", "adapters", "separate bases: MB", "one shared base: MB", "separate / shared"]
    assert [(row[0], row[1]) for row in rows[1:]] == [("fp32", "1"), ("fp32", "2"), ("fp32", "4")]
    assert all(re.fullmatch(r"\d+\.\d\d", row[4]) for row in rows[1:])


def test_gpu_script_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "GPU.md"
    profiles = tmp_path / "profiles"
    run(["bash", "bench/gpu.sh", "--smoke", "--write", str(out), "--profile", str(profiles)])
    section = out.read_text().split("\n## ")[1]
    assert section.startswith("GPU (CPU)")
    check_table(section, ["fp32", "nf4", "int8"])
    rows = next(t for t in tables(section) if "ours / peer" in t[0])
    assert any(row[1].startswith("one training step") for row in rows[1:] if row[0] == "nf4")
    assert any(row[1].startswith("image question") for row in rows[1:])
    assert {row[0] for row in rows[1:] if row[1] == "greedy decode, batch 8, tokens/s (all rows)"} == \
        {"fp32", "nf4", "int8"}
    assert ratio_column(rows)
    unquantized = {row[1]: row[2] for row in rows[1:] if row[0] == "fp32"}
    assert "floor: every weight read once (a sum over each matrix), tokens/s" in unquantized
    first = ": first request (compiling, capturing), s; greedy tokens equal to the plain path's"
    assert unquantized[f"greedy decode static step (no capture on CPU){first}"].endswith("; 16 / 16")
    compiled = "greedy decode through `step(compile=True)` (compiled)"
    if not unquantized.get(compiled, "").startswith("not available"):  # no C++ compiler
        assert unquantized[compiled + first].endswith("; 16 / 16")
    alone = [row for row in rows[1:] if row[0] == "nf4" and "alone on the device" in row[1]]
    totals, parts = alone[::2], alone[1::2]
    settings = ["KV cache auto, CLIP tower in fp32", "KV cache int8", "KV cache int8, CLIP tower in nf4"]
    assert [row[1].split(", ", 1)[1].split(":")[0] for row in totals] == settings
    assert [row[1].split(", ", 1)[1].split(": of which")[0] for row in parts] == settings
    assert all(re.fullmatch(r"\d+\.\d\d; \d+\.\d\d \(\d+\.\d\d\)", row[2]) for row in totals)
    for total, part in zip(totals, parts):  # MiB: base, tower, visual prompt, KV cache, the rest
        *weights, rest = part[2].split(", ")
        base, tower, visual, kv = (float(x) for x in weights)
        assert rest == "- (on a GPU only)", "resident memory on the CPU undercounts it (it read below zero)"
        assert tower > 0 and visual > 0 and kv > 0 and base > 0
        assert abs((base + tower + visual) / 1024 - float(total[2].split(";")[0])) <= 0.006  # they are the weights
    kv_auto, kv_int8 = (float(part[2].split(", ")[3]) for part in parts[:2])
    assert kv_int8 < kv_auto
    written_base = {row[0]: row[2] for row in rows[1:] if row[1].startswith("pre-quantized folder")}
    assert set(written_base) == {"nf4", "int8"} and all(v.startswith("yes; ") for v in written_base.values())
    written = {path.name: path.read_text() for path in profiles.iterdir()}
    assert {"train-nf4-ours.txt", "train-nf4-peer.txt", "decode-fp32-plain.txt", "decode-nf4-plain.txt",
            "decode-fp32-graphs.txt"} <= set(written)
    assert "bitsandbytes::gemm_4bit" in written["train-nf4-ours.txt"]  # the profile of the nf4 base's step
    assert "Self CPU" in written["decode-fp32-plain.txt"]
    shares = unquantized["decode / floors"].split("; ")
    assert [share.split(": ")[0] for share in shares][:2] == ["plain", "static step (no capture on CPU)"]
    assert all(re.fullmatch(r"[^:]+: \d+% of the floor, \d+% of the bandwidth floor", share) for share in shares)
    bandwidth = "bandwidth floor: one large read at the memory's speed, as tokens/s of these weights"
    assert float(unquantized[bandwidth].split()[0]) > 0


def test_gpu_script_runs_only_the_stages_asked_for(tmp_path):
    out = tmp_path / "GPU.md"
    done = run([sys.executable, "-m", "bench.gpu", "--smoke", "--only", "memory", "--write", str(out)])
    assert "] memory" in done.stderr and "] nf4" not in done.stderr
    rows = next(t for t in tables(out.read_text()) if "ours / peer" in t[0])
    assert rows[1:] and all("alone on the device" in row[1] for row in rows[1:])
    refused = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--only", "memory,bf17"], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2
    assert "--only: no stage bf17; the stages are fp32, nf4, int8, memory, fast-fp32, fast-nf4, prequantized" in \
        refused.stderr
    for flags, message in ((["--only", ""], "--only: no stage named; the stages are fp32"),
                           (["--budget", "0"], "--budget: must be a number of seconds above 0, got '0'"),
                           (["--budget", "nan"], "--budget: must be a number of seconds above 0, got 'nan'"),
                           (["--device", "foo"], "--device: 'foo' is not a device name")):  # (all stages / a traceback)
        refused = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", *flags], cwd=ROOT,
                                 capture_output=True, text=True, check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    refused = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--profile", str(blocked / "profiles")],
                             cwd=ROOT, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and f"--profile: cannot make the folder {blocked / 'profiles'}" in refused.stderr


def test_a_gpu_run_whose_budget_skips_its_last_stage_still_prints_what_it_measured(tmp_path):
    """(it printed nothing, and the skipped stages were named nowhere)"""
    out = tmp_path / "GPU.md"
    done = run([sys.executable, "-m", "bench.gpu", "--smoke", "--budget", "0.5", "--only", "memory,prequantized",
                "--write", str(out)])
    assert "] memory" in done.stderr and "] prequantized" not in done.stderr
    assert done.stdout.startswith("## GPU (CPU)") and "alone on the device" in done.stdout
    assert "- skipped after the 0.5 s budget: prequantized" in done.stdout
    assert out.read_text().split("\n## ", 1)[1] == done.stdout.split("## ", 1)[1].rstrip("\n") + "\n"


def test_smoke_figures_never_go_into_the_repositorys_benchmarks_file(tmp_path):
    """(`--smoke --write BENCHMARKS.md` replaced real figures, and some smoke headings did not say smoke)"""
    before = (ROOT / "BENCHMARKS.md").read_text()
    for command in (["bench", "--smoke", "--only", "tied"], ["bench.tied", "--smoke"]):
        refused = subprocess.run([sys.executable, "-m", *command, "--write", "BENCHMARKS.md"], cwd=ROOT,
                                 capture_output=True, text=True, check=False)
        assert refused.returncode != 0 and "--write: --smoke figures mean nothing" in refused.stderr, refused.stderr
    assert (ROOT / "BENCHMARKS.md").read_text() == before
    done = run([sys.executable, "-m", "bench.tied", "--smoke", "--write", str(tmp_path / "smoke.md")])
    assert done.stdout.splitlines()[0].endswith("(--smoke: tiny shapes, figures mean nothing)")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> peers.Weights:
    return peers.write_weights(tmp_path_factory.mktemp("weights"), SMOKE)


def corrupt(peer) -> None:
    """Change one weight matrix of the peer a little (one layer's down projection, by 5%)."""
    with torch.no_grad():
        peer.get_base_model().model.layers[0].mlp.down_proj.weight.mul_(1.05)


def test_the_equality_check_passes_on_the_same_weights(weights):
    ours, peer = peers.pair(weights, "fp32", SMOKE_ADAPTER)
    check = compare.check_same(compare.Ours(ours), compare.Peer(peer), "fp32", compare.prompt(1, 32, SMOKE.vocab_size))
    assert check.difference < 1e-5 and check.equal_tokens == check.new_tokens


def test_a_corrupted_peer_is_refused_before_anything_is_timed(weights, monkeypatch):
    load = peers.load_peer

    def corrupted(*args, **kwargs):
        peer = load(*args, **kwargs)
        corrupt(peer)
        return peer

    timed = []
    monkeypatch.setattr(peers, "load_peer", corrupted)
    monkeypatch.setattr(decode_peers, "measure_side_by_side", lambda fns, repeats: timed.append(fns))
    with pytest.raises(compare.PeerMismatch, match="differ"):
        decode_peers.run_precision(weights, "fp32", SMOKE_ADAPTER, repeats=1, new_tokens=2, compiled=False)
    assert not timed, "nothing may be timed once the check has failed"


def test_a_corrupted_peer_is_refused_by_the_training_check(weights, monkeypatch):
    from bench import train

    build = train.build

    def corrupted(weights, side, *args):
        model = build(weights, side, *args)
        if side == "peer":
            corrupt(model)
        return model

    assert train.check_same_start(weights, "v2", "fp32", SMOKE_ADAPTER, smoke=True) < 1e-5
    monkeypatch.setattr(train, "build", corrupted)
    with pytest.raises(compare.PeerMismatch, match="first logits differ"):
        train.check_same_start(weights, "v1", "fp32", SMOKE_ADAPTER, smoke=True)


def test_smoke_leaves_out_what_has_no_smoke_mode_and_load_needs_its_flag():
    smoke, left = bench_main.chosen(argparse.Namespace(only=None, smoke=True, with_load=False))
    assert [b.name for b in smoke] == ["decode_peers", "memory", "adapters", "scaling", "train", "sessions",
                                       "answers", "space_fit", "tied", "v2_parts", "logprobs", "gpu"]
    assert any(note.startswith("load") for note in left)
    full, left = bench_main.chosen(argparse.Namespace(only=None, smoke=False, with_load=False))
    assert "load" not in [b.name for b in full] and any("--with-load" in note for note in left)


def test_report_tables_and_the_run_section_first(tmp_path):
    assert report.table(("a", "b"), [("1", "2")]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="cells"):
        report.table(("a", "b"), [("1",)])
    assert report.spread((2.0, 1.0, 3.0)) == "2.0 (1.0 / 3.0)" and report.ratio((2.0,) * 3, (4.0,) * 3) == "0.50"
    assert report.ratio((2.0,) * 3, (0.0,) * 3) == report.ratio((2.0,) * 3, (-0.001,) * 3) == "n/a"
    assert report.ratio((-0.001,) * 3, (2.0,) * 3) == "n/a" and report.ratio((0.0,) * 3, (2.0,) * 3) == "0.00"
    path = tmp_path / "B.md"
    report.replace_section(path, "One", "## One\n\nx\n")
    report.replace_section(path, "Run", "## Run\n\ny\n", first=True)
    assert [h for h in sections(path.read_text())] == ["Run", "One"]


def test_carry_keeps_only_the_wanted_bitsandbytes_libraries(tmp_path):
    assert carry.wanted("bitsandbytes/libbitsandbytes_cpu.so", ["130"])
    assert carry.wanted("bitsandbytes/libbitsandbytes_cuda130.so", ["130"])
    assert not carry.wanted("bitsandbytes/libbitsandbytes_cuda128.so", ["130"])
    assert not carry.wanted("timm/__pycache__/x.pyc", ["130"]) and not carry.wanted("open_clip_train/main.py", [])
    sizes = carry.copy(tmp_path / "vendor", ["130"])
    assert set(sizes) == set(carry.DISTRIBUTIONS) and sum(sizes.values()) < carry.LIMIT
    assert (tmp_path / "vendor" / "bitsandbytes" / "__init__.py").is_file()
    assert not list((tmp_path / "vendor" / "bitsandbytes").glob("libbitsandbytes_rocm*"))
    carry.copy(tmp_path / "vendor", ["130"])  # an earlier copy is replaced
    notes = tmp_path / "notes"
    (notes / "keep").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds files that are not an earlier copy"):  # (it was deleted)
        carry.copy(notes, ["130"])
    assert (notes / "keep").is_dir()
    for flags, message in ((["--cuda", "999"], "--cuda: bitsandbytes here has no library for CUDA 999"),
                           (["--cuda", ","], "--cuda: name the CUDA version(s)")):  # (none carried, exit 0)
        refused = subprocess.run([sys.executable, "-m", "bench.carry", "--out", str(tmp_path / "v2"), *flags],
                                 cwd=ROOT, capture_output=True, text=True, check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_attention_precision_section_has_both_modes(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run([sys.executable, "-m", "bench.attention", "--steps", "1", "--repeats", "1", "--write", str(out)])
    section = next(body for head, body in sections(out.read_text()).items() if head.startswith("Attention precision"))
    rows = tables(section)[0]
    assert rows[0] == ["attention", "ms per step", "speed-up over bf16"]
    assert [row[0].split(" ")[0] for row in rows[1:]] == ["bf16", "fp32"]
    assert rows[1][2] == "1.00" and float(rows[2][2]) > 0
    assert re.fullmatch(r"[\d.]+ \([\d.]+ / [\d.]+\)", rows[2][1])


def test_autocast_section_times_the_chosen_stages_both_ways(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    run([sys.executable, "-m", "bench.autocast", "--stages", "text", "--steps", "1", "--repeats", "1",
         "--write", str(out)])
    section = next(body for head, body in sections(out.read_text()).items() if head.startswith("Training precision"))
    rows = tables(section)[0]
    assert rows[0] == ["stage", "bf16 autocast, s per step", "float32, s per step", "bf16 / float32"]
    assert [row[0] for row in rows[1:]] == ["text"]
    bf16, fp32 = (float(cell.split(" ")[0]) for cell in rows[1][1:3])
    half = 0.005  # the cells are rounded to 2 decimals: the ratio of the medians lies within what that allows
    assert (bf16 - half) / (fp32 + half) - half <= float(rows[1][3]) <= (bf16 + half) / (fp32 - half) + half, \
        "the ratio of the medians"
    failed = subprocess.run([sys.executable, "-m", "bench.autocast", "--stages", "text,optimizer"], cwd=ROOT,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "--stages: unknown stage(s) ['optimizer']" in failed.stderr


def test_smoke_tied_section_holds_the_head_once(smoke_report):
    _, text = smoke_report
    section = next(body for head, body in sections(text).items() if head.startswith("Tied head"))
    for mode in ("fp32", "bf16", "nf4"):
        assert f"{mode}: logits of the two loads differ by at most 0.0e+00" in section
    rows = tables(section)[0]
    assert rows[0] == ["precision", "measure", "tied (shared)", "untied (copy)", "tied / untied"]
    held = {row[0]: float(row[4]) for row in rows[1:] if row[1] == "distinct parameter tensors, MB"}
    assert set(held) == {"fp32", "bf16", "nf4"} and all(r < 0.8 for r in held.values()), held


def test_smoke_answers_section_times_each_batch_size_after_checking_its_answers(smoke_report):
    _, text = smoke_report
    section = next(body for head, body in sections(text).items() if head.startswith("Answering a file of questions"))
    assert "every batch size's answers were checked equal to batch size 1's before timing" in section
    rows = tables(section)[0]
    assert rows[0] == ["batch size (questions)", "rows per batch", "questions/s", "min / max", "/ batch size 1"]
    assert [(row[0], row[1], row[4]) for row in rows[1:2]] == [("1", "2", "1.00")]
    assert [row[0] for row in rows[1:]] == ["1", "4"] and float(rows[2][2]) > 0


def test_smoke_v2_parts_section_times_every_kind_against_v1(smoke_report):
    _, text = smoke_report
    section = next(body for head, body in sections(text).items() if head.startswith("v2 parts"))
    rows = tables(section)[0]
    assert rows[0] == ["measure", "adapter", "figure", "/ v1"]
    measures = ["decode, plain path, tokens/s", "decode, fused path, tokens/s", "training step, ms"]
    decoded = 6 + 3  # every kind, and three of them merged (decode only)
    assert [row[0] for row in rows[1:]] == [m for m in measures for _ in range(decoded if "decode" in m else 6)]
    assert [rows[1 + i][3] for i in (0, decoded, 2 * decoded)] == ["1.00"] * 3, "v1 is each measure's first row"
    assert all(float(row[2].split(" ")[0]) > 0 for row in rows[1:])
    assert any("input scales" in row[1] for row in rows[1:]) and any("litgpt v2" in row[1] for row in rows[1:])
    assert sum(row[1].endswith("; merged (adapter.merge)") for row in rows[1:]) == 6


def test_lm_eval_task_names_a_bad_data_file_in_one_line(base_folder, tmp_path, capsys):
    from bench.lm_eval_task import main as task_main

    assert task_main(["--base", str(base_folder), "--data", str(tmp_path / "none.jsonl"), "--out",
                      str(tmp_path / "task")]) == 2
    assert capsys.readouterr().err == f"error: --data: {tmp_path / 'none.jsonl'} does not exist\n"
    assert not (tmp_path / "task").exists()


@pytest.mark.parametrize("module, argv, message", [
    ("bench.decode", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("bench.memory", ["--contexts", "512,x"], "argument --contexts: 'x' is not a whole number"),
    ("bench.answers", ["--batch-sizes", "1,0"], "argument --batch-sizes: must be at least 1, got 0"),
])
def test_benchmark_numbers_are_checked_by_their_command_line(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_a_benchmark_cannot_make_is_one_line(tmp_path, capsys):
    from bench import tied
    from bench.args import run_main

    (tmp_path / "file").write_text("")
    assert run_main(lambda: tied.main(["--folder", str(tmp_path / "file" / "under"), "--smoke"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "file" / "under") in err and err.count("\n") == 1


def test_smoke_space_fit_section(tmp_path, capsys):
    from bench.space_fit import HEADING
    from bench.space_fit import main as space_fit_main

    with pytest.raises(SystemExit):
        space_fit_main(["--modes", "none,nf5"])
    assert "argument --modes: quantize: unknown mode 'nf5'" in capsys.readouterr().err

    assert space_fit_main(["--smoke", "--write", str(tmp_path / "BENCHMARKS.md")]) == 0
    section = next(body for head, body in sections((tmp_path / "BENCHMARKS.md").read_text()).items()
                   if head.startswith(HEADING))
    table = next(t for t in tables(section) if t[0][0] == "--quantize")
    assert [row[0] for row in table[1:]] == ["none", "nf4"]
    assert all(re.fullmatch(r"\d+\.\d\d", cell) for row in table[1:] for cell in row[1:]), table


def test_smoke_logprobs_section(tmp_path):
    """Decoding with and without each token's log-probability kept, and with the answer scored afterwards, at
    batch 1 and 8, each against the plain decode."""
    from bench.logprobs import HEADING
    from bench.logprobs import main as logprobs_main

    assert logprobs_main(["--smoke", "--write", str(tmp_path / "BENCHMARKS.md")]) == 0
    section = next(body for head, body in sections((tmp_path / "BENCHMARKS.md").read_text()).items()
                   if head.startswith(HEADING) and "--smoke" in head)
    table = next(t for t in tables(section) if t[0][0] == "batch")
    assert [row[0] for row in table[1:]] == ["1"] * 4 + ["8"] * 4
    assert [row[3] for row in table[1:]][::4] == ["1.00", "1.00"]
    assert all(re.fullmatch(r"\d+ \(\d+ / \d+\)", row[2]) and re.fullmatch(r"\d+\.\d\d", row[3])
               for row in table[1:]), table


def test_smoke_sessions_section(tmp_path):
    """The server's memory read after the first answer and after each 2 of 4 new sessions, at the app's
    --max-sessions and at gradio's own capacity."""
    from bench.sessions import main as sessions_main

    assert sessions_main(["--smoke", "--write", str(tmp_path / "BENCHMARKS.md")]) == 0
    section = next(body for head, body in sections((tmp_path / "BENCHMARKS.md").read_text()).items()
                   if head.startswith("Sessions (CPU") and "--smoke" in head)
    table = next(t for t in tables(section) if t[0][0] == "sessions seen")
    assert [row[0] for row in table[1:]] == ["0", "2", "4"] and table[1][1:] == ["0", "0"]
    assert all(re.fullmatch(r"-?\d+", cell) for row in table[1:] for cell in row[1:]), table
