"""llama.cpp's GGUF bases: read with their shape, weights (ggml's block formats dequantized), tokenizer and chat
template from the one file, checked against transformers' own GGUF loader and the tokenizers they were made from."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

import adapter
from adapter.bpe_tokenizer import BPETokenizer, read_ranks
from adapter.config import AdapterArgs, ModelArgs, RopeScaling
from adapter.formats import open_base
from adapter.inspect import describe
from adapter.model import rope_frequencies
from adapter.random_model import train_bpe_ranks, train_tokenizer, write_random_base
from adapter.tokenizer import SentencePieceTokenizer, open_tokenizer
from bench.gguf_file import Q, bpe_vocab, sentencepiece_vocab, write_gguf

from .test_prompt_formats import LLAMA3_CHAT_TEMPLATE

# rows of whole 256-blocks, as the k-quants need (and LLaMAs have)
SHAPE = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=256, max_seq_len=128)
LLAMA3_SHAPE = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=768, multiple_of=256,
                         max_seq_len=128, rope_theta=500000.0)
TOKENS = torch.tensor([[1, 5, 9, 30, 7, 100, 200, 311]])
TEXTS = ["Name a colour.", "  What is\nthe star?  12345 ünïcödé 🙂", "two  spaces\n\n and a tab\t.",
         "<s>a control token inside</s>", "There is a small red circle in the centre."]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    """A random Meta base whose SentencePiece model normalizes as LLaMA's does: not at all."""
    folder = write_random_base(tmp_path_factory.mktemp("gguf") / "meta", SHAPE, seed=3)
    train_tokenizer(folder / "tokenizer.model", vocab_size=SHAPE.vocab_size, seed=3, keep_spaces=True)
    return folder


def weights(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_base(folder)
    return {name: checkpoint.tensor(name) for name in sorted(checkpoint.keys())}


def spm_gguf(meta: Path, path: Path, stored: Q = Q.F32, drop: str | None = None, **options) -> Path:
    tensors = {name: value for name, value in weights(meta).items() if name != drop}
    return write_gguf(path, SHAPE, tensors, lambda writer: sentencepiece_vocab(writer, meta / "tokenizer.model"),
                      qtype=lambda name: stored, **options)


def peer_logits(path: Path) -> torch.Tensor:
    """transformers' LlamaForCausalLM from the same GGUF file (its own reader, names and RoPE rows)."""
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    peer = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return peer(TOKENS).logits


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("stored", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.IQ4_XS],
                         ids=lambda q: q.name)
def test_gguf_bases_give_transformers_logits(meta, tmp_path, stored):
    path = spm_gguf(meta, tmp_path / f"model-{stored.name}.gguf", stored)
    model = adapter.load(path, device="cpu")
    ours, theirs = logits(model), peer_logits(path)
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert model.base_format == "gguf" and model.base_family == "LLaMA"
    if stored == Q.F32:  # the very weights of the folder it was written from
        assert torch.equal(ours, logits(adapter.load(meta, device="cpu")))


def test_a_head_tied_to_the_embeddings_is_one_tensor(meta, tmp_path):
    path = spm_gguf(meta, tmp_path / "tied.gguf", Q.Q8_0, drop="output.weight")
    assert open_base(path).tied_output
    model = adapter.load(path, device="cpu")
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.allclose(logits(model), peer_logits(path), atol=1e-5)
    # inspect counted the head again (Llama 3.2 1B: 1.50B parameters for 1.24B)
    assert f"  parameters {model.count_parameters():,}; " in "\n".join(describe(path))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_while_loading_as_a_folder_of_the_same_weights(meta, tmp_path, mode):
    path = spm_gguf(meta, tmp_path / "model.gguf")
    assert torch.equal(logits(adapter.load(path, device="cpu", quantize=mode)),
                       logits(adapter.load(meta, device="cpu", quantize=mode)))


def test_sentencepiece_vocabulary_encodes_as_the_model_it_came_from(meta, tmp_path):
    original = SentencePieceTokenizer(meta / "tokenizer.model")
    rebuilt = open_tokenizer(spm_gguf(meta, tmp_path / "model.gguf"))
    assert (rebuilt.n_words, rebuilt.bos_id, rebuilt.eos_id, rebuilt.stop_ids) == \
           (original.n_words, original.bos_id, original.eos_id, original.stop_ids)
    for text in TEXTS:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids and rebuilt.decode(ids) == original.decode(ids)
    assert [rebuilt.token_text(i) for i in range(original.n_words)] == \
           [original.token_text(i) for i in range(original.n_words)]
    assert rebuilt.kind == "SentencePiece, from GGUF"


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    return write_random_base(tmp_path_factory.mktemp("gguf3") / "meta", LLAMA3_SHAPE, seed=4, tokenizer="tiktoken")


def llama3_gguf(llama3: Path, path: Path, pre: str = "llama-bpe", **options) -> Path:
    tokenizer = BPETokenizer.from_tiktoken(llama3 / "tokenizer.model")

    def vocab(writer):
        bpe_vocab(writer, tokenizer, pre)
        writer.add_eot_token_id(tokenizer.backend.token_to_id("<|eot_id|>"))

    return write_gguf(path, LLAMA3_SHAPE, weights(llama3), vocab, qtype=lambda name: Q.Q8_0, **options)


def test_llama3_vocabulary_encodes_as_tiktoken_and_stops_at_eot(llama3, tmp_path):
    original = BPETokenizer.from_tiktoken(llama3 / "tokenizer.model")
    path = llama3_gguf(llama3, tmp_path / "llama3.gguf")
    rebuilt = open_tokenizer(path)
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
        assert rebuilt.encode(text) == original.encode(text)
    assert (rebuilt.n_words, rebuilt.bos_id, rebuilt.eos_id) == (original.n_words, original.bos_id, original.eos_id)
    assert rebuilt.stop_ids == original.stop_ids and original.backend.token_to_id("<|eot_id|>") in rebuilt.stop_ids
    model = adapter.load(path, device="cpu")
    assert torch.allclose(logits(model), peer_logits(path), atol=1e-5)


def test_a_user_defined_token_is_read_whole_and_decoded_back(llama3, tmp_path):
    """llama.cpp writes an added token that is not special ("<think>") as user-defined; it was read as a special
    token, which decoding drops."""
    original = BPETokenizer.from_tiktoken(llama3 / "tokenizer.model")
    original.backend.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    path = write_gguf(tmp_path / "think.gguf", LLAMA3_SHAPE, weights(llama3),
                      lambda writer: bpe_vocab(writer, original, "llama-bpe"))
    rebuilt = open_tokenizer(path)
    text = "<think>the red circle</think> done"
    ids = rebuilt.encode(text, bos=False)
    assert ids == original.encode(text, bos=False) and ids[0] == original.backend.token_to_id("<think>")
    assert rebuilt.decode(ids) == original.decode(ids) == text


def test_the_chat_template_in_the_metadata_sets_the_bare_prompt_format(llama3, tmp_path):
    path = llama3_gguf(llama3, tmp_path / "instruct.gguf",
                       metadata=lambda writer: writer.add_chat_template(LLAMA3_CHAT_TEMPLATE))
    assert adapter.load(path, device="cpu").base_prompt_format == "llama3"
    assert adapter.load(llama3_gguf(llama3, tmp_path / "plain.gguf"), device="cpu").base_prompt_format is None


def test_tekken_vocabulary_encodes_as_the_tekken_json_it_came_from(tmp_path):
    from .test_tekken import KEPT, tekken

    found = read_ranks(train_bpe_ranks(tmp_path / "ranks.model", ranks=KEPT + 60, seed=1))
    ranks = sorted(found, key=found.get)
    original = BPETokenizer.from_tekken(tekken(tmp_path / "nemo", ranks, None))
    shape = ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=original.n_words, multiple_of=32, max_seq_len=32)
    model = adapter.Transformer(shape)
    tensors = {name: value for name, value in model.state_dict().items()}
    path = write_gguf(tmp_path / "nemo.gguf", shape, tensors, lambda writer: bpe_vocab(writer, original, "tekken"))
    rebuilt = open_tokenizer(path)
    for text in TEXTS + ["[INST]Hi[/INST]Hello!</s>", "the red circle, THE RED CIRCLE"]:
        assert rebuilt.encode(text) == original.encode(text)
    assert (rebuilt.bos_id, rebuilt.eos_id) == (original.bos_id, original.eos_id)


def rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` for a scaling: what each frequency is divided by."""
    plain = rope_frequencies(head_dim, theta, torch.device("cpu"))
    return (plain / rope_frequencies(head_dim, theta, torch.device("cpu"), scaling)).numpy()


def test_llama31_rope_factors_are_read_back_into_its_scaling(meta, tmp_path):
    scaling = RopeScaling("llama3", 8.0)
    factors = rope_factors(scaling, SHAPE.head_dim, SHAPE.rope_theta)
    path = spm_gguf(meta, tmp_path / "llama31.gguf", raw={"rope_freqs.weight": factors})
    assert open_base(path).model_args(SHAPE.vocab_size).rope_scaling == scaling
    other = rope_factors(RopeScaling("llama3", 8.0, high_freq_factor=2.0), SHAPE.head_dim, SHAPE.rope_theta)
    path = spm_gguf(meta, tmp_path / "other.gguf", raw={"rope_freqs.weight": other})
    with pytest.raises(ValueError, match=r"other.gguf: rope_freqs.weight are not Llama 3's RoPE scaling \(factor 8"):
        open_base(path).model_args(SHAPE.vocab_size)


def test_an_adapter_loads_and_trains_on_a_gguf_base(meta, tmp_path):
    path = spm_gguf(meta, tmp_path / "model.gguf", Q.Q8_0)
    model = adapter.load(path, adapter=AdapterArgs(prompt_len=4, prompt_layers=2), device="cpu", quantize="nf4")
    loss = torch.nn.functional.cross_entropy(model(TOKENS)[0, :-1], TOKENS[0, 1:])
    loss.backward()
    grads = [p.grad for _, p in model.trainable_parameters()]
    assert grads and all(g is not None for g in grads)


def test_inspect_names_the_format_and_the_stored_types(meta, tmp_path):
    path = spm_gguf(meta, tmp_path / "model.gguf", Q.Q4_K)
    text = "\n".join(describe(path))
    assert f"{path}: base LLaMA, gguf format" in text
    assert "stored as ggml Q4_K x16, F32 x5 (dequantized while loading)" in text
    assert "SentencePiece, from GGUF" in text


def remove_key(key: str):
    return lambda writer: writer.kv_data[0].pop(key)


@pytest.mark.parametrize("options, message", [
    (dict(architecture="qwen2"), "architecture 'qwen2' is not supported"),
    (dict(metadata=lambda writer: writer.add_expert_count(8)), "llama.expert_count is 8: mixture-of-experts"),
    (dict(metadata=remove_key("llama.block_count")), "missing metadata llama.block_count"),
    (dict(metadata=lambda writer: writer.add_key_length(32)), "heads are 32 wide: partial rotary"),
    (dict(metadata=lambda writer: writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)),
     "llama.rope.scaling.type 'yarn' is not supported"),
    (dict(raw={"blk.0.attn_q.bias": np.zeros(256, np.float32)}), "unexpected tensor blk.0.attn_q.bias"),
    (dict(drop="layers.1.feed_forward.w3.weight"), "missing tensor layers.1.feed_forward.w3.weight"),
    (dict(metadata=lambda writer: (writer.kv_data[0].pop("tokenizer.ggml.model"), writer.add_tokenizer_model("bert"))),
     "tokenizer.ggml.model 'bert' is not supported"),
    (dict(metadata=remove_key("tokenizer.ggml.eos_token_id")), "tokenizer.ggml.eos_token_id is None, not a token id"),
    # these read as partial rotary embeddings ("rope.dimension_count is 16 but heads are 64 wide")
    (dict(metadata=lambda writer: (writer.kv_data[0].pop("llama.attention.head_count"),
                                   writer.add_head_count(0))), "llama.attention.head_count must be a positive integer"),
    (dict(metadata=lambda writer: writer.add_string("llama.attention.key_length", "16")),
     "llama.attention.key_length must be a positive integer, got '16'"),
    # divided by the heads before it was checked: a TypeError
    (dict(metadata=lambda writer: (writer.kv_data[0].pop("llama.embedding_length"),
                                   writer.add_array("llama.embedding_length", [64, 64]))),
     r"llama.embedding_length must be a positive integer, got \[64, 64\]"),
], ids=["architecture", "experts", "no-block-count", "partial-rotary", "yarn", "bias", "missing-tensor",
        "tokenizer-model", "no-eos", "no-heads", "width-as-text", "width-as-list"])
def test_what_cannot_be_read_is_refused_naming_the_file_and_the_key(meta, tmp_path, options, message):
    path = spm_gguf(meta, tmp_path / "bad.gguf", **options)
    with pytest.raises(ValueError, match=message) as error:
        adapter.load(path, device="cpu")
    assert str(path) in str(error.value)


def test_a_token_type_or_merge_that_is_no_such_thing_is_named(meta, llama3, tmp_path):
    """Were a ValueError naming neither file nor key, and the tokenizers library's bare Exception."""
    def odd_type(writer):
        types = list(writer.kv_data[0].pop("tokenizer.ggml.token_type").value)
        writer.add_token_types(types[:10] + [99] + types[11:])

    path = spm_gguf(meta, tmp_path / "type.gguf", metadata=odd_type)
    with pytest.raises(ValueError, match=f"tokenizer: {path}: tokenizer.ggml.token_type of token 10 is 99, not a "
                                         r"token type \(1..6\)"):
        open_tokenizer(path)

    def unknown_merge(writer):
        merges = list(writer.kv_data[0].pop("tokenizer.ggml.merges").value)
        writer.add_token_merges(merges + ["zzzq yyyq"])

    path = llama3_gguf(llama3, tmp_path / "merge.gguf", metadata=unknown_merge)
    with pytest.raises(ValueError, match=f"tokenizer: {path}: merge 'zzzq yyyq' names 'zzzq', which is not in "
                                         "tokenizer.ggml.tokens"):
        open_tokenizer(path)


def test_an_unsupported_pre_tokenizer_and_a_cut_file_are_named(llama3, tmp_path):
    path = llama3_gguf(llama3, tmp_path / "qwen-pre.gguf", pre="qwen2")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        open_tokenizer(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{cut}: not a readable GGUF file"):
        adapter.load(cut, device="cpu")


@pytest.mark.parametrize("vocabulary", ["sentencepiece", "llama3"])
def test_quantize_base_writes_a_gguf_file_as_a_folder_that_loads_alike(meta, llama3, tmp_path, vocabulary):
    from adapter.quantize_base import quantize_base

    if vocabulary == "sentencepiece":
        path = spm_gguf(meta, tmp_path / "model.gguf", Q.Q4_K)
    else:
        path = llama3_gguf(llama3, tmp_path / "model.gguf",
                           metadata=lambda writer: writer.add_chat_template(LLAMA3_CHAT_TEMPLATE))
    folder = quantize_base(path, tmp_path / "nf4", "nf4", dtype="float32")
    written, read = adapter.load(folder, device="cpu"), adapter.load(path, device="cpu", quantize="nf4")
    assert torch.equal(logits(written), logits(read))
    for text in TEXTS + ["<|eot_id|>"]:
        assert written.tokenizer.encode(text) == read.tokenizer.encode(text)
    assert (written.tokenizer.n_words, written.tokenizer.bos_id, written.tokenizer.stop_ids) == \
           (read.tokenizer.n_words, read.tokenizer.bos_id, read.tokenizer.stop_ids)
    chat = None if vocabulary == "sentencepiece" else "llama3"
    assert written.base_prompt_format == read.base_prompt_format == chat


def test_one_gguf_file_of_a_hub_repository_is_fetched_not_the_repository(meta, tmp_path, monkeypatch):
    import huggingface_hub

    path, asked = spm_gguf(meta, tmp_path / "model.Q8_0.gguf", Q.Q8_0), []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **options: asked.append(options) or str(path))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **options: pytest.fail("fetched the repository"))
    model = adapter.load("hf:someone/Llama-GGUF/q8/model.Q8_0.gguf", device="cpu")
    assert asked == [{"repo_id": "someone/Llama-GGUF", "filename": "q8/model.Q8_0.gguf"}]
    assert model.base_format == "gguf" and model.base_path == "hf:someone/Llama-GGUF/q8/model.Q8_0.gguf"


def test_heads_narrower_than_dim_over_heads_as_mistral_nemo_writes_them(meta, tmp_path):
    shape = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_size=32, vocab_size=512, multiple_of=256,
                      max_seq_len=128)
    torch.manual_seed(5)
    tensors = {name: value.normal_(0, 0.05) if value.dim() > 1 else value
               for name, value in adapter.Transformer(shape).state_dict().items()}
    path = write_gguf(tmp_path / "nemo-shaped.gguf", shape, tensors,
                      lambda writer: sentencepiece_vocab(writer, meta / "tokenizer.model"),
                      metadata=lambda writer: (writer.add_key_length(32), writer.add_value_length(32)))
    model = adapter.load(path, device="cpu")
    assert model.args.head_dim == 32 and model.layers[0].attention.wq.weight.shape == (128, 256)
    assert torch.allclose(logits(model), peer_logits(path), atol=1e-5)


def test_a_folder_holding_one_gguf_file_is_that_file(meta, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    spm_gguf(meta, folder / "model.Q8_0.gguf", Q.Q8_0)
    assert open_base(folder).source == str(folder / "model.Q8_0.gguf")
    spm_gguf(meta, folder / "model.F16.gguf", Q.F16)
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(model.F16.gguf, model.Q8_0.gguf\); pass the one"):
        open_base(folder)
