"""Llama 3's byte-level BPE tokenizer, read from HF's `tokenizer.json` or from Meta's tiktoken ranks.

Meta's `tokenizer.model` for Llama 3 is text: one token per line, its bytes in base64 and its rank, which
is also its id; the 256 special tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...) follow the ranks. tiktoken
encodes a piece of text (split by Llama 3's pattern) by merging, again and again, the adjacent pair whose
joined bytes have the lowest rank. The same tokenizer as an HF BPE model: the vocabulary is the ranks, with
bytes written as GPT-2's printable characters, and each token of two bytes or more has a merge for every
way it splits into two tokens, ordered by its rank, so that HF's merge-the-highest-priority-pair loop takes
the same steps. Both files then run on the `tokenizers` library.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tokenizer import Tokenizer

# how Llama 3 splits text into pieces before BPE (tiktoken's pat_str for Llama 3, also in its tokenizer.json)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's tekken pattern (Mistral NeMo's tekken.json; llama.cpp's "tekken" pre-tokenizer)
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_COUNT = 256
# Llama 3.2's named special tokens by their offset after the ranks; the others are reserved_special_token_N
LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                10: "<|python_tag|>", 11: "<|image|>"}
BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a LLaMA 1/2 tokenizer.json's byte-fallback pieces
TURN_ENDS = ("<|eot_id|>", "<|eom_id|>")  # an instruct model ends its answer with these, not with EOS


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens in id order (reserved slots numbered from 0, as Meta names them)."""
    names, reserved = [], 0
    for offset in range(LLAMA3_SPECIAL_COUNT):
        if offset in LLAMA3_NAMED:
            names.append(LLAMA3_NAMED[offset])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def _printable_bytes() -> list[str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the others for
    characters from U+0100 on, so that every byte string is a string of visible characters."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in kept:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


BYTE_CHARS = _printable_bytes()
_BYTE_OF = {char: byte for byte, char in enumerate(BYTE_CHARS)}


def bytes_to_text(token: bytes) -> str:
    return "".join(BYTE_CHARS[b] for b in token)


def text_to_bytes(text: str) -> bytes:
    """The bytes a BPE vocabulary entry written in GPT-2's characters stands for."""
    return bytes(_BYTE_OF[c] for c in text)


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` starts like a tiktoken ranks file ("<base64> <rank>" lines), not a SentencePiece model."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a tiktoken file, checked: every line two fields, ranks 0..n-1 once each, all 256 bytes."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if len(fields) != 2:
                    raise ValueError
            except (binascii.Error, ValueError, IndexError):
                raise ValueError(f"tokenizer: {path} line {number}: expected '<base64 bytes> <rank>', "
                                 f"got {line[:60]!r}") from None
            if token in ranks:
                raise ValueError(f"tokenizer: {path} line {number}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"tokenizer: {path}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"tokenizer: {path}: {len(missing)} single byte(s) have no rank (e.g. {missing[0]:#04x})")
    return ranks


def write_ranks(path: Path, tokens: Sequence[bytes]) -> None:
    """A tiktoken ranks file: each token's bytes in base64, then its rank (its place in `tokens`)."""
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))
    path.write_text("".join(lines), encoding="utf-8")


def byte_level_llama3(backend: Any, pattern: str = LLAMA3_SPLIT) -> Any:
    """Give a `tokenizers` backend Llama 3's pieces (its split pattern, or another tiktoken `pattern`, then bytes
    as GPT-2's characters) and the decoder that turns those characters back into bytes."""
    from tokenizers import Regex, decoders, pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF BPE vocabulary and merges that encode as tiktoken does with `ranks` (see the module docstring)."""
    vocab = {bytes_to_text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], bytes_to_text(left), bytes_to_text(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer run by the `tokenizers` library (installed with transformers)."""

    def __init__(self, backend: Any, path: Path, bos: int, eos: int, stops: Sequence[int]) -> None:
        self.backend = backend
        self.path = path
        self.kind = "BPE, HF tokenizer.json" if path.suffix == ".json" else "byte-level BPE, tiktoken ranks"
        self.n_words = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos, eos
        turn_ends = [backend.token_to_id(name) for name in TURN_ENDS]
        self.stop_ids = frozenset([eos, *stops, *(i for i in turn_ends if i is not None)])

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Meta's Llama 3 `tokenizer.model`: the ranks, Llama 3's split pattern and its 256 special tokens."""
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        ranks = read_ranks(path)
        vocab, merges = bpe_from_ranks(ranks)
        # ignore_merges: tiktoken takes a piece that is a token whole
        backend = byte_level_llama3(Backend(models.BPE(vocab, merges, ignore_merges=True)))
        specials = llama3_special_tokens()
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
        if backend.token_to_id(specials[-1]) != len(ranks) + len(specials) - 1:
            raise ValueError(f"tokenizer: {path}: special tokens did not get the ids after the ranks")
        ids = {name: backend.token_to_id(name) for name in (BOS_TOKEN, EOS_TOKEN)}
        return cls(backend, path, ids[BOS_TOKEN], ids[EOS_TOKEN], ())

    @classmethod
    def from_tekken(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Mistral's `tekken.json` (Mistral NeMo and later), read as mistral-common reads it: the special tokens
        take ids 0..N-1 (the file's list, or mistral-common's defaults for files without one, then `<SPECIAL_i>`
        up to `default_num_special_tokens`), the first `default_vocab_size - N` ranks follow them, and text is
        split by the file's tiktoken pattern."""
        from tokenizers import AddedToken, models
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        specials, ranks, pattern = _read_tekken(path)
        vocab, merges = bpe_from_ranks(ranks)
        vocab = {text: rank + len(specials) for text, rank in vocab.items()}
        vocab.update({name: index for index, name in enumerate(specials)})
        backend = byte_level_llama3(Backend(models.BPE(vocab, merges, ignore_merges=True)), pattern)
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
        tokenizer = cls(backend, path, specials.index("<s>"), specials.index("</s>"), ())
        tokenizer.kind = "byte-level BPE, Mistral tekken.json"
        return tokenizer

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BPETokenizer":
        """HF's `tokenizer.json`; BOS, EOS and the stop ids from the folder's tokenizer_config.json,
        config.json and generation_config.json (Llama 3 Instruct lists its <|eot_id|> there)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:  # the library raises its own Exception subclass for any bad file
            raise ValueError(f"tokenizer: {path} is not a readable tokenizer.json ({error})") from error
        # a file saved with truncation or padding on cut every prompt to its max_length (silently) or padded it;
        # transformers turns both off unless a call asks for them
        backend.no_truncation()
        backend.no_padding()
        folder = path.parent
        settings = _json_or_empty(folder / "tokenizer_config.json")
        config = _json_or_empty(folder / "config.json")
        generation = _json_or_empty(folder / "generation_config.json")
        bos = _token_id(backend, settings.get("bos_token"), config.get("bos_token_id"), BOS_TOKEN)
        eos = _token_id(backend, settings.get("eos_token"), config.get("eos_token_id"), EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer: {path}: no end-of-text token (no eos_token in tokenizer_config.json, "
                             f"no eos_token_id in config.json, no {EOS_TOKEN})")
        if settings.get("add_bos_token") is False or bos is None:
            bos = -1
        return cls(backend, path, bos, eos, _ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id")))

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        piece = self.backend.id_to_token(int(token_id)) or ""
        if _BYTE_PIECE.fullmatch(piece):  # a LLaMA 1/2 byte-fallback piece, as SentencePieceTokenizer shows it
            value = int(piece[3:-1], 16)
            return chr(value) if value < 0x80 else piece
        text = self.backend.decode([int(token_id)], skip_special_tokens=False)
        # a LLaMA 1/2 tokenizer.json marks a word's start with U+2581, which its decoder drops at the start of a text
        if piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(int(token_id)) or ""
        if _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:-1], 16)])
        text = self.token_text(token_id)
        if "\ufffd" in text and all(char in _BYTE_OF for char in piece):  # a byte-level piece of part of a character
            return text_to_bytes(piece)
        return text.encode()


# mistral-common's special tokens of the tekken files that list none (up to version v7: Mistral NeMo's), by id
TEKKEN_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


def _read_tekken(path: Path) -> tuple[list[str], dict[bytes, int], str]:
    """The special tokens in id order, the kept ranks and the split pattern of a tekken.json, checked."""
    from .formats.meta import read_json

    data = read_json(path)
    config = data.get("config")
    fields = ("pattern", "default_vocab_size", "default_num_special_tokens")
    if not isinstance(config, dict) or any(config.get(name) is None for name in fields) or \
            not isinstance(data.get("vocab"), list):
        raise ValueError(f"tokenizer: {path}: a tekken.json needs 'vocab' and 'config' with {', '.join(fields)}")
    for name in fields[1:]:
        if isinstance(config[name], bool) or not isinstance(config[name], int) or config[name] < 0:
            raise ValueError(f"tokenizer: {path}: config.{name} must be a whole number, got {config[name]!r}")
    _check_pattern(config["pattern"], path)
    listed = data.get("special_tokens")
    if listed is None:
        specials = list(TEKKEN_SPECIALS)
    else:
        try:
            by_rank = sorted((entry["rank"], str(entry["token_str"])) for entry in listed)
        except (KeyError, TypeError):
            raise ValueError(f"tokenizer: {path}: special_tokens entries need 'rank' and 'token_str'") from None
        if [rank for rank, _ in by_rank] != list(range(len(by_rank))):
            raise ValueError(f"tokenizer: {path}: special token ranks are not 0..{len(by_rank) - 1}")
        specials = [name for _, name in by_rank]
        twice = sorted({name for name in specials if specials.count(name) > 1})
        if twice:
            raise ValueError(f"tokenizer: {path}: special_tokens lists {twice[0]!r} more than once")
    count = config["default_num_special_tokens"]
    if len(specials) > count or "<s>" not in specials or "</s>" not in specials:
        raise ValueError(f"tokenizer: {path}: {len(specials)} special tokens for default_num_special_tokens={count}"
                         ", or no <s> and </s> among them")
    specials += [f"<SPECIAL_{index}>" for index in range(len(specials), count)]
    kept = config["default_vocab_size"] - count
    try:
        ranks = {base64.b64decode(entry["token_bytes"], validate=True): entry["rank"] for entry in data["vocab"][:kept]}
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise ValueError(f"tokenizer: {path}: vocab entries need 'rank' and base64 'token_bytes'") from None
    if any(isinstance(rank, bool) or not isinstance(rank, int) for rank in ranks.values()) or \
            sorted(ranks.values()) != list(range(kept)):
        raise ValueError(f"tokenizer: {path}: the first {kept} vocab ranks (default_vocab_size - special tokens) "
                         f"are not 0..{kept - 1}, each once")
    return specials, ranks, config["pattern"]


def _check_pattern(pattern: Any, path: Path) -> None:
    """That a tekken.json's split pattern is a regular expression the `tokenizers` library compiles (it raises a
    bare Exception on one it cannot)."""
    from tokenizers import Regex

    if not isinstance(pattern, str):
        raise ValueError(f"tokenizer: {path}: config.pattern must be a regular expression, got {pattern!r}")
    try:
        Regex(pattern)
    except Exception as error:  # tokenizers' own Exception (Oniguruma's message)
        raise ValueError(f"tokenizer: {path}: config.pattern is not a regular expression ({error})") from None


def _json_or_empty(path: Path) -> dict[str, Any]:
    """A sidecar file's settings; a folder may lack any of them."""
    from .formats.meta import read_json

    return read_json(path) if path.is_file() else {}


def _token_id(backend: Any, token: Any, config_id: Any, fallback: str) -> int | None:
    """A token given by its text (a string or HF's {"content": ...}), else the config's id, else by name."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and backend.token_to_id(token) is not None:
        return backend.token_to_id(token)
    ids = _ids(config_id)
    if ids:
        return ids[0]
    return backend.token_to_id(fallback)


def _ids(value: Any) -> list[int]:
    """An id or a list of ids as config files write them (absent: none)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
