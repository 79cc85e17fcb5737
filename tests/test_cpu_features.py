"""bf16 support is read from torch's CPU probes: AMX or AVX512-BF16 is native, an x86 CPU with neither
emulates bf16 (and gets a warning), other architectures are not judged."""

from __future__ import annotations

import pytest

from adapter import cpu_features


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "amx"), (True, True, "amx"),
                                                        (False, True, "avx512-bf16"), (False, False, "emulated")])
def test_x86_bf16_support_follows_the_probes(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features.torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(cpu_features.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_features.cpu_bf16() == expected
    warning = cpu_features.bf16_emulation_warning("bf16 autocast")
    if expected == "emulated":
        assert warning.startswith("bf16 autocast: this CPU has neither AMX nor AVX512-BF16")
        assert cpu_features.describe_cpu().endswith("(bf16 emulated)")
    else:
        assert warning is None
        assert cpu_features.describe_cpu().endswith(f"(bf16 native: {expected})")


def test_other_architectures_are_not_judged(monkeypatch):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "aarch64")
    assert cpu_features.cpu_bf16() is None
    assert cpu_features.bf16_emulation_warning("bf16 autocast") is None
    assert "bf16" not in cpu_features.describe_cpu()


def test_the_cpu_name_comes_from_cpuinfo_or_the_platform(monkeypatch, tmp_path):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise OSError("no procfs")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(cpu_features.platform, "processor", lambda: "")
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "riscv64")
    assert cpu_features.cpu_name() == "riscv64"
