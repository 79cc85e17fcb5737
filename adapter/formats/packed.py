"""Packed HF folders: GPTQ (AutoGPTQ's and GPTQModel's files), AWQ (AutoAWQ's GEMM layout) and compressed-tensors
(llm-compressor's `pack-quantized`, `int-quantized` and `float-quantized` files), as the hub holds most 4-bit and
FP8 LLaMAs (`*-GPTQ`, `*-AWQ`, `*-w4a16`, `*-FP8`). Each linear is read back to the weights its quantizer's own
kernels compute with (scale x (code - zero), rounded to the scales' dtype) and from there is an ordinary weight:
kept in 16 bits or quantized again to nf4/int8 while loading.

Facts of the layouts (checked against GPTQModel's and compressed-tensors' own code, tests/test_packed.py):
- GPTQ: `X.qweight` int32 [in / (32/bits), out], codes along the input, the first in the low bits; `X.qzeros`
  int32 [groups, out / (32/bits)], along the output; `X.scales` [groups, out]; `X.g_idx` [in], each input's group
  (act-order scatters them; absent: input // group_size). `checkpoint_format` "gptq" (the default, every
  AutoGPTQ file) stores each zero minus one, by a subtraction on whole words; "gptq_v2" stores it as it is.
- AWQ GEMM: `X.qweight` int32 [in, out / 8] and `X.qzeros` [groups, out / 8], both along the output, each word's
  eight codes those of columns 0, 2, 4, 6, 1, 3, 5, 7; `X.scales` [groups, out]; no offset on the zeros.
- compressed-tensors: `X.weight_packed` int32 [out, in * bits / 32] (codes along the input, densely in the
  bit stream, signed: stored plus 2^(bits-1)), or `X.weight` int8 (`int-quantized`) or float8_e4m3fn
  (`float-quantized`, FP8); `X.weight_scale` [out, groups] (channel: 1 group; tensor: one scale; block: one per
  block of [out, in]); `X.weight_zero_point` (asymmetric; packed the same way along the output when
  `weight_packed`); `X.weight_g_idx` with act-order; `X.weight_shape` the [out, in]. A scheme that also quantizes
  activations (W8A8, FP8 "dynamic") is read for its weights; its `X.input_scale` is not used, as transformers'
  dequantizing loader does not use it either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PACKED_METHODS = ("gptq", "awq", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column each of a word's eight codes holds
_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
          "compressed-tensors": ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_g_idx",
                                 "weight_shape", "input_scale", "input_zero_point")}  # the inputs' are not used
_REQUIRED = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
             "compressed-tensors": ("weight_scale",)}
_WORDS = ("qweight", "qzeros", "weight_packed")  # int32 words of packed codes
_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


@dataclass(frozen=True)
class PackedScheme:
    """How a folder's linears are packed, from config.json's quantization_config."""

    method: str
    bits: int
    group_size: int  # -1: one group over all inputs
    zeros_minus_one: bool = False  # GPTQ's v1 checkpoint format
    # compressed-tensors: no zero points stored; fp8 codes; scales per block of [out, in]; the file's scheme
    # quantizes activations too (W8A8, ...), which this model does not: its layers compute with the weights read back
    symmetric: bool = True
    float_codes: bool = False
    block: tuple[int, int] | None = None
    per_tensor: bool = False
    activations: bool = False

    @property
    def label(self) -> str:
        groups = f"blocks of {self.block[0]}x{self.block[1]}" if self.block else "per tensor" if self.per_tensor \
            else "per channel" if self.group_size == -1 else f"group {self.group_size}"
        codes = "fp8" if self.float_codes else f"{self.bits}-bit"
        unread = "; its activation quantization not applied" if self.activations else ""
        return f"{self.method} {codes}, {groups}{unread}"

    def split(self, names: set[str]) -> tuple[set[str], dict[str, dict[str, str]]]:
        """The names that are not parts of a packed linear, and each packed linear's parts by its weight's name:
        {"...q_proj.weight": {"qweight": "...q_proj.qweight", ...}}."""
        parts = _PARTS[self.method]
        plain, packed = set(), {}
        for name in sorted(names):
            owner, _, part = name.rpartition(".")
            if part in parts:
                packed.setdefault(f"{owner}.weight", {})[part] = name
            else:
                plain.add(name)
        # compressed-tensors keeps `X.weight` as the name of 8-bit codes: it is packed only beside a scale
        for owner, found in list(packed.items()):
            if self.method == "compressed-tensors" and "weight_scale" not in found:
                plain.update(found.values())
                del packed[owner]
        return plain, packed

    def dequantize(self, where: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight [out, in] the quantizer's kernels compute with, in the scales' dtype."""
        missing = [part for part in _REQUIRED[self.method] if part not in parts]
        if self.method == "compressed-tensors" and not ({"weight_packed", "weight"} & parts.keys()):
            missing.append("weight_packed")
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} of a {self.method} linear")
        odd = [f"{part} is {value.dtype}" for part, value in sorted(parts.items())
               if part in _WORDS and value.dtype != torch.int32]
        if odd:
            raise ValueError(f"{where}: {', '.join(odd)}, not the int32 words of a {self.method} linear")
        read = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed}[self.method]
        try:
            return read(self, parts)
        except (RuntimeError, IndexError) as error:  # shapes that do not fit each other
            shapes = ", ".join(f"{part} {list(value.shape)}" for part, value in sorted(parts.items()))
            raise ValueError(f"{where}: {self.label} parts do not fit together ({shapes}): {error}") from error


def packed_scheme(settings: dict[str, Any], path: Path) -> PackedScheme:
    """The scheme of a `quantization_config` whose quant_method is one of PACKED_METHODS; what the readers do not
    implement is refused naming the field."""
    method = settings["quant_method"]
    if method == "compressed-tensors":
        return _compressed_scheme(settings, path)
    bits, group_size = settings.get("bits"), settings.get("group_size", -1)
    allowed = (2, 4, 8) if method == "gptq" else (4,)
    if bits not in allowed:
        raise ValueError(f"{path}: quantization_config.bits {bits!r} is not supported for {method} "
                         f"(only {', '.join(map(str, allowed))})")
    _check_group_size(group_size, f"{path}: quantization_config.group_size")
    if method == "awq":
        version = str(settings.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{path}: quantization_config.version {version!r} is not supported (only AutoAWQ's "
                             "'gemm' layout)")
        if not settings.get("zero_point", True):
            raise ValueError(f"{path}: quantization_config.zero_point false is not supported (AWQ with zeros only)")
        if group_size == -1:
            raise ValueError(f"{path}: quantization_config.group_size -1 is not supported for awq")
        return PackedScheme("awq", bits, group_size)
    checkpoint_format = settings.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: quantization_config.checkpoint_format {checkpoint_format!r} is not supported "
                         "(only 'gptq' and 'gptq_v2')")
    if settings.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise ValueError(f"{path}: quantization_config.pack_dtype {settings['pack_dtype']!r} is not supported "
                         "(only int32)")
    overrides = [key for key in (settings.get("dynamic") or {}) if not str(key).startswith("-:")]
    if overrides:
        raise ValueError(f"{path}: quantization_config.dynamic {overrides[0]!r} quantizes some modules otherwise; "
                         "only skipped modules ('-:...') are supported")
    return PackedScheme("gptq", bits, group_size, zeros_minus_one=checkpoint_format == "gptq")


def _check_group_size(value: Any, where: str) -> None:
    if not isinstance(value, int) or not (value == -1 or value > 0):
        raise ValueError(f"{where} {value!r} is not -1 or a positive integer")


def _compressed_scheme(settings: dict[str, Any], path: Path) -> PackedScheme:
    where = f"{path}: quantization_config"
    form = settings.get("format")
    if form not in _CT_FORMATS:
        raise ValueError(f"{where}.format {form!r} is not supported (only {', '.join(_CT_FORMATS)})")
    if settings.get("kv_cache_scheme"):
        raise ValueError(f"{where}.kv_cache_scheme: a quantized KV cache's scales are not read")
    groups = settings.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{where}.config_groups must hold exactly one scheme, got {groups!r}")
    (name, group), = groups.items()
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{where}.config_groups.{name}.weights must be an object")
    fields = f"{where}.config_groups.{name}.weights"
    kind, bits = weights.get("type", "int"), weights.get("num_bits")
    if kind not in ("int", "float"):
        raise ValueError(f"{fields}.type {kind!r} is not supported (only int and float)")
    if kind == "float" and (bits != 8 or form == "pack-quantized"):
        raise ValueError(f"{fields}: float weights of {bits} bits in {form!r} are not supported (only fp8, stored "
                         "as it is)")
    if bits not in range(2, 9):
        raise ValueError(f"{fields}.num_bits {bits!r} is not 2 to 8")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel", "tensor", "block"):
        raise ValueError(f"{fields}.strategy {strategy!r} is not supported (only group, channel, tensor, block)")
    group_size = weights.get("group_size") if strategy == "group" else -1
    _check_group_size(group_size, f"{fields}.group_size")
    block = weights.get("block_structure") if strategy == "block" else None
    if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and
                                    all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{fields}.block_structure {block!r} is not two positive integers")
    activations = any(group.get(part) for part in ("input_activations", "output_activations"))
    return PackedScheme("compressed-tensors", bits, group_size, symmetric=bool(weights.get("symmetric", True)),
                        float_codes=kind == "float", block=tuple(block) if block else None,
                        per_tensor=strategy == "tensor", activations=activations)


def _codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The `bits`-wide codes of int32 words, `32 // bits` per word along each row (the first in the low bits)."""
    shifts = torch.arange(0, 32, bits, dtype=words.dtype)
    codes = (words.unsqueeze(2) >> shifts) & (2 ** bits - 1)
    return codes.reshape(words.shape[0], -1)


def _scaled(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """scale x (code - zero) of codes [out, in] with zeros and scales [out, groups] and each input's group, in
    float32 (exact) and then the scales' dtype. Groups of consecutive inputs (all but act-order) are broadcast, not
    gathered per input."""
    outputs, inputs = codes.shape
    count = zeros.shape[1]
    size = inputs // count if count else 0
    if size and size * count == inputs and torch.equal(groups.long(), torch.arange(inputs) // size):
        weight = codes.reshape(outputs, count, size).float()
        weight.sub_(zeros.float().unsqueeze(2)).mul_(scales.float().unsqueeze(2))
        return weight.view(outputs, inputs).to(scales.dtype)
    groups = groups.long()
    weight = codes.float().sub_(zeros.float().index_select(1, groups)).mul_(scales.float().index_select(1, groups))
    return weight.to(scales.dtype)


def _output_major(codes: torch.Tensor) -> torch.Tensor:
    """Codes [in, out] (0..255) as [out, in], moved while they are bytes (a quarter of float32's traffic)."""
    return codes.to(torch.uint8).T.contiguous()


def _input_groups(count: int, group_size: int) -> torch.Tensor:
    return torch.arange(count) // (count if group_size == -1 else group_size)


def _gptq(scheme: PackedScheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    scales = parts["scales"]
    g_idx = parts.get("g_idx")
    codes = _codes(parts["qweight"].T.contiguous(), scheme.bits)  # [out, in]: the words turned, not the codes
    inputs = codes.shape[1] if g_idx is None else g_idx.numel()
    groups = _input_groups(inputs, scheme.group_size) if g_idx is None else g_idx
    qzeros = parts["qzeros"]
    if scheme.zeros_minus_one:  # undone on whole words, as the subtraction was done (a borrow crosses codes)
        qzeros = (qzeros.long() + sum(1 << shift for shift in range(0, 32, scheme.bits))) & 0xFFFFFFFF
    zeros = _codes(qzeros, scheme.bits)[:, : scales.shape[1]]
    return _scaled(codes[:, :inputs], zeros.T, scales.T, groups)


def _awq(scheme: PackedScheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    per_word = len(AWQ_ORDER)
    position = torch.tensor(AWQ_ORDER).argsort()  # column k's code is the word's position[k]

    def columns(words: torch.Tensor) -> torch.Tensor:
        codes = _codes(words, scheme.bits)
        return codes.view(codes.shape[0], -1, per_word)[:, :, position].reshape(codes.shape)

    codes, zeros = columns(parts["qweight"]), columns(parts["qzeros"])
    return _scaled(_output_major(codes), zeros.T, parts["scales"].T,
                   _input_groups(codes.shape[0], scheme.group_size))


def _stream_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' dense packing: code i of a row is bits [i*bits, (i+1)*bits) of the row's words read as
    one little-endian bit stream (a code may straddle two words; with 2, 4 or 8 bits none does, and the stream is
    `_codes`' layout)."""
    if 32 % bits == 0:
        return _codes(words, bits)[:, :count] - 2 ** (bits - 1)
    unsigned = words.long() & 0xFFFFFFFF
    start = torch.arange(count) * bits
    word, offset = start // 32, start % 32
    low = unsigned[:, word] >> offset
    following = unsigned[:, (word + 1).clamp(max=words.shape[1] - 1)]
    high = torch.where(offset + bits > 32, following << (32 - offset), torch.zeros_like(following))
    return ((low | high) & (2 ** bits - 1)) - 2 ** (bits - 1)


def _compressed(scheme: PackedScheme, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    scales = parts["weight_scale"]
    if "weight_packed" in parts:
        shape = parts.get("weight_shape")
        inputs = int(shape[1]) if shape is not None else parts["weight_packed"].shape[1] * 32 // scheme.bits
        codes = _stream_codes(parts["weight_packed"], scheme.bits, inputs)
    else:
        codes = parts["weight"]  # int8, or float8 codes
        inputs = codes.shape[1]
    outputs = codes.shape[0]
    if scheme.block:
        return _blocks(codes, scales, scheme.block)
    if scales.dim() == 0 or scales.numel() == 1:
        scales = scales.reshape(1, 1).expand(outputs, 1)
    zeros = parts.get("weight_zero_point")
    if zeros is None or scheme.symmetric:
        zeros = torch.zeros(scales.shape, dtype=torch.long)
    elif "weight_packed" in parts:  # packed along the output, the same stream
        zeros = _stream_codes(zeros.T.contiguous(), scheme.bits, outputs).T
    else:
        zeros = zeros.reshape(scales.shape).long()
    g_idx = parts.get("weight_g_idx")
    groups = _input_groups(inputs, -1 if scales.shape[1] == 1 else scheme.group_size) if g_idx is None else g_idx
    return _scaled(codes, zeros, scales, groups)


def _blocks(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Codes [out, in] times one scale per block of `block` (the last blocks cut at the edges)."""
    outputs, inputs = codes.shape
    every = scales.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (codes.float() * every[:outputs, :inputs]).to(scales.dtype)
