"""The functions Python programs call to load and write things (load, merge, quantize_base, convert, push) name an
argument of the wrong kind in one ValueError, as their command lines name a bad flag, before any work: each case was
a TypeError or AttributeError from pathlib, a comparison, a dict or str.strip that named neither argument nor
value."""

from __future__ import annotations

import pytest

import adapter
from adapter.config import AdapterArgs
from adapter.convert import convert
from adapter.merge import merge
from adapter.push import push
from adapter.quantize_base import quantize_base


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    model = adapter.load("tiny", adapter=AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=2))
    return adapter.save_adapter(model, tmp_path_factory.mktemp("lora") / "adapter")


CASES = [
    (lambda out, lora: adapter.load("tiny", dtype={}), r"dtype: unknown dtype \{\}"),
    (lambda out, lora: merge(b"tiny", lora, out),
     r"base: expected a path or a name \(tiny, hf:owner/name\), got b'tiny'"),
    (lambda out, lora: merge("tiny", lora, 5), "out: expected a folder's path, got 5"),
    (lambda out, lora: merge("tiny", lora, out, dtype=[]), r"dtype: unknown dtype \[\]"),
    (lambda out, lora: merge("tiny", lora, out, shard_gb="2"),
     "shard_gb: must be a number of GiB above 0 and at most 1,048,576, got '2'"),
    (lambda out, lora: merge("tiny", lora, out, shard_gb=1e300),  # (an OverflowError counting its bytes)
     r"shard_gb: must be a number of GiB above 0 and at most 1,048,576, got 1e\+300"),
    (lambda out, lora: quantize_base(True, out), r"base: expected a path or a name \(tiny, hf:owner/name\), got True"),
    (lambda out, lora: quantize_base("tiny", out, double_quant="no"), "double_quant: must be True or False, got 'no'"),
    (lambda out, lora: convert(None, out, "native", "tiny"),
     r"source: expected a path or a name \(tiny-text, hf:owner/name, official:NAME\), got None"),
    (lambda out, lora: convert("tiny-text", out, ["peft"], "tiny"), r"to: unknown target format \['peft'\]"),
    (lambda out, lora: convert("tiny-text", [out], "native", "tiny"), "target: expected a file's path"),
    (lambda out, lora: push("tiny-text", None, "tiny"), "repo: expected a hub repository id like owner/name, got None"),
    (lambda out, lora: push("tiny-text", "you/tiny", "tiny", private="yes"), "private: must be True or False"),
    (lambda out, lora: push("tiny-text", "you/tiny", "tiny", branch=0.5), "branch: expected text, got 0.5"),
]


@pytest.mark.parametrize("call, message", CASES, ids=[message.split(":")[0] + f"-{index}"
                                                      for index, (_, message) in enumerate(CASES)])
def test_an_argument_of_the_wrong_kind_is_named(tmp_path, lora, call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call(str(tmp_path / "out"), lora)
    assert not (tmp_path / "out").exists()
