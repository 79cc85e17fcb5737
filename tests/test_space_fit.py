"""Whether a Space's hardware holds what the app's flags serve (adapter.space_fit), checked by `adapter.space` before
a deploy: the base's weights in the precision the flags load it in, the CLIP tower's, the KV cache of the requests
decoded at once and a reserve, against the hardware's GPU (or CPU) memory; refused, with what would fit, where it
does not. A LLaMA-7B shape stands in for a hub base read without its weights; nothing reaches the network."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from adapter.config import ModelArgs
from adapter.hub import hub_failures
from adapter.space import deploy, main
from adapter.space_fit import check_fit
from adapter.tiny.assets import ASSETS, BASE
from tests.test_push import FakeHub

LLAMA_7B_BF16 = 6_738_415_616 * 2  # Llama-2-7B's parameters, two bytes each: 12.55 GiB
VIT_L14_BF16 = 303_966_208 * 2  # OpenAI's ViT-L/14 vision tower: 0.57 GiB


def seven_b(quantization: str | None = None) -> SimpleNamespace:
    """A Llama-2-7B-shaped base as `open_base_shape` gives a hub base without its weights."""
    tokenizer = ASSETS / BASE / "tokenizer.model"  # only its vocabulary size is read; the shape says 32000
    return SimpleNamespace(model_args=lambda n_words: ModelArgs(max_seq_len=4096), tokenizer_path=tokenizer,
                           tied_output=False, quantization=quantization)


def flags(**named: str) -> dict[str, str]:
    return {"ADAPTER_BASE": "hf:meta-llama/Llama-2-7b-hf"} | {f"ADAPTER_{k.upper()}": v for k, v in named.items()}


def test_a_7b_base_in_16_bits_just_fits_a_t4_and_the_line_shows_the_sum():
    assert round(LLAMA_7B_BF16 / 2**30, 2) == 12.55
    assert check_fit(flags(), "t4-small", seven_b()) == [
        "hardware t4-small (Nvidia T4, 16 GB of GPU memory): holds it",
        "  base float16 12.55 GiB + KV cache 1.00 GiB (1 x 2,048 tokens) + reading the prompt 193.0 MiB + 0.50 GiB "
        "for CUDA = 14.24 of 14.90 GiB; the KV cache has room for about 3,400 tokens in all"]
    # 16e9 bytes; 0.5 MiB per token
    # reading the prompt: 2,048 tokens x (3 x 11,008 + 4 x 4,096) widths x 2 bytes


def test_what_does_not_fit_is_refused_with_what_would():
    with pytest.raises(ValueError) as refused:
        check_fit(flags(concurrency="8"), "t4-small", seven_b())
    assert str(refused.value) == (
        "--hardware t4-small (Nvidia T4, 16 GB of GPU memory) cannot hold the app's base in float16: base float16 "
        "12.55 GiB + KV cache 8.00 GiB (8 x 2,048 tokens) + reading the prompt 1.51 GiB + 0.50 GiB for CUDA = 22.56 "
        "of 14.90 GiB; --quantize nf4 would (13.99 GiB); --hardware l40sx1 would (Nvidia L40S, 22.56 GiB); "
        "--no-fit-check deploys anyway"), \
        "int8 (6.53 + 8 + 1.51 + a layer unpacked) does not fit either, so it is not offered"
    with pytest.raises(ValueError, match=r"^--hardware cpu-basic \(2 vCPU, 16 GB of memory\) cannot hold the app's "
                                         r"base in float32: base float32 25\.10 GiB \+ KV cache 2\.00 GiB .* \+ "
                                         r"sessions 309\.9 MiB \(1,000 kept\) \+ 1\.00 GiB for the app itself = "
                                         r"28\.78 of 14\.90 GiB; --quantize nf4 would \(8\.52 GiB\); --quantize int8 "
                                         r"would \(11\.45 GiB\); --hardware cpu-upgrade would \(8 vCPU, 28\.78 GiB\);"):
        check_fit(flags(), "cpu-basic", seven_b())  # a CPU computes in float32 unless --dtype says; the process keeps
        # what gradio holds per session (0.31 MiB each) for up to --max-sessions of them, 1,000 by default
    few = check_fit(flags(dtype="bfloat16", quantize="nf4", max_sessions="16"), "cpu-basic", seven_b())[1]
    assert " + sessions 5.0 MiB (16 kept) + 1.00 GiB for the app itself = " in few
    assert check_fit(flags(dtype="bfloat16", quantize="nf4"), "cpu-basic", seven_b())[0].endswith("holds it")
    # with --device cuda, hardware without a GPU (refused there) is not offered (cpu-upgrade was)
    with pytest.raises(ValueError) as refused:
        check_fit(flags(dtype="float32", device="cuda"), "a10g-small", seven_b())
    assert "--hardware cpu-upgrade" not in str(refused.value) and "--hardware l40sx1 would (Nvidia L40S," in \
        str(refused.value)


def test_the_tower_counts_where_its_model_is_known_and_is_named_where_not():
    release = check_fit(flags(quantize="nf4", adapter="official:BIAS-7B", clip="openai"), "t4-small", seven_b())
    assert release[1].startswith("  base nf4 3.60 GiB + CLIP tower 579.8 MiB + KV cache 1.00 GiB (1 x 2,048 "
                                 "tokens) + reading the prompt 579.0 MiB + 0.50 GiB for CUDA = 6.23 of 14.90 GiB"), \
        "the releases read OpenAI's ViT-L/14; a quantized base's layer is unpacked while reading (0.38 GiB)"
    assert round(VIT_L14_BF16 / 2**30, 2) == 0.57
    quantized = check_fit(flags(quantize="nf4", adapter="official:BIAS-7B", clip="openai", clip_quantize="nf4"),
                          "t4-small", seven_b())
    assert " + CLIP tower 152.5 MiB + " in quantized[1]
    theirs = check_fit(flags(quantize="nf4", adapter="hf:me/vision", clip="openai"), "t4-small", seven_b())
    assert " + the CLIP tower (its model is the adapter's; --clip-model NAME counts it) + " in theirs[1]
    named = check_fit(flags(quantize="nf4", adapter="hf:me/vision", clip="openai", clip_model="ViT-L-14-quickgelu"),
                      "t4-small", seven_b())
    assert named[1] == release[1]
    text_only = check_fit(flags(quantize="nf4", adapter="official:v1"), "t4-small", seven_b())
    assert "CLIP" not in text_only[1], "no tower without --clip"


def test_a_stored_base_the_kv_cache_the_device_and_unknown_hardware():
    stored = pytest.raises(ValueError, check_fit, flags(concurrency="12"), "t4-small", seven_b("nf4"))
    assert "cannot hold the app's base in nf4" in str(stored.value) and "--quantize" not in str(stored.value), \
        "a pre-quantized base is loaded as stored: no other precision to offer"
    assert "--hardware l4x1 would" in str(stored.value)
    int8_cache = check_fit(flags(quantize="nf4", kv_cache="int8"), "t4-small", seven_b())
    assert "KV cache 520.0 MiB (1 x 2,048 tokens)" in int8_cache[1], "a byte a value and a 2-byte scale a vector"
    on_cpu = check_fit(flags(quantize="nf4", device="cpu"), "t4-medium", seven_b())
    assert on_cpu[0] == "hardware t4-medium (Nvidia T4, 30 GB of memory): holds it", "--device cpu: its memory"
    several = check_fit(flags(), "a10g-largex2", seven_b())
    assert several[0] == ("hardware a10g-largex2 (2x Nvidia A10G, 24 GB of GPU memory on each of 2 GPUs, of which "
                          "the app uses one): holds it")
    with pytest.raises(ValueError, match=r"^--hardware cpu-basic: it has no GPU, so --device cuda cannot run there"):
        check_fit(flags(device="cuda"), "cpu-basic", seven_b())
    assert check_fit(flags(), "a100x8", seven_b()) == [
        "hardware a100x8: its memory is not in adapter.space_fit's table; not checked"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    fake.install(monkeypatch)
    return fake


def test_a_deploy_to_hardware_too_small_sends_nothing_and_no_fit_check_sends_it(hub, monkeypatch, capsys):
    monkeypatch.setattr("adapter.loading.hub_base_without_weights", lambda base: seven_b())
    request = ["--base", "hf:meta-llama/Llama-2-7b-hf", "--concurrency", "8"]
    with pytest.raises(ValueError, match=r"^--hardware t4-small \(Nvidia T4, 16 GB of GPU memory\) cannot hold"):
        deploy("me/demo", request, hardware="t4-small")
    assert hub.calls == [], "refused before anything reached the hub"
    assert main(["me/demo", "--hardware", "t4-small", *request]) == 2
    assert capsys.readouterr().err.startswith("error: --hardware t4-small (Nvidia T4, 16 GB of GPU memory) cannot")
    assert main(["me/demo", "--hardware", "t4-small", "--no-fit-check", *request]) == 0
    assert capsys.readouterr().out == (
        "note: t4-small is billed while the Space runs, and paid hardware does not sleep unless asked: --sleep-time "
        "SECONDS puts it to sleep after that long without a visitor\ndeployed https://huggingface.co/spaces/me/demo\n")
    assert ("request_space_hardware", "me/demo", "t4-small") in hub.calls

    assert main(["me/demo", "--base", "hf:meta-llama/Llama-2-7b-hf", "--quantize", "nf4"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "hardware t4-small (Nvidia T4, 16 GB of GPU memory): holds it", \
        "without --hardware, the Space's own"
    assert main(["me/new", "--base", "hf:meta-llama/Llama-2-7b-hf", "--quantize", "nf4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "hardware cpu-basic (2 vCPU, 16 GB of memory): holds it", \
        "a new Space's: the free CPU"


def test_the_dry_run_checks_the_hardware_asked_for(capsys):
    assert main(["me/demo", "--dry-run", "--hardware", "t4-small", "--sleep-time", "600"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "hardware t4-small (Nvidia T4, 16 GB of GPU memory): holds it", "the embedded tiny model"
    # a small base's parts in MiB (they read 0.00 GiB)
    assert out[-1].startswith("  base float16 4.1 MiB + CLIP tower 1.6 MiB + KV cache 0.8 MiB (1 x 256 tokens) + "
                              "reading the prompt 1.1 MiB + 0.50 GiB for CUDA = 0.51 of 14.90 GiB")
    assert main(["me/demo", "--dry-run", "--no-fit-check"]) == 0
    assert not any(line.startswith("hardware") for line in capsys.readouterr().out.splitlines())
    # as the deploy refuses it (the dry run said it was billed)
    assert main(["me/demo", "--dry-run", "--hardware", "bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: --hardware: 'bogus' is not a Space hardware; choose from ")


def test_paid_hardware_sleeps_when_asked_and_the_free_one_cannot_be_asked(hub, capsys):
    deploy("me/demo", [], hardware="t4-small", sleep_time=900)
    assert ("request_space_hardware", "me/demo", "t4-small", 900) in hub.calls, "asked with the hardware"
    assert "note:" not in capsys.readouterr().out
    hub.calls.clear()
    deploy("me/demo", [], sleep_time=-1)  # the Space's own hardware (t4-small now): never sleeps
    assert ("set_space_sleep_time", "me/demo", -1) in hub.calls
    assert not any(call[0] == "request_space_hardware" for call in hub.calls)
    hub.calls.clear()
    for space, hardware, sleep, message in [
            ("me/new", None, 600, r"^--sleep-time: the free cpu-basic sleeps after 48 hours without a visitor "
                                  r"whatever is asked; a sleep time needs paid hardware \(--hardware\)$"),
            ("me/demo", "t4-small", 0, r"^--sleep-time: give seconds without a visitor \(at least 1\) or -1 \(never\), "
                                       r"got 0$")]:
        with pytest.raises(ValueError, match=message):
            deploy(space, [], hardware=hardware, sleep_time=sleep)
    assert hub.calls == [], "refused before anything reached the hub"
    # a dry run does not know an existing Space's hardware (the deploy reads it): it says what it assumed
    assert main(["me/demo", "--dry-run", "--sleep-time", "60"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "(a new Space's cpu-basic; a deploy checks an existing Space's own hardware)"


def test_a_hub_base_not_read_here_is_not_met_with_advice_to_pass_a_path(monkeypatch, capsys):
    def offline(base):
        with hub_failures("base", "could not get owner/llama from the Hugging Face hub",
                          "download it yourself and pass the path"):
            raise ConnectionError("no network")

    monkeypatch.setattr("adapter.loading.hub_base_without_weights", offline)
    assert main(["me/demo", "--dry-run", "--base", "hf:owner/llama"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [
        "hf:owner/llama: not described from here (could not read it from the hub here (ConnectionError: no network))",
        "hardware cpu-basic: not checked, the base is not read from here (could not read it from the hub here "
        "(ConnectionError: no network))", "(a new Space's cpu-basic; a deploy checks an existing Space's own hardware)"
    ], "a Space refuses a path"


def test_a_base_read_only_by_downloading_it_is_not_downloaded_to_be_checked(hub, capsys):
    assert main(["me/demo", "--base", "hf:owner/Llama-2-7B-GGUF/llama-2-7b.Q8_0.gguf", "--quantize", "nf4"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "hardware cpu-basic: not checked, the base is not read from here (only a repository of safetensors weights is "
        "read without downloading them; python -m adapter.inspect hf:owner/Llama-2-7B-GGUF/llama-2-7b.Q8_0.gguf "
        "describes this one once downloaded)")
    assert not any(call[0] == "snapshot_download" for call in hub.calls), "nothing fetched but the deploy's own"


def test_zerogpu_is_refused_before_anything_reaches_the_hub(hub, capsys):
    """ZeroGPU lends its GPU to @spaces.GPU functions alone; the app, whose model stays on its device, got none
    there, found out only after the upload (an existing Space on it too: a deploy without --hardware keeps it)."""
    why = "is ZeroGPU, which lends a GPU only while a function decorated with @spaces.GPU runs"
    with pytest.raises(ValueError, match=rf"^--hardware: zero-a10g {why}, .*; choose a GPU of the Space's own"):
        deploy("me/demo", [], hardware="zero-a10g")
    assert main(["me/demo", "--dry-run", "--hardware", "zero-a10g"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --hardware: zero-a10g {why}")
    hub.hardware["me/zero"] = "zero-a10g"
    with pytest.raises(ValueError, match=r"^space: me/zero runs on zero-a10g, ZeroGPU, .*; name a GPU of its own "
                                         r"with --hardware, e.g. t4-small$"):
        deploy("me/zero", [])
    assert hub.calls == [], "refused before anything reached the hub"
    deploy("me/zero", [], hardware="t4-small", sleep_time=600)
    assert ("request_space_hardware", "me/zero", "t4-small", 600) in hub.calls, "moved off ZeroGPU by --hardware"
