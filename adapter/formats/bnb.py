"""Pre-quantized HF folders: linears stored by bitsandbytes as transformers saves them (`save_pretrained` of a model
loaded with `BitsAndBytesConfig`; the hub's `*-bnb-4bit` / `*-bnb-8bit` repositories), and written so by
`adapter.quantize_base`.

config.json's `quantization_config` says `quant_method: bitsandbytes` and `load_in_4bit` or `load_in_8bit`. A 4-bit
linear `X` is `X.weight` (the packed codes, uint8 [out*in/2, 1]) beside its quant state: `X.weight.absmax`,
`X.weight.quant_map`, with double quantization `X.weight.nested_absmax` and `X.weight.nested_quant_map`, and
`X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`: shape, dtype, block sizes as packed JSON). An 8-bit linear is
`X.weight` (int8 [out, in], LLM.int8's row-wise codes), `X.SCB` (each row's scale) and `X.weight_format` (0: row
major). Linears the quantizer skipped (`llm_int8_skip_modules`: the head, or whole layers of "dynamic" 4-bit
folders) are plain tensors and are loaded as such, as transformers does.

HF keeps wq/wk rows in rotate-half order; Meta's order is reached by permuting whole rows (`QuantizedWeight.rows`).
A row of 4-bit codes is a run of whole blocks when `in` is a multiple of the block size, so the codes and block
scales move with it and the weights stay exactly the file's; double-quantized block scales are dequantized first
(to float32, as bitsandbytes does before every matmul), since their second-level blocks span rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

FOUR_BIT_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                  "quant_state.bitsandbytes__fp4")
INT8_STATS = ("SCB", "weight_format")
ROW_MAJOR = 0  # weight_format: older bitsandbytes also wrote GPU tile layouts (1, 2, 3), which are not read


def stored_quantization(config: dict[str, Any], path: Path) -> str | None:
    """The folder's 4-bit type ("nf4", "fp4") or "int8" from config.json's quantization_config; None if it has
    none. Methods that are neither bitsandbytes nor read back to weights (adapter.formats.packed: GPTQ, AWQ,
    compressed-tensors) are refused by name (fp8, HQQ, ...)."""
    settings = config.get("quantization_config")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: quantization_config must be an object, got {settings!r}")
    method = settings.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{path}: quantization_config.quant_method {method!r} is not supported (only "
                         "'bitsandbytes': nf4, fp4 or int8 linears, or 'gptq', 'awq', 'compressed-tensors')")
    if settings.get("load_in_4bit"):
        kind = settings.get("bnb_4bit_quant_type", "fp4")
        if kind not in ("nf4", "fp4"):
            raise ValueError(f"{path}: quantization_config.bnb_4bit_quant_type {kind!r} is not nf4 or fp4")
        return kind
    if settings.get("load_in_8bit"):
        return "int8"
    raise ValueError(f"{path}: quantization_config has neither load_in_4bit nor load_in_8bit set")


def stored_double_quant(config: dict[str, Any]) -> bool:
    """Whether a 4-bit folder's block scales are themselves quantized (`bnb_4bit_use_double_quant`, false unless
    set, as in transformers' BitsAndBytesConfig): what its weights take in memory depends on it."""
    settings = config.get("quantization_config")
    return isinstance(settings, dict) and settings.get("bnb_4bit_use_double_quant") is True


def split_stats(names: set[str]) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The file's tensor names without the quantization statistics, and the statistics by the weight they
    belong to: {"...q_proj.weight": {"absmax": "...q_proj.weight.absmax", ...}}."""
    plain, stats = set(), {}
    for name in sorted(names):  # errors name the first in order
        owner, key = _stat_of(name)
        if owner is None:
            plain.add(name)
        else:
            stats.setdefault(owner, {})[key] = name
    return plain, stats


def _stat_of(name: str) -> tuple[str | None, str]:
    for key in FOUR_BIT_STATS:
        if name.endswith(f".weight.{key}"):
            return name[: -len(key) - 1], key
    for key in INT8_STATS:
        if name.endswith(f".{key}"):
            return name[: -len(key)] + "weight", key
    return None, ""


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's weight as bitsandbytes stored it: `data` (the codes) and, for 4-bit, its `QuantState`, for
    int8 its row scales. `shape` is the dequantized weight's [out, in]."""

    mode: str
    data: torch.Tensor
    shape: tuple[int, int]
    quant_state: Any = None  # bitsandbytes.functional.QuantState (4-bit)
    row_scales: torch.Tensor | None = None  # SCB (int8)

    @classmethod
    def read(cls, where: str, data: torch.Tensor, stats: dict[str, torch.Tensor]) -> QuantizedWeight:
        """From the weight tensor and its statistics (named as in the file, `where` names the tensor in errors)."""
        if "SCB" in stats:
            return cls._read_int8(where, data, stats)
        if "weight_format" in stats:  # what transformers saves beside int8 codes alone
            raise ValueError(f"{where}: int8 weight without its row scales (SCB)")
        functional = _functional()
        try:  # what the packed JSON says (whether double quantized is checked below); bitsandbytes reads it too,
            # given packed: up to 0.49 its reader refused the same items unpacked
            packed = [key for key in stats if key.startswith("quant_state.")]
            declared = functional.unpack_tensor_to_dict(stats[packed[0]]) if len(packed) == 1 else stats
            state = functional.QuantState.from_dict(dict(stats), device=torch.device("cpu"))  # a copy: it pops
        except (ValueError, KeyError, AssertionError, TypeError, AttributeError) as error:
            found = ", ".join(sorted(stats))
            raise ValueError(f"{where}: incomplete 4-bit quantization state (has {found}; "
                             f"needs absmax, quant_map and quant_state.bitsandbytes__nf4/fp4): {error!r}") from error
        if state.shape is None or len(state.shape) != 2:
            raise ValueError(f"{where}: 4-bit quantization state has shape {state.shape}, expected [out, in]")
        out_features, in_features = state.shape
        if data.numel() * data.element_size() * 2 != out_features * in_features:
            raise ValueError(f"{where}: {data.numel() * data.element_size()} bytes of 4-bit codes do not hold a "
                             f"{out_features}x{in_features} weight")
        _check_block_scales(where, state, "nested_offset" in declared)
        return cls(state.quant_type, data, (out_features, in_features), quant_state=state)

    @classmethod
    def _read_int8(cls, where: str, data: torch.Tensor, stats: dict[str, torch.Tensor]) -> QuantizedWeight:
        layout = stats.get("weight_format")
        if layout is not None and layout.numel() != 1:
            raise ValueError(f"{where}: weight_format must be one number (0: row-major), got shape "
                             f"{tuple(layout.shape)}")
        if layout is not None and int(layout) != ROW_MAJOR:
            raise ValueError(f"{where}: weight_format {int(layout)} is a GPU tile layout of old bitsandbytes; only "
                             "row-major (0) int8 weights are read")
        scales = stats["SCB"]
        if data.dtype != torch.int8 or data.dim() != 2 or tuple(scales.shape) != (data.shape[0],):
            raise ValueError(f"{where}: expected int8 [out, in] codes and [out] row scales (SCB), got "
                             f"{data.dtype} {tuple(data.shape)} and {tuple(scales.shape)}")
        return cls("int8", data, tuple(data.shape), row_scales=scales.float())

    @classmethod
    def quantize(cls, weight: torch.Tensor, mode: str, double_quant: bool, blocksize: int) -> QuantizedWeight:
        """`weight` [out, in] quantized as bitsandbytes' Params4bit / Int8Params do (on the weight's device)."""
        functional = _functional()
        weight = weight.contiguous()
        if mode == "int8":  # row-wise, from float16
            codes, scales, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
            return cls("int8", codes.cpu(), tuple(weight.shape), row_scales=scales.float().cpu())
        codes, state = functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                                quant_type=mode, quant_storage=torch.uint8)
        state.to("cpu")
        return cls(mode, codes.cpu(), tuple(weight.shape), quant_state=state)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors transformers saves for this weight, named after `name` ("...q_proj.weight")."""
        if self.mode == "int8":
            module = name.removesuffix("weight")
            return {name: self.data, module + "SCB": self.row_scales,
                    module + "weight_format": torch.tensor(ROW_MAJOR, dtype=torch.uint8)}
        packed = self.quant_state.as_dict(packed=True)
        return {name: self.data, **{f"{name}.{key}": value for key, value in packed.items()}}

    def rows(self, order: torch.Tensor) -> QuantizedWeight:
        """The weight with its rows taken in `order` (weight[order], exactly)."""
        out_features, in_features = self.shape
        if self.mode == "int8":
            return replace(self, data=self.data[order], row_scales=self.row_scales[order])
        state = self.quant_state
        if in_features % state.blocksize:
            raise ValueError(f"rows of a {out_features}x{in_features} 4-bit weight are not whole blocks of "
                             f"{state.blocksize}; its rows cannot be reordered")
        scales = _block_scales(state).view(out_features, -1)[order].reshape(-1)
        codes = self.data.view(torch.uint8).view(out_features, -1)[order].reshape(-1, 1)
        moved = _functional().QuantState(absmax=scales, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=state.dtype)
        return replace(self, data=codes, quant_state=moved)


def _check_block_scales(where: str, state, declared_nested: bool) -> None:
    """That the block scales fit the weight: one a block (bitsandbytes reads past the end of too few), double
    quantized (uint8 codes and their own scales) where the packed state says so: a missing nested_absmax made
    the codes read as plain scales, the weights silently wrong."""
    if declared_nested and not state.nested:
        raise ValueError(f"{where}: the quantization state says double quantized (nested_offset), but its "
                         "nested_absmax is missing")
    tables = [("blocksize", "quant_map", state, 16)]  # 4-bit codes index 16 levels, nested uint8 ones 256
    if state.nested:
        tables.append(("nested_blocksize", "nested_quant_map", state.state2, 256))
    for size_name, map_name, level, entries in tables:
        if isinstance(level.blocksize, bool) or not isinstance(level.blocksize, int) or level.blocksize < 1:
            raise ValueError(f"{where}: {size_name} must be a positive whole number, got {level.blocksize!r}")
        # one dimension, as bitsandbytes' kernels index them (a [1, 16] table loaded, then failed answering)
        if tuple(level.code.shape) != (entries,) or not level.code.is_floating_point():
            raise ValueError(f"{where}: {map_name} is {str(level.code.dtype).removeprefix('torch.')} "
                             f"{tuple(level.code.shape)}; expected ({entries},): {entries} floating-point levels")
    out_features, in_features = state.shape
    blocks = math.ceil(out_features * in_features / state.blocksize)
    levels = [("absmax", state.absmax, blocks, torch.uint8 if state.nested else torch.float32)]
    if state.nested:
        levels.append(("nested_absmax", state.state2.absmax, math.ceil(blocks / state.state2.blocksize),
                       torch.float32))
    for name, scales, count, dtype in levels:
        if tuple(scales.shape) != (count,) or scales.dtype != dtype:
            raise ValueError(f"{where}: {name} is {str(scales.dtype).removeprefix('torch.')} "
                             f"{tuple(scales.shape)}; a {out_features}x{in_features} weight in blocks of "
                             f"{state.blocksize} has ({count},) {str(dtype).removeprefix('torch.')} block scales")


def _block_scales(state) -> torch.Tensor:
    """A 4-bit state's per-block scales in float32 (undoing the second-level quantization, if any)."""
    if not state.nested:
        return state.absmax.float()
    return _functional().dequantize_blockwise(state.absmax, state.state2) + state.offset


def _functional():
    """bitsandbytes.functional, or the clear error that says to install it."""
    from ..quantize import bitsandbytes

    return bitsandbytes().functional
