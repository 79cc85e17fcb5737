"""Meta folders (one or several shards), our native adapter format, and the errors bad files get."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapter
from adapter.config import AdapterArgs
from adapter.formats import native
from adapter.hub import SKIPPED, resolve
from adapter.layout import column_major_wide
from adapter.model import Transformer
from tests.conftest import TINY, V2, randomize_adapter

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12]])


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def test_meta_folder_loads_the_weights_it_holds(base_folder):
    model = adapter.load(base_folder, device="cpu")
    state = torch.load(base_folder / "consolidated.00.pth", weights_only=True)
    direct = Transformer(model.args).eval()
    direct.load_state_dict(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    column_major_wide(direct)  # what adapter.load does on a CPU (adapter.layout): the same products then
    assert torch.equal(logits(model), logits(direct))
    assert not model.training and model.tokenizer.n_words == TINY.vocab_size
    assert model.count_parameters(trainable_only=True) == 0


def test_model_parallel_shards_are_merged(base_folder, sharded_base_folder):
    one = adapter.load(base_folder, device="cpu")
    two = adapter.load(sharded_base_folder, device="cpu")
    assert torch.equal(logits(one), logits(two))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(32, 32)}),
     r"consolidated.01.pth: layers.0.attention.wq.weight is \(32, 32\) torch.float32, which does not go with "
     r"consolidated.00.pth's \(32, 64\) torch.float32"),  # torch.cat's "Sizes of tensors must match"
    (lambda s: s.update({"layers.0.attention.wq.weight": s["layers.0.attention.wq.weight"].to(torch.int32)}),
     r"consolidated.01.pth: layers.0.attention.wq.weight is \(32, 64\) torch.int32"),  # was cast to float
    (lambda s: s.update({"norm.weight": s["norm.weight"] + 1}),
     r"consolidated.01.pth: norm.weight differs from consolidated.00.pth's, which every shard holds alike"),
    (lambda s: s.update({"norm.weight": [1.0] * 64}),
     r"consolidated.01.pth: entries that are not named tensors: \['norm.weight'\]"),  # an AttributeError
])
def test_shards_that_do_not_go_together_are_refused_by_name(sharded_base_folder, tmp_path, change, message):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_base_folder, folder)
    state = torch.load(folder / "consolidated.01.pth", weights_only=True)
    change(state)
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(ValueError, match=message):
        adapter.load(folder, device="cpu")


def test_dtype_argument(base_folder):
    model = adapter.load(base_folder, device="cpu", dtype="bfloat16")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    full = logits(adapter.load(base_folder, device="cpu"))
    assert float((logits(model) - full).norm() / full.norm()) < 0.05
    with pytest.raises(ValueError, match="dtype"):
        adapter.load(base_folder, device="cpu", dtype="int3")


@pytest.mark.parametrize("device, message", [
    ("meta", "device: meta cannot hold a model here; use cpu, cuda, mps or xpu"),
    ("mps", "device: mps asked for, but no Apple MPS device is available"),
    ("xpu", "device: xpu asked for, but no Intel XPU device is available"),
    ("gpu", "device: 'gpu' is not a device name"),
])
def test_a_device_that_cannot_hold_the_model_is_named_before_loading(base_folder, device, message):
    """(torch's own tracebacks came from deep inside the loading before)"""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        adapter.load(base_folder, device=device)


@pytest.mark.parametrize("arguments, message", [
    (dict(base=123), "base: expected a path or a name (tiny, hf:owner/name), got 123"),
    (dict(base=None), "base: expected a path or a name (tiny, hf:owner/name), got None"),
    (dict(adapter=1.5), "adapter: expected a path, a name (tiny-text, hf:owner/name, official:NAME), AdapterArgs or a "
                        "LoadedAdapter, got 1.5"),
    (dict(adapter="tiny-image", clip=5), "clip: expected a path or an open_clip pretrained tag, got 5"),
    (dict(adapter="tiny-image", clip_model=5), "clip_model: expected an open_clip model name or a model-config .json "
                                               "path, got 5"),
])
def test_arguments_of_the_wrong_kind_are_named(arguments, message):
    """(pathlib's TypeError "expected str, bytes or os.PathLike object, not int", or an AttributeError from the CLIP
    tower's loading, before)"""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        adapter.load(**{"base": "tiny", **arguments}, device="cpu")
    if "base" not in arguments:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            adapter.load_sharing(adapter.load("tiny", device="cpu"), **{"adapter": None, **arguments})


def test_a_tilde_no_shell_expanded_is_said_so(tmp_path, capsys):
    """"~/llama" quoted, or set in a Space's variables or a .env file, reaches Python as is: a folder named "~"."""
    from adapter.app_config import parse_config
    from adapter.generate import main as generate_main

    hint = "; a leading ~ is your home folder only where a shell expands it (unquoted): give the whole path"
    with pytest.raises(FileNotFoundError, match=f"^base: ~/llama does not exist{re.escape(hint)}$"):
        adapter.load("~/llama", device="cpu")
    with pytest.raises(FileNotFoundError, match=f"^adapter: ~/runs/a does not exist{re.escape(hint)}$"):
        adapter.load("tiny", adapter="~/runs/a", device="cpu")
    with pytest.raises(FileNotFoundError, match=f"^--base: ~/llama does not exist{re.escape(hint)}$"):
        parse_config([], {"ADAPTER_BASE": "~/llama"})
    assert generate_main(["--base", "tiny", "--prompts-file", "~/questions.jsonl", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.endswith(f"~/questions.jsonl does not exist{hint}\n")
    with pytest.raises(FileNotFoundError, match=r"^base: /no/llama does not exist$"):  # no hint where none fits
        adapter.load("/no/llama", device="cpu")


@pytest.mark.parametrize("quantize, shown", [(None, "float32"), ("nf4", "nf4")])
def test_a_load_in_a_terminal_shows_its_progress_and_elsewhere_nothing(monkeypatch, capsys, quantize, shown):
    """A 7B base loads for minutes: the app and the command lines said nothing until it was done. In a terminal, a
    load of more than BAR_DELAY_S shows a bar of the base's blocks, gone once loaded; a log file gets none."""
    import sys

    import adapter.progress

    adapter.load("tiny", device="cpu", quantize=quantize)
    assert capsys.readouterr().err == "", "not a terminal: nothing"
    monkeypatch.setattr(adapter.progress, "BAR_DELAY_S", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    adapter.load("tiny", device="cpu", quantize=quantize)
    bar = capsys.readouterr().err
    blocks = 3 + 4  # the embeddings, the final norm, the head and 4 layers
    assert f"loading the base ({shown}):   0%|          | 0/{blocks} " in bar and bar.endswith("\r"), repr(bar)
    monkeypatch.setenv("RANK", "1")  # a torchrun job's other processes: the first one's bar alone
    adapter.load("tiny", device="cpu", quantize=quantize)
    assert capsys.readouterr().err == ""


def test_writing_a_base_in_a_terminal_shows_its_progress(monkeypatch, capsys, tmp_path):
    """quantize_base and merge write a 7B base for minutes: the same bar, over its tensors."""
    import sys

    import adapter.progress
    from adapter.quantize_base import quantize_base

    monkeypatch.setattr(adapter.progress, "BAR_DELAY_S", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    quantize_base("tiny", tmp_path / "nf4", "nf4")
    tensors = 3 + 4 * 9  # the embeddings, the final norm, the head; 7 linears and 2 norms a layer
    assert f"writing the base:   0%|          | 0/{tensors} " in capsys.readouterr().err


def test_a_clip_model_config_may_be_given_as_a_path():
    from adapter.app_config import TINY_FOLDER

    config = TINY_FOLDER / "clip" / "tiny-clip.json"
    named = adapter.load("tiny", adapter="tiny-image", clip="tiny", clip_model=str(config), device="cpu")
    given = adapter.load("tiny", adapter="tiny-image", clip="tiny", clip_model=config, device="cpu")
    tokens = torch.tensor([named.tokenizer.encode("What colour is the star?")])
    picture = TINY_FOLDER / "examples" / "00.png"
    assert given.generate("How many shapes?", image=picture, temperature=0.0) == \
        named.generate("How many shapes?", image=picture, temperature=0.0)
    assert torch.equal(given(tokens), named(tokens))


@pytest.fixture()
def trained(base_folder):
    model = adapter.load(base_folder, adapter=V2, device="cpu")
    assert torch.equal(logits(model), logits(adapter.load(base_folder, device="cpu"))), "fresh adapter = base"
    return randomize_adapter(model)


def test_native_adapter_round_trip(base_folder, trained, tmp_path):
    path = adapter.save_adapter(trained, tmp_path / "run")
    assert path.name == "adapter.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.json", "adapter.safetensors"], "no temp file"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, "the mode of any new file, not mkstemp's 0o600"
    config = json.loads((path.parent / "adapter.json").read_text())
    assert config["adapter_args"] == V2.to_dict() and config["base_shape"]["dim"] == TINY.dim
    assert config["format"] == "llama-adapter" and config["format_version"] == "1"
    loaded = adapter.load(base_folder, adapter=tmp_path / "run", device="cpu")
    assert loaded.adapter_args == V2
    assert torch.equal(logits(loaded), logits(trained))
    loaded.set_gate_scale(0.4)
    with torch.no_grad():
        assert torch.equal(logits(loaded), trained(TOKENS, gate_scale=0.4))


def test_failed_save_keeps_the_old_file(trained, tmp_path, monkeypatch):
    path = adapter.save_adapter(trained, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        adapter.save_adapter(trained, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.parametrize("call, message", [
    (lambda m, out: adapter.save_adapter(None, out),
     "model: expected a loaded model (adapter.load(...)), got NoneType"),
    (lambda m, out: adapter.save_adapter(m, None), "path: expected a file or folder path, got NoneType"),
    (lambda m, out: adapter.save_adapter(m, out, "note"), "metadata: expected a dict of text fields, got str"),
    (lambda m, out: adapter.save_adapter(m, out, {"step": 5}), "metadata: 'step' must be text naming text"),
    # (replaced the header's own field: the file written no longer loaded)
    (lambda m, out: adapter.save_adapter(m, out, {"format": "x"}), "metadata: 'format' is written by save_adapter"),
])
def test_bad_save_arguments_are_named_and_nothing_is_written(trained, tmp_path, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(trained, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def rewrite(path, change):
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def test_bad_adapter_files_get_clear_errors(base_folder, trained, tmp_path):
    good = adapter.save_adapter(trained, tmp_path / "good.safetensors")
    key = "layers.3.attention.gate"

    cases = {
        "missing": (lambda t, m: t.pop(key), f"missing adapter tensor.*{key}"),
        "unexpected": (lambda t, m: t.update(extra=torch.zeros(2)), "unexpected tensor.*extra"),
        "shape": (lambda t, m: t.update({key: torch.zeros(1, 3, 1, 1)}), rf"{key} has shape \(1, 3, 1, 1\)"),
        # loaded, and answered nonsense at every gate but 0
        "nan": (lambda t, m: t["adapter_query.weight"].view(-1)[:3].fill_(float("nan")),
                r"adapter_query.weight holds 3 NaN or infinite value\(s\) of 960: the adapter is broken"),
        "inf": (lambda t, m: t[key].fill_(float("inf")), rf"{key} holds 4 NaN or infinite value\(s\) of 4"),
        "config": (lambda t, m: m.update(adapter_args=json.dumps({"prompt_len": 2, "colour": 1})),
                   "bad adapter metadata.*colour"),
        "base": (lambda t, m: m.update(base_shape=json.dumps({"dim": 4096})), "different base: dim=4096"),
        "nested": (lambda t, m: m.update(adapter_args="[" * 100_000 + "]" * 100_000),  # (a RecursionError)
                   r"bad adapter metadata \(nested too deeply\)"),
        "no_args": (lambda t, m: m.pop("adapter_args"), r"bad adapter metadata \(no adapter_args\)"),
        "base_list": (lambda t, m: m.update(base_shape="[64, 4]"),
                      r"bad adapter metadata \(base_shape must be an object of whole numbers, got \[64, 4\]\)"),
        "format": (lambda t, m: m.update(format="other"), "not a llama-adapter file"),
        # settings declaring far more than the file holds are refused before their tensors are made (this one
        # asked for 768 GB)
        "declared": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]),
                                                                     "prompt_len": 10 ** 9})),
                     r"adapter_query.weight has shape \(\d+, 64\), expected \(\d+, 64\) by its settings "
                     r"\(prompt_len 1000000000, prompt_layers 3, lora_rank 4\)"),
        "rank_type": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]),
                                                                      "lora_rank": True})),
                      "lora_rank: must be a non-negative integer, got True"),
        "clip_model_type": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]),
                                                                            "clip_model": None})),
                            "clip_model: must be an open_clip model name or config path, got None"),
        "flag_type": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]), "bias": []})),
                      r"bias: must be true or false, got \[\]"),
        # a number was "'int' object is not iterable", a text read letter by letter ("unknown linear(s) ['q', 'w']")
        "targets_number": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]),
                                                                           "lora_targets": 5})),
                           r"lora_targets: must be a list of linears \(wq, wk, wv, wo, w1, w2, w3\), got 5"),
        "targets_text": (lambda t, m: m.update(adapter_args=json.dumps({**json.loads(m["adapter_args"]),
                                                                         "bias_targets": "wq"})),
                         r"bias_targets: must be a list of linears \(wq, wk, wv, wo, w1, w2, w3\), got 'wq'"),
    }
    for name, (change, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        shutil.copy(good, path)
        rewrite(path, change)
        with pytest.raises(ValueError, match=message) as error:
            adapter.load(base_folder, adapter=path, device="cpu")
        assert str(path) in str(error.value), name
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        adapter.load(base_folder, adapter=junk, device="cpu")
    with pytest.raises(FileNotFoundError, match="adapter: .*nothing"):
        adapter.load(base_folder, adapter=tmp_path / "nothing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter: .*empty holds no adapter; expected our adapter.safetensors"):
        adapter.load(base_folder, adapter=tmp_path / "empty", device="cpu")
    (tmp_path / "odd" / "adapter.safetensors").mkdir(parents=True)  # was said not to exist
    with pytest.raises(FileNotFoundError, match="adapter: .*odd/adapter.safetensors is a folder, not a file"):
        adapter.load(base_folder, adapter=tmp_path / "odd", device="cpu")
    too_deep = AdapterArgs(prompt_len=2, prompt_layers=TINY.n_layers + 1)
    with pytest.raises(ValueError, match=rf"lora_rank: {TINY.dim + 1} is more than the model's dim={TINY.dim} "):
        adapter.load(base_folder, adapter=AdapterArgs(prompt_len=2, prompt_layers=2, lora_rank=TINY.dim + 1),
                     device="cpu")
    with pytest.raises(ValueError, match="prompt_layers: 5 is more than the model's n_layers=4"):
        adapter.load(base_folder, adapter=too_deep, device="cpu")


def test_bad_base_folders_get_clear_errors(base_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="base: .*missing"):
        adapter.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a LLaMA folder: expected a Meta folder \(params.json, "
                                         r"consolidated.\*.pth\), a Mistral one"):
        adapter.load(tmp_path / "empty")

    def broken_copy(name):
        folder = tmp_path / name
        shutil.copytree(base_folder, folder)
        return folder

    folder = broken_copy("no_tokenizer")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer: .*tokenizer.model does not exist"):
        adapter.load(folder, device="cpu")
    (folder / "tokenizer.model").mkdir()  # was said not to exist
    with pytest.raises(FileNotFoundError, match="tokenizer: .*tokenizer.model is a folder, not a file"):
        adapter.load(folder, device="cpu")

    folder = broken_copy("bad_params")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 5, "n_layers": 4}))
    with pytest.raises(ValueError, match="params.json: dim: 64 is not divisible by n_heads=5"):
        adapter.load(folder, device="cpu")

    folder = broken_copy("missing_tensor")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    del state["layers.2.feed_forward.w2.weight"]
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match="missing tensor layers.2.feed_forward.w2.weight"):
        adapter.load(folder, device="cpu")

    folder = broken_copy("wrong_shape")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = torch.ones(3)
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"norm.weight has shape \(3,\), expected \(64,\)"):
        adapter.load(folder, device="cpu")

    folder = broken_copy("integer_tensor")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = torch.ones(64, dtype=torch.int32)
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"norm.weight holds int32 values, not floating-point weights"):
        adapter.load(folder, device="cpu")

    folder = broken_copy("no_norm_eps")
    (folder / "params.json").write_text(json.dumps({**json.loads((base_folder / "params.json").read_text()),
                                                    "norm_eps": None}))
    with pytest.raises(ValueError, match="params.json: norm_eps: must be a positive number, got None"):
        adapter.load(folder, device="cpu")
    # left out, it is Meta's reference default (1e-5), as Meta's code reads the file; was LLaMA 1's 1e-6
    (folder / "params.json").write_text(json.dumps({key: value for key, value in json.loads(
        (base_folder / "params.json").read_text()).items() if key != "norm_eps"}))
    assert adapter.load(folder, device="cpu").args.norm_eps == 1e-5

    # a context of 2**40 built a rotary table of terabytes (a raw allocator error); a bad multiplier failed in torch
    for change, message in (({"max_seq_len": 2**40}, "max_seq_len: 1,099,511,627,776 positions is more than the "
                                                     "1,048,576 a model is built for here"),
                            ({"ffn_dim_multiplier": -1.0}, "ffn_dim_multiplier: must be a positive number or None, "
                                                           "got -1.0"),
                            # built layer by layer before the weights were read: 10**12 layers never ended
                            ({"n_layers": 10**12}, "n_layers: 1,000,000,000,000 layers is more than the 1,024 a model "
                                                   "is built with here"),
                            # a head width that is not a number failed multiplying it (a TypeError)
                            ({"head_dim": {"a": 1}}, "head_size: must be a positive integer, got {'a': 1}"),
                            # JSON's true is 1 to Python: a Linear of width True failed in torch
                            ({"hidden_dim": True}, "ffn_dim: must be a positive integer, got True")):
        folder = broken_copy(next(iter(change)))
        (folder / "params.json").write_text(json.dumps({**json.loads((base_folder / "params.json").read_text()),
                                                        **change}))
        with pytest.raises(ValueError, match=f"params.json: {re.escape(message)}"):
            adapter.load(folder, device="cpu")
    assert adapter.load(tmp_path / "max_seq_len", device="cpu", max_seq_len=64).args.max_seq_len == 64

    folder = broken_copy("extra_tensor")
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["layers.9.attention.wq.weight"] = torch.ones(64, 64)
    torch.save(state, folder / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['layers.9.attention.wq.weight'\]"):
        adapter.load(folder, device="cpu")


@pytest.mark.parametrize("broken, message", [
    ("missing_tensor", "missing tensor layers.2.feed_forward.w2.weight"),
    ("wrong_shape", r"layers.1.attention.wv.weight has shape \(64, 3\), expected \(64, 64\)"),
])
def test_quantize_base_and_merge_refuse_a_base_loading_refuses(base_folder, tmp_path, broken, message):
    """They wrote folders from it that no one could load (or failed from deep inside torch)."""
    from adapter.merge import merge
    from adapter.quantize_base import quantize_base

    folder = tmp_path / broken
    shutil.copytree(base_folder, folder)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    if broken == "missing_tensor":
        del state["layers.2.feed_forward.w2.weight"]
    else:
        state["layers.1.attention.wv.weight"] = torch.ones(64, 3)
    torch.save(state, folder / "consolidated.00.pth")
    trained = randomize_adapter(adapter.load(base_folder, adapter=V2, device="cpu"))
    adapter.save_adapter(trained, tmp_path / "v2")
    with pytest.raises(ValueError, match=message):
        adapter.load(folder, device="cpu")
    with pytest.raises(ValueError, match=message):
        quantize_base(folder, tmp_path / "nf4", "nf4", device="cpu")
    with pytest.raises(ValueError, match=message):
        merge(folder, tmp_path / "v2", tmp_path / "merged")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([broken, "v2"]), "nothing half-written"


class Payload:
    """Stands for pickled code: weights-only loading must refuse it."""


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "older format"])
def test_pickled_code_is_never_loaded(base_folder, tmp_path, zipped):
    folder = tmp_path / "evil"
    shutil.copytree(base_folder, folder)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["payload"] = Payload()
    torch.save(state, folder / "consolidated.00.pth", _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match="consolidated.00.pth: not a readable weights-only torch checkpoint "
                                         r"\(it holds what weights-only loading refuses: Unsupported global: GLOBAL "
                                         r"tests\.test_loading\.Payload was not an allowed global by default\)$"):
        adapter.load(folder, device="cpu")


def test_a_file_that_is_no_torch_checkpoint_is_named_with_its_first_bytes(base_folder, tmp_path):
    (tmp_path / "records.pth").write_text('{"instruction": "hi", "output": "x"}\n')
    with pytest.raises(ValueError) as refused:
        adapter.load(base_folder, adapter=tmp_path / "records.pth", device="cpu")
    assert str(refused.value) == (f"{tmp_path / 'records.pth'}: not a readable weights-only torch checkpoint "
                                  "(neither torch's zip format nor its older one; the file starts with "
                                  "b'{\"instruction\": ')")


def test_hub_download_skips_metas_and_mistrals_second_copies(base_folder, monkeypatch):
    import fnmatch

    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, **options):
        asked.update(options, repo_id=repo_id)
        return str(base_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = adapter.load("hf:meta-llama/Llama-3.2-1B", device="cpu")
    assert asked == {"repo_id": "meta-llama/Llama-3.2-1B", "ignore_patterns": SKIPPED}
    skipped = ["original/consolidated.00.pth", "consolidated.safetensors", "consolidated-00001-of-00002.safetensors"]
    read = ["model.safetensors", "model-00001-of-00003.safetensors", "consolidated.00.pth", "params.json",
            "tokenizer.model", "config.json"]  # what the Meta and HF readers open
    assert all(any(fnmatch.fnmatch(name, p) for p in SKIPPED) for name in skipped)
    assert not any(fnmatch.fnmatch(name, p) for name in read for p in SKIPPED)
    assert model.base_path == "hf:meta-llama/Llama-3.2-1B" and model.args.dim == 64


def test_a_hub_revision_is_fetched_at_that_branch_tag_or_commit(base_folder, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **options: asked.append((repo_id, options)) or str(base_folder))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **options: asked.append(options) or "x.gguf")
    adapter.load("hf:owner/Llama-2-7B-GPTQ@gptq-4bit-32g-actorder_True", device="cpu")
    assert asked == [("owner/Llama-2-7B-GPTQ", {"ignore_patterns": SKIPPED, "revision": "gptq-4bit-32g-actorder_True"})]
    assert resolve("hf:owner/Llama-GGUF@0123abc/q4/model.Q4_K_M.gguf", "base") == Path("x.gguf")
    assert asked[-1] == {"repo_id": "owner/Llama-GGUF", "filename": "q4/model.Q4_K_M.gguf", "revision": "0123abc"}
    with pytest.raises(ValueError, match=r"base: 'hf:owner/name/weights.bin' is not a hub repository id like "
                                         r"hf:owner/name\[@revision\]"):
        resolve("hf:owner/name/weights.bin", "base")


def test_a_hub_failure_is_one_line():
    """huggingface_hub's LocalEntryNotFoundError runs over three lines, which the commands printed as their
    one-line error."""
    from adapter.hub import hub_failures

    with pytest.raises(ValueError) as error:
        with hub_failures("base", "could not get o/m", "download it yourself"):
            raise OSError("Got: ConnectError\nAn error happened while trying to locate the files.\n  Check it.")
    assert str(error.value) == ("base: could not get o/m (OSError: Got: ConnectError An error happened while trying "
                                "to locate the files. Check it.); download it yourself")


def test_hub_ids_need_the_explicit_prefix_and_fail_clearly_offline(base_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: this test must never reach the network
    with pytest.raises(FileNotFoundError, match="base: meta-llama/none does not exist"):
        adapter.load("meta-llama/none", device="cpu")
    with pytest.raises(ValueError, match="base: could not get someone/missing-model from the Hugging Face hub"):
        adapter.load("hf:someone/missing-model", device="cpu")
    with pytest.raises(ValueError, match="adapter: 'hf:not a repo' is not a hub repository id"):
        adapter.load(base_folder, adapter="hf:not a repo", device="cpu")
