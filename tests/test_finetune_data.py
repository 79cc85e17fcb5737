"""Fine-tuning data: records read and checked (every bad one reported with its place, nothing written), LLaVA
conversations turned into chat examples, the seeded split, loss masks, batching order and sharding, the lr
schedule and the mode -> adapter mapping."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapter
from adapter.finetune import DataError, TrainConfig, adapter_args_for, train
from adapter.finetune.batching import GROUP, collate, epoch_batches, eval_batches, shard
from adapter.finetune.cli import main
from adapter.finetune.dataset import build_dataset, split_records
from adapter.finetune.encode import IGNORE_INDEX, encode_example
from adapter.finetune.records import Example, read_records
from adapter.finetune.schedule import learning_rate
from adapter.finetune.step import scored_positions
from adapter.head_loss import head_cross_entropy
from adapter.prompts import PROMPT_FORMATS
from adapter.tokenizer import Tokenizer, open_tokenizer
from tests.finetune_helpers import (
    alpaca_records,
    one_thread_and_own_rng,  # noqa: F401  (autouse)
    tiny_config,
    write_json,
    write_jsonl,
)

CONVERSATION = [{"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "A circle."},
                {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Red."}]


@pytest.fixture(scope="module")
def tokenizer(base_folder) -> Tokenizer:
    return open_tokenizer(base_folder / "tokenizer.model")


def test_json_and_jsonl_records_become_alpaca_examples(tmp_path):
    records = [{"instruction": "Name a shape.", "output": "Circle."},
               {"instruction": "Add.", "input": "1 and 2", "output": "3", "extra": "ignored"}]
    for path in (write_json(tmp_path / "d.json", records), write_jsonl(tmp_path / "d.jsonl", records + [""])):
        examples = read_records(path)
        assert examples == [[Example(adapter.alpaca("Name a shape."), "Circle.")],
                            [Example(adapter.alpaca("Add.", "1 and 2"), "3")]]


def test_every_bad_record_is_reported_with_its_line_and_nothing_is_written(tmp_path, base_folder, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "fine", "output": "ok"},
        {"instruction": "no output"},
        {"instruction": 3, "output": ["a"]},
        '{"instruction": "broken", "output": ',
        {"instruction": "  ", "output": "x"},
        ["not", "an", "object"],
        {"instruction": "x", "input": 5, "output": "y"},
    ])
    out = tmp_path / "run"
    with pytest.raises(DataError) as caught:
        train(tiny_config(base_folder, data, out))
    report = str(caught.value)
    assert "6 bad record(s)" in report
    for expected in (f"{data}:2: missing 'output'",
                     f"{data}:3: 'instruction' must be a string, got a number; 'output' must be a string, got a list",
                     f"{data}:4: not valid JSON", f"{data}:5: empty 'instruction'",
                     f"{data}:6: expected a JSON object, got a list", f"{data}:7: 'input' must be a string"):
        assert expected in report
    assert f"{data}:1:" not in report
    assert not out.exists()
    assert main(["--base", str(base_folder), "--data", str(data), "--out", str(out)]) == 2
    assert "error: --data:" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--mode", "lora", "--lora-rank", "4", "--prompt-len", "20"], "--prompt-len: --mode lora trains LoRA alone, no "
                                                                    "prompts"),
    (["--init-adapter", "a.safetensors", "--prompt-layers", "8"], "--prompt-layers: the adapter's shape comes from "
                                                                  "--init-adapter"),
    (["--val-data", "v.json", "--val-fraction", "0.2"], "--val-fraction: not with --val-data (all of --data trains, "
                                                        "--val-data validates)"),
    (["--mode", "v1", "--visual", "grid"], "--visual: only --mode vision has a visual prompt"),
])
def test_a_flag_the_run_would_not_use_is_refused_not_ignored(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["--base", "tiny", "--data", "d.json", "--out", str(out), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n" and not out.exists()


def test_json_list_records_are_reported_by_index(tmp_path):
    data = write_json(tmp_path / "bad.json", [{"instruction": "a", "output": "b"}, {"output": "b"}, "text"])
    with pytest.raises(DataError) as caught:
        read_records(data)
    assert f"{data} [index 1]: missing 'instruction'" in str(caught.value)
    assert f"{data} [index 2]: expected a JSON object, got a string" in str(caught.value)
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(write_jsonl(tmp_path / "broken.json", ['[{"instruction": ']))
    # Python's own limits on JSON were a raw RecursionError, or a message naming neither file nor record
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep.json is not valid JSON \(nested too deeply\)"):
        read_records(tmp_path / "deep.json")
    (tmp_path / "digits.jsonl").write_text('{"instruction": "a", "output": ' + "9" * 5000 + "}\n")
    # Python 3.10 says "the limit (4300)", 3.11 on "the limit (4300 digits)"
    with pytest.raises(DataError, match=r"digits.jsonl:1: not valid JSON \(Exceeds the limit \(4300( digits)?\) for "):
        read_records(tmp_path / "digits.jsonl")


def test_llava_conversations_become_chat_examples_with_their_image(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "cat.png")
    data = write_json(tmp_path / "llava.json", [{"id": "1", "image": "cat.png", "conversations": CONVERSATION},
                                                {"conversations": CONVERSATION[:2]}])
    (first, second), (text_only,) = read_records(data, tmp_path / "images")
    image = tmp_path / "images" / "cat.png"
    assert first == Example(adapter.chat((), "What shape is it?"), "A circle.", image)
    assert second == Example(adapter.chat([("What shape is it?", "A circle.")], "Which colour?"), "Red.", image)
    assert "<image>" not in first.prompt + second.prompt
    assert text_only.image is None


def test_half_a_character_is_named_and_a_byte_order_mark_is_not_the_text(tmp_path):
    """JSON may escape a lone surrogate, which no tokenizer reads (sentencepiece raised from deep inside)."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a\\ud800b", "output": "x"}\n'
                    '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\\udfff"}]}\n')
    with pytest.raises(DataError) as caught:
        read_records(data)
    assert str(caught.value).splitlines()[1:] == [
        f"  {data}:1: 'instruction' holds '\\ud800', half of a character (a lone surrogate)",
        f"  {data}:2: 'conversations'[1]['value'] holds '\\udfff', half of a character (a lone surrogate)"]
    marked = tmp_path / "marked.json"
    marked.write_text('\ufeff[{"instruction": "What colour?", "output": "Red."}]', encoding="utf-8")
    assert [example.response for example in read_records(marked)[0]] == ["Red."]  # a JSON list, not JSONL


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is that large, with no pixels (enough for its size to be read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bad_llava_records_name_the_missing_image_and_the_turn_at_fault(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.png").write_text("not a picture")
    (folder / "huge.png").write_bytes(_png_header(9000, 9000))
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo, "JPEG")
    (folder / "cut.jpg").write_bytes(photo.getvalue()[:len(photo.getvalue()) // 2])  # verify() passed it
    data = write_jsonl(tmp_path / "llava.jsonl", [
        {"image": "missing.png", "conversations": CONVERSATION},
        {"image": "notes.png", "conversations": CONVERSATION},
        {"image": "huge.png", "conversations": CONVERSATION},
        {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
        {"conversations": CONVERSATION[:3]},
        {"conversations": [{"from": "human", "value": "<image>"}, {"from": "system", "value": 1}]},
        {"conversations": []},
        {"image": "cut.jpg", "conversations": CONVERSATION},
    ])
    with pytest.raises(DataError) as caught:
        read_records(data, folder)
    report = str(caught.value)
    assert f"{data}:1: image file {folder / 'missing.png'} does not exist" in report
    # found before anything is loaded, not by the step that decodes them
    assert f"{data}:2: image {folder / 'notes.png'} is not an image file" in report
    assert f"{data}:3: image {folder / 'huge.png'} has 9000x9000 pixels, more than the limit of 64,000,000" in report
    assert f"{data}:4: conversations[0]: expected a 'human' turn" in report
    assert f"{data}:5: 'conversations' ends with a 'human' turn that has no answer: it must end with a 'gpt' turn" \
        in report
    assert f"{data}:6: conversations[0]: empty human turn; conversations[1]: 'from' must be 'human' or 'gpt'" in report
    assert f"{data}:7: 'conversations' must be a non-empty list of turns, got an empty list" in report
    assert f"{data}:8: image {folder / 'cut.jpg'} could not be decoded (image file is truncated" in report
    with pytest.raises(DataError, match="needs --image-folder"):
        read_records(write_jsonl(tmp_path / "one.jsonl", [{"image": "a.png", "conversations": CONVERSATION}]))


def test_chat_messages_become_the_same_examples_as_llava_conversations(tmp_path):
    system = {"role": "system", "content": "Answer in one word."}
    messages = [system, {"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "Circle."},
                {"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "Red."}]
    turns = [{"from": "system", "value": system["content"]}] + [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages[1:]]
    llama2 = PROMPT_FORMATS["llama2"]
    as_messages = read_records(write_json(tmp_path / "m.json", [{"messages": messages}]), prompt_format=llama2)
    as_llava = read_records(write_json(tmp_path / "c.json", [{"conversations": turns}]), prompt_format=llama2)
    (examples,) = as_messages
    assert as_messages == as_llava and len(examples) == 2 and "Answer in one word." in examples[1].prompt
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": messages[1:4]},
        {"messages": [{"role": "user", "content": ["a", "list"]}, {"role": "assistant", "content": "x"}]},
        {"instruction": "x", "output": "y", "image": "a.png"},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"messages": [system]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}])
    with pytest.raises(DataError) as caught:
        read_records(bad)
    report = str(caught.value)
    assert f"{bad}:1: 'messages' ends with a 'user' turn that has no answer: it must end with an 'assistant' turn" \
        in report
    assert f"{bad}:2: messages[0]: 'content' must be a string, got a list" in report
    assert f"{bad}:3: 'image' is only read with a conversation ('conversations', as LLaVA's, or 'messages')" in report
    # an answer alone was also said to be one turn that "must end with a 'assistant' turn"
    assert f"{bad}:4: messages[0]: expected a 'user' turn (turns alternate, user first), got 'assistant'\n" in report
    assert f"{bad}:5: 'messages' must be a non-empty list of turns, got a system turn alone" in report
    assert f"{bad}:6: messages[1]: expected an 'assistant' turn (turns alternate, user first), got 'user'" in report


def test_a_file_holding_one_json_object_says_so(tmp_path):
    """A pretty-printed object (the app's examples.json uploaded to Score) was read as JSONL: every line a bad
    record, "not valid JSON"."""
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"image": [], "text": [{"instruction": "Hi", "output": "Hello"}]}, indent=2))
    with pytest.raises(DataError, match=rf"^--data: {path} holds one JSON object, not records: expected a JSON list "
                                        r"of records or JSONL \(one record a line\); its keys: image, text$"):
        read_records(path)
    one = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Hi", "output": "Hello"}])  # a one-line JSONL
    assert len(read_records(one)) == 1


def test_an_image_record_cannot_name_a_file_outside_the_image_folder(tmp_path):
    """The app's image folder is the visitor's uploads: a record naming /etc/passwd or ../ had the server read it
    (a picture of the server scored, trained on) and say whether any path exists."""
    folder, outside = tmp_path / "uploads", tmp_path / "secret.png"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    Image.new("RGB", (8, 8)).save(folder / "mine.png")
    names = [str(outside), "../secret.png", "sub/../../secret.png", "/etc/passwd", "/nowhere.png"]
    data = write_jsonl(tmp_path / "llava.jsonl", [{"image": name, "conversations": CONVERSATION} for name in names]
                       + [{"image": "mine.png", "conversations": CONVERSATION}])
    with pytest.raises(DataError) as caught:
        read_records(data, folder)
    assert str(caught.value).splitlines()[1:] == [
        f"  {data}:{line}: 'image' must name a file under the image folder (no absolute path, no '..'), got {name!r}"
        for line, name in enumerate(names, start=1)]


def test_image_records_need_a_model_with_an_image_encoder(tmp_path, base_folder):
    Image.new("RGB", (2, 2)).save(tmp_path / "cat.png")
    data = write_json(tmp_path / "llava.json", [{"image": "cat.png", "conversations": CONVERSATION}] * 4)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^image records need an adapter that sees \(--mode vision: "):
        train(tiny_config(base_folder, data, out, image_folder=str(tmp_path)))
    assert not out.exists()


def test_modes_map_to_what_is_learned():
    v1 = adapter_args_for("v1", 10, 30)
    assert v1 == adapter.AdapterArgs(prompt_len=10, prompt_layers=30, gate_activation="tanh")
    v2 = adapter_args_for("v2", 10, 30, lora_rank=8)
    assert (v2.bias, v2.norm, v2.lora_rank, v2.gate_activation) == (True, True, 8, "tanh")
    vision = adapter_args_for("vision", 10, 30, lora_rank=8, visual="v1", clip_dim=24, clip_model="tiny.json")
    assert (vision.bias, vision.norm, vision.lora_rank, vision.visual, vision.clip_dim) == (True, True, 8, "v1", 24)
    assert adapter_args_for("v2", 10, 30, visual="v1").visual == "none", "only --mode vision adds a visual prompt"
    assert adapter_args_for("v2", 10, 30, scale=True).scale and not v2.scale
    chosen = adapter_args_for("v2", 10, 30, lora_rank=4, lora_targets="wq, wv", bias_targets="wq,wk,wv,wo,w1,w2,w3")
    assert (chosen.lora_targets, chosen.bias_targets) == (("wq", "wv"), adapter.config.LORA_TARGETS)
    assert (v2.lora_targets, v2.bias_targets) == (adapter.config.LORA_TARGETS, ("wq", "wo", "w1", "w2", "w3"))


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=10, micro_batch_size=4), "--batch-size: 10 is not a multiple of --micro-batch-size 4"),
    (dict(mode="v1", lora_rank=4), "--lora-rank: LoRA is a v2 part"),
    (dict(mode="v1", scale=True), "--scale: the input scales are a v2 part; use --mode v2"),
    (dict(val_fraction=1.0), "--val-fraction"),
    (dict(seed=2**64), f"--seed: must be a whole number from 0 to {2**63 - 1}, got {2**64}"),
    (dict(warmup_epochs=6, epochs=5), "--warmup-epochs"),
    (dict(quantize="fp8"), "--quantize: unknown mode"),
    (dict(export="gguf"), "--export"),
    (dict(autocast="fp8"), "--autocast: must be one of"),
    (dict(mode="v2", visual_lr=1e-3), "--visual-lr: only --mode vision trains a visual prompt"),
    (dict(mode="v2", lora_rank=4, lora_targets="wq,q_proj"), "--lora-targets: expected linears from wq, wk, wv, wo, "
                                                             "w1, w2, w3 separated by commas, got 'wq,q_proj'"),
    (dict(mode="v2", lora_targets="wq"), "--lora-targets: needs --lora-rank above 0"),
    (dict(mode="v1", bias_targets="wq"), "--bias-targets: biases and LoRA are v2 parts; use --mode v2"),
    (dict(mode="v2", bias_targets=" , "), "--bias-targets: expected linears"),
    (dict(mode="v2", init_adapter="a.pth", bias_targets="wq"), "--bias-targets: the adapter's shape comes from"),
])
def test_bad_settings_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(base="b", data="d", out="o", **overrides)


def test_the_default_warm_up_fits_any_number_of_epochs():
    """Two epochs of warm-up by default refused `--epochs 1` (and the README's own example with epochs=1)."""
    assert TrainConfig(base="b", data="d", out="o", epochs=1).warmup_epochs == 1.0
    assert TrainConfig(base="b", data="d", out="o").warmup_epochs == 2.0
    with pytest.raises(ValueError, match="--warmup-epochs: must be between 0 and --epochs 1, got 2"):
        TrainConfig(base="b", data="d", out="o", epochs=1, warmup_epochs=2)


def test_an_out_that_is_a_file_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^--out: .*notes\.txt is a file; name a folder for the run$"):
        TrainConfig(base="b", data="d", out=str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_validation_split_is_a_seeded_permutation():
    train_ids, val_ids = split_records(100, 0.05, seed=0)
    assert len(val_ids) == 5 and val_ids != [0, 1, 2, 3, 4]
    assert sorted(train_ids + val_ids) == list(range(100))
    assert split_records(100, 0.05, seed=0) == (train_ids, val_ids)
    assert split_records(100, 0.05, seed=1)[1] != val_ids
    assert split_records(100, 0.0, seed=0) == (list(range(100)), [])
    assert len(split_records(3, 0.01, seed=0)[1]) == 1  # a non-zero fraction holds out at least one


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    example = Example(adapter.alpaca("Name a shape."), " A red circle.")
    encoded, truncated = encode_example(example, tokenizer, max_seq_len=512)
    prompt = tokenizer.encode(example.prompt, bos=True)
    assert not truncated
    assert encoded.tokens == tokenizer.encode(example.prompt + example.response, bos=True) + [tokenizer.eos_id]
    assert encoded.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert encoded.labels[len(prompt):] == encoded.tokens[len(prompt):]
    assert encoded.labels[-1] == tokenizer.eos_id
    assert encoded.targets == len(encoded.tokens) - len(prompt)
    cut, truncated = encode_example(example, tokenizer, max_seq_len=len(prompt) + 2)
    assert truncated and cut.tokens == encoded.tokens[: len(prompt) + 2] and cut.targets == 2


def test_padding_is_masked_and_the_loss_is_next_token_cross_entropy(tokenizer):
    records = [[Example(adapter.alpaca(r["instruction"]), r["output"])] for r in alpaca_records(3)]
    data = build_dataset(records, tokenizer, max_seq_len=512, val_fraction=0, seed=0)
    batch = collate(data.train)
    lengths = [len(e.tokens) for e in data.train]
    assert batch.tokens.shape == (3, max(lengths)) and batch.n_tokens == sum(lengths) and batch.images is None
    for row, encoded in enumerate(data.train):
        assert batch.labels[row, len(encoded.tokens):].eq(IGNORE_INDEX).all()
        assert batch.tokens[row, len(encoded.tokens):].eq(0).all()
        trained = batch.labels[row] != IGNORE_INDEX
        assert int(trained.sum()) == encoded.targets  # prompt and padding never trained on
    hidden = torch.randn(*batch.tokens.shape, 16, dtype=torch.float64)
    head = torch.randn(tokenizer.n_words, 16, dtype=torch.float64)
    logits = hidden @ head.T
    labels = batch.labels
    expected = sum(F.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
                   for b in range(3) for t in range(1, labels.shape[1]) if labels[b, t] != IGNORE_INDEX)
    scored, targets = scored_positions(labels)
    assert int(scored.sum()) == sum(e.targets for e in data.train)
    assert torch.allclose(head_cross_entropy(hidden[scored], head, targets).double(), expected)
    empty = collate([])
    scored, targets = scored_positions(empty.labels)
    assert empty.labels.eq(IGNORE_INDEX).all() and not scored.any()
    assert float(head_cross_entropy(torch.randn(1, 2, 7)[scored], torch.randn(5, 7), targets)) == 0.0


def test_epoch_order_is_seeded_length_grouped_and_sharded():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    steps = epoch_batches(lengths, batch_size=16, micro_batch_size=4, seed=0, epoch=0)
    flat = [i for step in steps for micro in step for i in micro]
    assert sorted(flat) == list(range(1000)) and len(steps) == math.ceil(1000 / 16)
    assert steps == epoch_batches(lengths, 16, 4, seed=0, epoch=0)
    for micro in (1, 8, 16):  # the same examples make each step whatever its forward passes
        assert [sorted(sum(step, [])) for step in epoch_batches(lengths, 16, micro, seed=0, epoch=0)] == \
            [sorted(sum(step, [])) for step in steps]
    assert steps != epoch_batches(lengths, 16, 4, seed=0, epoch=1)
    assert flat[:20] != sorted(flat[:20]), "shuffled, not in file order"
    spread = [max(lengths[i] for i in m) - min(lengths[i] for i in m) for step in steps for m in step]
    assert sum(spread) / len(spread) < 10, "micro-batches hold similar lengths (less padding)"
    assert GROUP == 50
    for step in steps:
        parts = shard(step, 0, 2) + shard(step, 1, 2)
        assert sorted(map(tuple, parts)) == sorted(map(tuple, step))
    assert shard([[1, 2]], 1, 2) == [[]]
    shares = eval_batches(lengths[:10], 4, 0, 2) + eval_batches(lengths[:10], 4, 1, 2)
    assert sorted(i for micro in shares for i in micro) == list(range(10))


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    def lr(step):
        return learning_rate(step, steps_per_epoch=10, peak=1.0, min_lr=0.1, warmup_epochs=2, epochs=5)

    assert lr(0) == 0.0 and lr(10) == pytest.approx(0.5) and lr(20) == pytest.approx(1.0)
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(49) > 0.1 and lr(50) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(20, 50))
    assert TrainConfig(base="b", data="d", out="o", batch_size=64).learning_rate == pytest.approx(9e-3 * 64 / 256)


def test_plain_text_records_train_on_every_token_in_windows(tmp_path, tokenizer):
    long = " ".join(f"word{i} and more" for i in range(60))
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": long}, {"text": "A short one."},
                                                  {"instruction": "Say hi.", "text": "ignored: Alpaca's rows have it",
                                                   "output": "Hi."}])
    records = read_records(data)
    assert records[0] == [Example("", long, plain=True)] and records[1] == [Example("", "A short one.", plain=True)]
    assert not records[2][0].plain and records[2][0].response == "Hi."
    dataset = build_dataset(records[:2], tokenizer, 32, 0.0, 0)
    tokens = tokenizer.encode(long, bos=True, eos=False) + [tokenizer.eos_id]
    assert len(tokens) > 64 and dataset.truncated == 0, "windows, not cut"
    windows = dataset.train[:-1]
    assert all(len(w.tokens) <= 32 for w in dataset.train)
    assert [t for w in windows for t in w.labels[1:]] == tokens[1:], "every token after BOS a target once, EOS last"
    assert all(w.labels[0] == IGNORE_INDEX and w.tokens[1:] == w.labels[1:] for w in dataset.train)
    assert windows[1].tokens[0] == windows[0].tokens[-1], "each window starts where the last ended"

    (tmp_path / "one.txt").write_text(long)
    assert read_records(tmp_path / "one.txt") == [[Example("", long, plain=True)]]


def test_bad_plain_text_records_are_named(tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": ""}, {"text": 3}, {"text": "fine"}])
    with pytest.raises(DataError) as error:
        read_records(data)
    assert f"{data}:1: empty 'text'" in str(error.value) and f"{data}:2: 'text' must be a string, got a number" \
        in str(error.value)


def test_an_adapter_trained_on_plain_text_reads_it_better(tmp_path, base_folder, capsys):
    from adapter.evaluate import evaluate, evaluate_text

    documents = [f"The {c} {s} is on the {p}." for c in ("red", "blue", "green") for s in ("star", "circle")
                 for p in ("left", "right")]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in documents])
    result = train(tiny_config(base_folder, data, tmp_path / "run", epochs=20, batch_size=4, micro_batch_size=4,
                               lr=0.05))
    assert "; 12 plain-text document(s), in windows of 128 tokens (none cut)\n" in capsys.readouterr().err
    model = adapter.load(base_folder, adapter=result.adapter, device="cpu")
    scores = evaluate_text(model, data, gate_scales=[0.0, 1.0]).scores
    assert scores[1].loss < scores[0].loss - 0.5, "what it trained on is likelier with the prompts speaking"
    with pytest.raises(ValueError, match=r"holds plain text .* score a file of it alone as plain text \(python -m adapter.evaluate --text\)"):
        evaluate(model, data)
