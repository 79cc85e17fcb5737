"""GGUF files written as llama.cpp's convert_hf_to_gguf.py writes a LLaMA: names `token_embd`, `blk.N.attn_q`, ...,
wq/wk rows in Meta's interleaved order, the shape as `llama.*` metadata and the tokenizer as `tokenizer.ggml.*`
(a SentencePiece model's pieces, scores and types; a byte-level BPE's tokens and merges). The source of the GGUF
files of bench.load and of the tests, which check the reader against transformers' own GGUF loader and the
tokenizers the files were made from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch

from adapter.bpe_tokenizer import BPETokenizer
from adapter.config import ModelArgs

Q = gguf.GGMLQuantizationType
PARTS = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
         "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
         "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
       "output.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{PARTS[rest.removesuffix('.weight')]}.weight"


def encode(values: torch.Tensor, qtype: Q, seed: int = 0) -> np.ndarray:
    """`values` stored as `qtype`: gguf's own quantizer where it has one; for the k-quants and IQ4_XS (which gguf-py
    only dequantizes) random blocks with small, finite scales, so the file's weights are whatever those blocks say."""
    array = values.detach().float().numpy()
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    try:
        return gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = np.random.default_rng(seed).integers(0, 256, (array.shape[0], array.shape[1] // block, size),
                                                    dtype=np.uint8)
        scales = np.full((*rows.shape[:2], 2), 1e-4, dtype=np.float16).view(np.uint8)  # d (and dmin) as fp16
        d_at = {Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q2_K: (size - 4, size), Q.Q3_K: (size - 2, size),
                Q.Q6_K: (size - 2, size), Q.IQ4_XS: (0, 2)}[qtype]
        rows[..., d_at[0]:d_at[1]] = scales.reshape(*rows.shape[:2], -1)[..., : d_at[1] - d_at[0]]
        return rows.reshape(array.shape[0], -1)


def sentencepiece_vocab(writer: gguf.GGUFWriter, model_path: Path) -> None:
    """A SentencePiece model's pieces as llama.cpp's converter writes them ("llama" tokenizer)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    types = []
    for i in range(sp.vocab_size()):
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else
                     5 if sp.IsUnused(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.IdToPiece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.GetScore(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)


def bpe_vocab(writer: gguf.GGUFWriter, tokenizer: BPETokenizer, pre: str) -> None:
    """A byte-level BPE as llama.cpp writes one from its tokenizer.json ("gpt2" tokenizer): every token in id order,
    special tokens as control tokens, other added tokens as user-defined ones, the merges as "left right"."""
    saved = json.loads(tokenizer.backend.to_str())
    kinds = {entry["id"]: 3 if entry["special"] else 4 for entry in saved["added_tokens"]}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[token] for token in tokens] == list(range(len(tokens)))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in saved["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([kinds.get(index, 1) for index in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(True)


def write_gguf(path: Path, args: ModelArgs, tensors: dict[str, torch.Tensor], vocab: Callable[[gguf.GGUFWriter], None],
               qtype: Callable[[str], Q] = lambda name: Q.F32,
               metadata: Callable[[gguf.GGUFWriter], None] | None = None, architecture: str = "llama",
               raw: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file of `tensors` (Meta's names and layout) with the shape `args`; `qtype(name)` says how each is
    stored (norms stay F32, as llama.cpp keeps every 1-D tensor); `raw`: more tensors under llama.cpp's names."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name("random llama")
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab(writer)
    if metadata is not None:
        metadata(writer)
    for index, (name, value) in enumerate(tensors.items()):
        kind = Q.F32 if value.dim() == 1 else qtype(name)
        data = encode(value, kind, seed=index)
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(gguf_name(name), data)
        else:
            writer.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=kind)
    for name, value in (raw or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
