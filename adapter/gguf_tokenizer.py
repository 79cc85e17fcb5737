"""The tokenizer a GGUF file carries in its metadata, rebuilt as the tokenizer it was converted from.

llama.cpp writes `tokenizer.ggml.model` "llama" for a SentencePiece model (LLaMA 1/2, Mistral 7B): its pieces,
scores and piece types, which are rebuilt into a SentencePiece BPE model as llama.cpp runs it (no normalization but
spaces as "\u2581", a space put in front unless `add_space_prefix` is false, byte fallback when it has byte pieces);
and "gpt2" for a byte-level BPE (Llama 3, Mistral NeMo's tekken): its tokens in GPT-2's byte characters and its
merges, split by the pattern `tokenizer.ggml.pre` names. Control and user-defined tokens are special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .bpe_tokenizer import LLAMA3_SPLIT, TEKKEN_SPLIT, BPETokenizer, byte_level_llama3
from .formats.gguf import GGUFFile, open_gguf
from .tokenizer import SentencePieceTokenizer, Tokenizer

# llama.cpp's token types (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# tokenizer.ggml.pre -> the split pattern of the byte-level BPEs this project runs
SPLIT_PATTERNS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
                  "tekken": TEKKEN_SPLIT}


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of the GGUF file at `path`."""
    file = open_gguf(path)
    model = file.require("tokenizer.ggml.model")
    tokens = file.require("tokenizer.ggml.tokens")
    types = file.value("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer: {path}: {len(types)} token types for {len(tokens)} tokens")
    odd = next((index for index, kind in enumerate(types) if kind not in range(NORMAL, BYTE + 1)), None)
    if odd is not None:
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.token_type of token {odd} is {types[odd]!r}, not a "
                         f"token type ({NORMAL}..{BYTE})")
    if model == "llama":
        tokenizer: Tokenizer = _sentencepiece(path, file, tokens, types)
    elif model == "gpt2":
        tokenizer = _byte_level(path, file, tokens, types)
    else:
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.model {model!r} is not supported (only 'llama', a "
                         "SentencePiece model, and 'gpt2', a byte-level BPE)")
    extra_stops = [file.value(f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom")]
    tokenizer.stop_ids = tokenizer.stop_ids | {i for i in extra_stops if isinstance(i, int) and i < len(tokens)}
    return tokenizer


def _token_id(path: Path, file: GGUFFile, name: str, tokens: list[str], required: bool = True) -> int:
    found = file.value(f"tokenizer.ggml.{name}_token_id")
    if found is None and not required:
        return -1
    if not isinstance(found, int) or not 0 <= found < len(tokens):
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.{name}_token_id is {found!r}, not a token id "
                         f"(0..{len(tokens) - 1})")
    return found


def _sentencepiece(path: Path, file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as error:
        raise ImportError(f"tokenizer: {path}: rebuilding its SentencePiece model needs the protobuf package "
                          "(pip install protobuf)") from error
    scores = file.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer: {path}: {len(scores)} scores for {len(tokens)} tokens")
    unknown = [i for i, kind in enumerate(types) if kind == UNKNOWN]
    if len(unknown) != 1:
        raise ValueError(f"tokenizer: {path}: a SentencePiece vocabulary needs one unknown token, it has "
                         f"{len(unknown)}")
    proto = model_pb2.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    spec.unk_piece = tokens[unknown[0]]
    spec.bos_piece = tokens[_token_id(path, file, "bos", tokens)]
    spec.eos_piece = tokens[_token_id(path, file, "eos", tokens)]
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(file.value("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    try:
        tokenizer = SentencePieceTokenizer.from_proto(proto.SerializeToString(), path)
    except ValueError as error:
        raise ValueError(f"tokenizer: {path}: its pieces do not make a SentencePiece model ({error})") from error
    tokenizer.kind = "SentencePiece, from GGUF"
    if not file.value("tokenizer.ggml.add_bos_token", True):
        tokenizer.bos_id = -1
    return tokenizer


def _byte_level(path: Path, file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as Backend

    pre = file.value("tokenizer.ggml.pre", "default")
    if pre not in SPLIT_PATTERNS:
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.pre {pre!r} is not supported (only "
                         f"{', '.join(sorted(SPLIT_PATTERNS))}: Llama 3's and Mistral's tekken)")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"tokenizer: {path}: {len(tokens) - len(vocab)} token(s) appear twice in "
                         "tokenizer.ggml.tokens")
    merges = []
    for merge in file.value("tokenizer.ggml.merges") or []:
        left, space, right = merge.partition(" ")
        if not space:
            raise ValueError(f"tokenizer: {path}: merge {merge!r} is not two tokens separated by a space")
        unknown = next((token for token in (left, right, left + right) if token not in vocab), None)
        if unknown is not None:
            raise ValueError(f"tokenizer: {path}: merge {merge!r} names {unknown!r}, which is not in "
                             "tokenizer.ggml.tokens")
        merges.append((left, right))
    # ignore_merges: a piece that is a token whole is that token (tiktoken's rule, which both patterns' models use)
    backend = byte_level_llama3(Backend(models.BPE(vocab, merges, ignore_merges=True)), SPLIT_PATTERNS[pre])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == CONTROL])
    # a user-defined token (DeepSeek-R1's "<think>") is read whole from a text, and written back when decoding
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types) if kind == USER_DEFINED])
    bos = _token_id(path, file, "bos", tokens, required=False)
    if not file.value("tokenizer.ggml.add_bos_token", True):
        bos = -1
    tokenizer = BPETokenizer(backend, path, bos, _token_id(path, file, "eos", tokens), ())
    tokenizer.kind = f"byte-level BPE ({pre}), from GGUF"
    return tokenizer


def write_tokenizer_files(gguf_path: Path, folder: Path) -> None:
    """A GGUF file's tokenizer as an HF folder keeps it, so that a base written from the file (adapter.quantize_base)
    opens with the same tokenizer: a SentencePiece model as `tokenizer.model`, a byte-level BPE as `tokenizer.json`
    with its BOS, EOS and stops in `tokenizer_config.json` and `generation_config.json`; the chat template in
    `tokenizer_config.json`."""
    tokenizer = gguf_tokenizer(gguf_path)
    settings: dict = {}
    if isinstance(tokenizer, SentencePieceTokenizer):
        (folder / "tokenizer.model").write_bytes(tokenizer.processor.serialized_model_proto())
    else:
        assert isinstance(tokenizer, BPETokenizer)
        (folder / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
        settings.update(eos_token=tokenizer.backend.id_to_token(tokenizer.eos_id), add_bos_token=tokenizer.bos_id >= 0)
        if tokenizer.bos_id >= 0:
            settings["bos_token"] = tokenizer.backend.id_to_token(tokenizer.bos_id)
        stops = {"eos_token_id": sorted(tokenizer.stop_ids)}
        (folder / "generation_config.json").write_text(json.dumps(stops, indent=2) + "\n", encoding="utf-8")
    template = open_gguf(gguf_path).value("tokenizer.chat_template")
    if isinstance(template, str):
        settings["chat_template"] = template
    if settings:
        (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
