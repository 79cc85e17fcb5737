"""Data files as the hub stores datasets: Parquet rows read as the same records as JSON lines (fine-tuning,
evaluation, multiple choice, files of questions), and `hf:owner/name[/FILE]` fetching one file of a dataset
repository (the hub mocked: nothing leaves the machine)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from adapter.answer_file import read_questions as read_prompts
from adapter.choices import holds_choices, read_questions
from adapter.finetune import DataError, train
from adapter.finetune.records import read_records
from adapter.hub import resolve_data
from adapter.prompts import PROMPT_FORMATS
from tests.finetune_helpers import alpaca_records, tiny_config, write_jsonl

ALPACA = PROMPT_FORMATS["alpaca"]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_parquet_rows_are_the_records_of_the_same_json_lines(tmp_path):
    """Columns are fields; a null (a row without `input` beside rows with one) is a field left out."""
    rows = [{"instruction": "Name a shape.", "input": None, "output": "Circle."},
            {"instruction": "Add.", "input": "1 and 2", "output": "3"}]
    parquet = read_records(write_parquet(tmp_path / "d.parquet", rows))
    jsonl = read_records(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Name a shape.", "output": "Circle."},
                                                            rows[1]]))
    assert parquet == jsonl and len(parquet) == 2
    chat = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    assert read_records(write_parquet(tmp_path / "c.parquet", chat)) == read_records(
        write_jsonl(tmp_path / "c.jsonl", chat))


def test_mmlu_and_arc_parquet_files_read_as_their_json(tmp_path):
    """As the hub stores cais/mmlu (`choices` a list, `answer` an index) and allenai/ai2_arc (`choices` a struct)."""
    mmlu = [{"question": "Colour of grass?", "subject": "x", "choices": ["red", "green", "blue"], "answer": 1}]
    arc = [{"id": "q1", "question": "Colour of grass?",
            "choices": {"text": ["red", "green", "blue"], "label": ["A", "B", "C"]}, "answerKey": "B"}]
    for rows in (mmlu, arc):
        assert holds_choices(write_parquet(tmp_path / "mc.parquet", rows))  # the app's Score tab tells them apart
        assert read_questions(write_parquet(tmp_path / "mc.parquet", rows), ALPACA) == read_questions(
            write_jsonl(tmp_path / "mc.jsonl", rows), ALPACA)
    prompts = [{"instruction": "What is 3 + 4?"}, {"instruction": "Name a colour.", "system": None}]
    from_parquet = read_prompts(write_parquet(tmp_path / "q.parquet", prompts))
    from_json = read_prompts(write_jsonl(tmp_path / "q.jsonl", [prompts[0], {"instruction": "Name a colour."}]))
    assert from_parquet[1].location == f"{tmp_path / 'q.parquet'} [row 1]"
    assert [replace(q, location="") for q in from_parquet] == [replace(q, location="") for q in from_json]


def test_bad_parquet_rows_are_named_by_row_and_a_broken_file_by_name(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [{"instruction": "fine", "output": "ok"},
                                                    {"instruction": "no output", "output": None},
                                                    {"instruction": "  ", "output": "x"}])
    with pytest.raises(DataError) as caught:
        read_records(path)
    assert "2 bad record(s)" in str(caught.value)
    assert f"{path} [row 1]: missing 'output'" in str(caught.value)
    assert f"{path} [row 2]: empty 'instruction'" in str(caught.value)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"--data: {broken} is not a readable Parquet file"):
        read_records(broken)
    assert not holds_choices(broken) and not holds_choices(path)


class FakeHub:
    """huggingface_hub's list_repo_files / hf_hub_download for dataset repositories, serving local files."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.asked = files, []

    def install(self, monkeypatch) -> FakeHub:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: pytest.fail("fetched a repository"))
        return self

    def list_repo_files(self, repo_id: str, repo_type: str, **revision: str) -> list[str]:
        assert repo_type == "dataset"
        return ["README.md", ".gitattributes", *self.files]

    def hf_hub_download(self, repo_id: str, filename: str, repo_type: str, **revision: str) -> str:
        self.asked.append((repo_id, filename, repo_type, *revision.values()))
        return str(self.files[filename])


def test_a_hub_dataset_gives_its_one_data_file_or_its_one_train_file(tmp_path, monkeypatch):
    train_file = write_parquet(tmp_path / "train.parquet", alpaca_records(3))
    hub = FakeHub({"data/train-00000-of-00001.parquet": train_file,
                   "data/test-00000-of-00001.parquet": tmp_path / "test.parquet"}).install(monkeypatch)
    assert resolve_data("hf:owner/alpaca", "--data") == train_file
    assert hub.asked == [("owner/alpaca", "data/train-00000-of-00001.parquet", "dataset")]
    assert resolve_data("hf:owner/alpaca/data/test-00000-of-00001.parquet", "--data") == tmp_path / "test.parquet"
    assert resolve_data("hf:owner/alpaca@v2", "--data") == train_file
    assert hub.asked[-1] == ("owner/alpaca", "data/train-00000-of-00001.parquet", "dataset", "v2")
    assert resolve_data(tmp_path / "local.jsonl", "--data") == tmp_path / "local.jsonl"  # no hub for a path

    FakeHub({"alpaca_data_cleaned.json": tmp_path / "a.json"}).install(monkeypatch)
    assert resolve_data("hf:owner/cleaned", "--data") == tmp_path / "a.json"

    FakeHub({f"{split}/{subject}.parquet": tmp_path for split in ("dev", "test") for subject in ("a", "b")}
            ).install(monkeypatch)
    with pytest.raises(ValueError, match=r"--data: hf:owner/mmlu holds 4 data files and not one named train\*: "
                                         r"dev/a.parquet, dev/b.parquet, test/a.parquet, test/b.parquet; name one: "
                                         r"hf:owner/mmlu/FILE"):
        resolve_data("hf:owner/mmlu", "--data")
    FakeHub({}).install(monkeypatch)
    with pytest.raises(ValueError, match=r"--data: hf:owner/empty holds no data file \(.parquet, .jsonl, .json\)"):
        resolve_data("hf:owner/empty", "--data")
    with pytest.raises(ValueError, match=r"--data: 'hf:nobody' is not a hub dataset like hf:owner/name"):
        resolve_data("hf:nobody", "--data")


def test_an_unreachable_hub_is_one_error_naming_the_dataset(monkeypatch):
    import huggingface_hub

    def offline(*args, **options):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(ValueError, match=r"--val-data: could not get owner/data from the Hugging Face hub "
                                         r"\(OSError: no network\); download it yourself and pass the path"):
        read_records("hf:owner/data", flag="--val-data")


def test_fine_tuning_reads_a_hub_datasets_parquet_file(tmp_path, monkeypatch, base_folder):
    """The file is fetched once for reading and hashing (the hash a resumed run checks)."""
    records = alpaca_records(16)
    hub = FakeHub({"data/train-0.parquet": write_parquet(tmp_path / "train.parquet", records)}).install(monkeypatch)
    out = tmp_path / "run"
    train(tiny_config(base_folder, "hf:owner/alpaca", out, epochs=1))
    assert hub.asked == [("owner/alpaca", "data/train-0.parquet", "dataset")]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_examples"] == 16
