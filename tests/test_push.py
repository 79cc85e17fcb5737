"""Pushing adapters to the Hugging Face hub (adapter.push, finetune --push-to-hub) against a fake hub that keeps
what is uploaded in local folders and serves it back as snapshots: what is pushed is read back by `hf:owner/name`
with the same outputs, and its card says what it is. Nothing reaches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import adapter
from adapter.config import AdapterArgs
from adapter.finetune.cli import main as finetune_main
from adapter.formats import read_adapter
from adapter.push import main, push, stage
from adapter.tiny.assets import ASSETS
from tests.conftest import V1, randomize_adapter
from tests.finetune_helpers import alpaca_records, one_thread_and_own_rng, write_json  # noqa: F401

TOKENS = torch.tensor([[1, 45, 300, 7, 99, 12, 5]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


class FakeHub:
    """huggingface_hub's HfApi (create_repo, create_branch, upload_folder, a Space's variables, secrets and
    hardware), snapshot_download and get_token, over folders: `folder(owner/name)` is a repository's files (one folder
    per branch); `variables[owner/name]` a Space's."""

    def __init__(self, root: Path, token: str | None = "hf_fake") -> None:
        self.root, self.token, self.calls, self.tokens = root, token, [], []
        self.refuse: Exception | None = None  # raised by upload_folder
        self.variables: dict[str, dict[str, str]] = {}
        self.hardware: dict[str, str] = {}  # the hardware each existing Space has asked for

    def folder(self, repo: str, branch: str | None = None) -> Path:
        return self.root / repo / (branch or "main")

    def install(self, monkeypatch) -> None:
        import huggingface_hub

        hub = self
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # should anything escape the fake, it cannot reach the network

        class HfApi:
            def __init__(self, token=None):
                hub.tokens.append(token)

            def create_repo(self, repo_id, **options):
                hub.calls.append(("create_repo", repo_id, options))

            def create_branch(self, repo_id, **options):
                hub.calls.append(("create_branch", repo_id, options))

            def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, repo_type=None,
                              allow_patterns=None):
                hub.calls.append(("upload_folder", repo_id, revision, commit_message) + (
                    (repo_type,) if repo_type else ()))
                if hub.refuse is not None:
                    raise hub.refuse
                if allow_patterns is None:
                    shutil.copytree(folder_path, hub.folder(repo_id, revision), dirs_exist_ok=True)
                for name in allow_patterns or []:  # the files named, as huggingface_hub's filter keeps them
                    (hub.folder(repo_id, revision) / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(folder_path) / name, hub.folder(repo_id, revision) / name)
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

            def get_safetensors_metadata(self, repo_id, **options):  # its repositories are fetched whole
                raise huggingface_hub.errors.NotASafetensorsRepoError(f"{repo_id}: no model.safetensors")

            def get_space_variables(self, repo_id):
                return dict(hub.variables.get(repo_id, {}))

            def delete_space_variable(self, repo_id, key):
                hub.calls.append(("delete_space_variable", repo_id, key))
                del hub.variables[repo_id][key]

            def add_space_variable(self, repo_id, key, value):
                hub.calls.append(("add_space_variable", repo_id, key, value))
                hub.variables.setdefault(repo_id, {})[key] = value

            def add_space_secret(self, repo_id, key, value):
                hub.calls.append(("add_space_secret", repo_id, key, value))

            def request_space_hardware(self, repo_id, hardware, sleep_time=None):
                hub.calls.append(("request_space_hardware", repo_id, hardware) + ((sleep_time,) if sleep_time else ()))
                hub.hardware[repo_id] = hardware

            def set_space_sleep_time(self, repo_id, sleep_time):
                hub.calls.append(("set_space_sleep_time", repo_id, sleep_time))

            def get_space_runtime(self, repo_id):  # a read: not among the calls
                if repo_id not in hub.hardware:
                    url = f"https://huggingface.co/api/spaces/{repo_id}/runtime"
                    raise huggingface_hub.errors.RepositoryNotFoundError(
                        f"404: {repo_id}", response=httpx.Response(404, request=httpx.Request("GET", url)))
                return SimpleNamespace(hardware=None, requested_hardware=hub.hardware[repo_id])

        def snapshot_download(repo_id, revision=None, **options):
            hub.calls.append(("snapshot_download", repo_id, revision))
            return str(hub.folder(repo_id, revision))

        monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: hub.token)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    fake.install(monkeypatch)
    return fake


def saved(base_folder: Path, args: AdapterArgs, folder: Path, seed: int = 3):
    model = randomize_adapter(adapter.load(base_folder, adapter=args, device="cpu"), seed=seed)
    adapter.save_adapter(model, folder)
    return model


def test_a_pushed_adapter_is_served_back_by_its_hub_name_with_the_same_outputs_and_a_card(tmp_path, base_folder,
                                                                                         hub):
    shutil.copytree(base_folder, hub.folder("meta/llama"))  # the base is named by its hub id too
    ours = saved(base_folder, V1, tmp_path / "ours")
    url = push(tmp_path / "ours", "hf:me/gated", "hf:meta/llama", private=True, branch="dev", message="first")
    assert url == "https://huggingface.co/me/gated/commit/0123abc"
    assert [call for call in hub.calls if call[0] != "snapshot_download"] == [
        ("create_repo", "me/gated", {"private": True, "exist_ok": True}),
        ("create_branch", "me/gated", {"branch": "dev", "exist_ok": True}),
        ("upload_folder", "me/gated", "dev", "first")]
    pushed = hub.folder("me/gated", "dev")
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "adapter.json", "adapter.safetensors"]
    back = adapter.load(base_folder, adapter="hf:me/gated@dev", device="cpu")
    assert back.adapter_format == "native"
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=0)

    card = (pushed / "README.md").read_text()
    assert card.startswith("---\ntags:\n- llama-adapter\n- adaption-prompt\nbase_model: meta/llama\n"
                           "pipeline_tag: text-generation\n---\n\n# me/gated\n")
    assert "| base | `hf:meta/llama`: dim 64, 4 layers, 4 heads (4 key/value heads), vocabulary 512 |" in card
    assert "| adaption prompts | 5 tokens on layers 2-3, tanh gate per head" in card
    learned = sum(t.numel() for t in ours.adapter_state_dict().values())
    assert f"| learned parameters | {learned:,} |" in card and "| v2 parts | none (v1) |" in card
    assert "python app.py --base hf:meta/llama --adapter hf:me/gated@dev\n" in card  # the branch it was pushed to
    assert "python -m adapter.inspect hf:me/gated@dev  #" in card
    for layer in (2, 3):  # the gate rows: tanh of the learned gates, over the heads
        gate = ours.layers[layer].attention.gate.detach().float().tanh()
        assert (f"| {layer} | {gate.mean():+.4f} | {gate.min():+.4f} | {gate.max():+.4f} | "
                f"{gate.abs().mean():.4f} |") in card
    assert "## Training" not in card and "library_name" not in card

    push(tmp_path / "ours", "me/public", base_folder)  # a local base: named by its folder, BASE in the commands
    assert hub.calls[-2:] == [("create_repo", "me/public", {"private": None, "exist_ok": True}),
                              ("upload_folder", "me/public", None, "Upload a LLaMA-Adapter (native format)")]
    card = (hub.folder("me/public") / "README.md").read_text()
    assert "base_model" not in card and "python app.py --base BASE --adapter hf:me/public\n" in card
    assert f"| base | `{base_folder.name}` (a local folder; any base of this shape: pass it as BASE)" in card


def test_a_lora_pushed_as_peft_is_read_by_peft_and_back(tmp_path, base_folder, hub):
    peft = pytest.importorskip("peft")
    from bench.peers import hf_llama

    shutil.copytree(base_folder, hub.folder("meta/llama"))
    lora = saved(base_folder, AdapterArgs(prompt_len=0, prompt_layers=0, lora_rank=3, lora_targets=("wq", "w2")),
                 tmp_path / "lora")
    push(tmp_path / "lora", "me/lora", "hf:meta/llama", to="peft")
    pushed = hub.folder("me/lora")
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((pushed / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "meta/llama"
    (tmp_path / "local").mkdir()
    stage(tmp_path / "lora", str(base_folder), tmp_path / "local", "me/lora", "peft")
    local = json.loads((tmp_path / "local" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert local == base_folder.name, "a local base by its folder's name, not its path on this machine"
    card = (pushed / "README.md").read_text()
    assert "- lora\n" in card and "library_name: peft\n" in card and "adaption prompts" not in card
    # the base's repository named (BASE was never defined), and the delta scale as the slider (a LoRA has no gates)
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('meta/llama'), 'me/lora')" in card
    assert "and the delta scale slider (0 = the frozen base" in card and " --delta-scale 1\n" in card
    assert "gate slider" not in card and "--gate-scale" not in card
    theirs = peft.PeftModel.from_pretrained(hf_llama(adapter.load(base_folder, device="cpu")), pushed).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(TOKENS).logits.float(), logits(lora), rtol=1e-5, atol=1e-5)
    back = adapter.load(base_folder, adapter="hf:me/lora", device="cpu")
    torch.testing.assert_close(logits(back), logits(lora), rtol=1e-6, atol=1e-6)


def test_what_cannot_be_pushed_is_named_before_anything_reaches_the_hub(tmp_path, base_folder, hub, capsys):
    saved(base_folder, V1, tmp_path / "ours")
    cases = [
        (dict(repo="me"), r"^repo: 'me' is not a hub repository id like owner/name$"),
        (dict(repo="hf:me/x@dev"), r"^repo: 'hf:me/x@dev' is not a hub repository id"),
        (dict(to="official-v1"), r"^to: 'official-v1' cannot be pushed \(a hub repository holds a folder\); "
                                 r"choose from \('native', 'peft'\)$"),
        (dict(to="peft"), r"gate_activation is tanh; PEFT uses raw gates"),  # PEFT's adaption prompt cannot hold it
        (dict(source=tmp_path / "missing"), r"missing does not exist"),
        (dict(branch="dev/v2"), r"^branch: 'dev/v2' holds a '/', which the card's hf:me/x@BRANCH cannot name"),
    ]
    for change, message in cases:
        options = dict(source=tmp_path / "ours", repo="me/x", base=base_folder) | change
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            push(**options)
    assert hub.calls == [], "nothing created or uploaded"

    hub.token = None
    with pytest.raises(ValueError, match=r"^push: no Hugging Face token to write to me/x with; set HF_TOKEN or run "
                                         r"`hf auth login`$"):
        push(tmp_path / "ours", "me/x", base_folder)
    assert hub.calls == []
    hub.token, hub.refuse = "hf_fake", PermissionError("403 Forbidden: not your namespace")
    with pytest.raises(ValueError, match=r"^push: could not push to other/x on the Hugging Face hub \(PermissionError: "
                                         r"403 Forbidden: not your namespace\); check that your token may write"):
        push(tmp_path / "ours", "other/x", base_folder)

    assert main([str(tmp_path / "ours"), "me", "--base", str(base_folder)]) == 2
    assert capsys.readouterr().err == "error: repo: 'me' is not a hub repository id like owner/name\n"


def test_the_folder_option_writes_what_would_be_pushed_with_an_image_adapters_clip_config(tmp_path, hub, capsys):
    out = tmp_path / "staged"
    assert main(["tiny-image", "me/tiny-image", "--base", "tiny", "--folder", str(out)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == (f"wrote {out}: README.md, adapter.json, adapter.safetensors, tiny-clip.json\n")
    assert hub.calls == [], "--folder pushes nothing"
    shipped, staged = read_adapter(ASSETS / "image"), read_adapter(out)
    assert json.loads((out / "adapter.json").read_text())["adapter_args"]["clip_model"] == "tiny-clip.json"
    assert Path(staged.args.clip_model) == out / "tiny-clip.json"  # read beside the adapter, wherever it is
    assert (out / "tiny-clip.json").read_bytes() == Path(shipped.args.clip_model).read_bytes()
    assert staged.tensors.keys() == shipped.tensors.keys()
    for name, tensor in shipped.tensors.items():
        assert torch.equal(staged.tensors[name], tensor), name
    card = (out / "README.md").read_text()
    assert "- image-text-to-text\n" in card and "pipeline_tag: image-text-to-text\n" in card
    assert "python app.py --base tiny --adapter hf:me/tiny-image --clip tiny\n" in card
    assert "| visual prompt | v1: reads the 128-wide tokens of a tiny-clip.json CLIP tower |" in card

    assert main(["tiny-text", "me/tiny-text", "--base", "tiny", "--folder", str(out)]) == 2
    assert capsys.readouterr().err == f"error: out: {out} already exists; name a new folder\n"
    calls = list(hub.calls)
    assert main(["tiny-text", "me/tiny-text", "--base", "tiny", "--folder", ""]) == 2  # "$STAGE" unset in a script
    assert capsys.readouterr().err == "error: --folder: empty; name the new folder to write into\n"
    assert hub.calls == calls, "nothing pushed (it pushed for real)"


def test_finetune_pushes_its_best_adapter_with_the_runs_card_and_plots(tmp_path, base_folder, hub, capsys):
    data = write_json(tmp_path / "data.json", alpaca_records(24))
    out = tmp_path / "run"
    flags = ["--base", str(base_folder), "--data", str(data), "--prompt-len", "4", "--prompt-layers", "2",
             "--epochs", "3", "--warmup-epochs", "0", "--lr", "0.05", "--batch-size", "8", "--micro-batch-size", "4",
             "--max-seq-len", "128", "--val-fraction", "0.25", "--device", "cpu", "--no-progress"]
    assert finetune_main([*flags, "--out", str(out), "--keep-best", "--push-to-hub", "me/run", "--hub-private"]) == 0
    assert "pushed https://huggingface.co/me/run/commit/0123abc" in capsys.readouterr().out
    assert hub.calls[0] == ("create_repo", "me/run", {"private": True, "exist_ok": True})
    pushed = hub.folder("me/run")
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "adapter.json", "adapter.safetensors",
                                                        "gates.png", "loss.png"]
    assert (pushed / "loss.png").read_bytes() == (out / "loss.png").read_bytes()
    best = read_adapter(out / "best")
    for name, tensor in read_adapter(pushed).tensors.items():
        assert torch.equal(tensor, best.tensors[name]), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vals = [r for r in log if r["type"] == "val"]
    step, loss = min(((r["step"], r["val_loss"]) for r in vals), key=lambda pair: pair[1])
    card = (pushed / "README.md").read_text()
    assert "The adapter of the lowest validation loss of a run of `python -m adapter.finetune`:" in card
    assert "| data | `data.json`: 18 training examples, 6 held out for validation |" in card
    assert f"| step | {step:,} of {log[0]['steps']} (3 epochs), 8 examples a step |" in card
    assert f"| validation loss at that step | {loss:.4f} |" in card and "| peak learning rate | 0.05 |" in card
    assert "![loss](loss.png)\n![gates](gates.png)\n" in card

    staged = tmp_path / "staged"  # the run's adapter names its base: --base may be left out
    assert main([str(out / "best"), "me/run", "--folder", str(staged)]) == 0, capsys.readouterr().err
    assert (staged / "README.md").read_text() == card
    assert all(torch.equal(tensor, best.tensors[name]) for name, tensor in read_adapter(staged).tensors.items())
    with pytest.raises(ValueError, match=r"^base: name the base the adapter belongs to \(--base\); only a "
                                         r"fine-tuning run's adapter says its own$"):
        push("tiny-text", "me/x", None)
    with pytest.raises(ValueError, match=rf"^source: {out} is a fine-tuning run; push one of its adapters: "
                                         rf"{out / 'adapter'} or {out / 'best'}$"):
        push(out, "me/run", base_folder)
    hub.calls.clear()
    assert finetune_main([*flags, "--out", str(tmp_path / "no"), "--push-to-hub", "me"]) == 2
    assert capsys.readouterr().err == "error: --push-to-hub: 'me' is not a hub repository id like owner/name\n"
    hub.token = None
    assert finetune_main([*flags, "--out", str(tmp_path / "no"), "--push-to-hub", "me/run"]) == 2
    assert "error: --push-to-hub: no Hugging Face token" in capsys.readouterr().err
    assert finetune_main([*flags, "--out", str(tmp_path / "no"), "--hub-private"]) == 2
    assert capsys.readouterr().err == "error: --hub-private: give --push-to-hub OWNER/NAME too\n"
    assert not (tmp_path / "no").exists() and hub.calls == [], "refused before training"

    hub.token, hub.refuse = "hf_fake", ConnectionError("offline")
    assert finetune_main([*flags, "--out", str(tmp_path / "kept"), "--max-steps", "1", "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    kept = tmp_path / "kept" / "adapter"
    assert (f"(ConnectionError: offline); check that your token may write to it (HF_TOKEN, or `hf auth login`) and "
            f"that you are online; the adapter is kept in {kept}: push it later with python -m adapter.push {kept} "
            f"me/x --base {base_folder}\n") in err
    assert (kept / "adapter.safetensors").is_file()


def test_the_card_reads_the_step_of_the_adapter_pushed_from_the_runs_log(tmp_path, base_folder):
    from adapter.model_card import model_card, training_of

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "best").mkdir()
    (run / "loss.png").write_bytes(b"png")
    records = [{"type": "start", "step": 0, "steps": 4, "lr": 0.01, "train_examples": 30, "val_examples": 3,
                "config": {"data": "/home/someone/data.jsonl", "mode": "v2", "epochs": 2, "batch_size": 16}},
               *({"type": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)),
               {"type": "val", "step": 2, "val_loss": 0.5}, {"type": "val", "step": 4, "val_loss": 0.7},
               {"type": "end", "step": 4}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best, last = training_of(run / "best" / "adapter.safetensors"), training_of(run / "adapter")
    assert (best.best, best.steps, best.last_loss, best.val_loss) == (True, 2, 0.5, 0.5)
    assert (last.best, last.steps, last.last_loss, last.val_loss) == (False, 4, 0.25, 0.7)
    assert last.total_steps == 4 and last.lr == 0.01 and last.plots == [run / "loss.png"]
    assert training_of(tmp_path / "elsewhere" / "adapter") is None and training_of(run) is not None
    unzipped = tmp_path / "trained-1"  # the app's Train-tab zip, unpacked: the log and plots beside the adapter
    unzipped.mkdir()
    shutil.copy(run / "log.jsonl", unzipped / "log.jsonl")
    shutil.copy(run / "loss.png", unzipped / "loss.png")
    zipped = training_of(unzipped / "adapter.safetensors")
    assert (zipped.best, zipped.steps, zipped.val_loss, zipped.plots) == (False, 4, 0.7, [unzipped / "loss.png"])
    assert last.ended_early is None
    records[0]["config"]["early_stop"] = 1
    records[-1:] = [{"type": "early_stop", "step": 4, "best_step": 2, "best_val_loss": 0.5}, {"type": "end", "step": 4}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    early = training_of(run / "adapter")
    assert early.ended_early == "at step 4: 1 validation in a row without a loss below 0.5000 (step 2)"
    card = model_card(adapter.load(base_folder, adapter=AdapterArgs(prompt_len=2, prompt_layers=2), device="cpu"),
                      "me/x", str(base_folder), "native", early)
    assert f"| ended early (`--early-stop`) | {early.ended_early} |" in card


def test_an_official_release_is_pushed_in_our_format_with_where_it_came_from(tmp_path, base_folder, hub, monkeypatch):
    from adapter import releases
    from tests.test_official_format import write_v1

    official = tmp_path / "llama_adapter_len3_layer2_release.pth"
    write_v1(official)
    monkeypatch.setattr(releases, "fetch", lambda name, what: official)
    push("official:v1", "me/v1", base_folder)
    pushed = hub.folder("me/v1")
    card = (pushed / "README.md").read_text()
    assert "| read from | `official:v1`, rewritten in this format |" in card
    assert "| adaption prompts | 3 tokens on layers 2-3, raw gate per head" in card
    direct = adapter.load(base_folder, adapter=official, device="cpu")
    for layer in (2, 3):  # raw gates: the card shows them as the release stores them
        gate = direct.layers[layer].attention.gate.detach().float()
        assert f"| {layer} | {gate.mean():+.4f} | {gate.min():+.4f} | {gate.max():+.4f} |" in card
    torch.testing.assert_close(logits(adapter.load(base_folder, adapter=pushed, device="cpu")), logits(direct),
                               rtol=0, atol=0)


def test_the_cards_base_model_is_the_repository_of_a_hub_base_named_with_a_revision_or_a_file():
    from adapter.model_card import model_card
    from tests.conftest import TINY, make_model

    model = make_model(TINY, V1)
    model.base_family = "LLaMA"
    for base, repo in (("hf:owner/llama@v2", "owner/llama"), ("hf:owner/gguf/q8/model.Q8_0.gguf", "owner/gguf"),
                       ("hf:owner/llama", "owner/llama")):
        card = model_card(model, "me/x", base, "native")
        assert [line for line in card.splitlines() if line.startswith("base_model")] == [f"base_model: {repo}"]
        assert f"python app.py --base {base} --adapter hf:me/x\n" in card



def test_a_card_in_peft_format_names_the_prompt_format_peft_cannot_record():
    """PEFT's files record no prompt format: the card's table said llama2 while its commands asked in Alpaca."""
    from adapter.model_card import model_card
    from tests.conftest import TINY, make_model

    model = make_model(TINY, AdapterArgs(prompt_len=2, prompt_layers=2))
    model.base_family, model.prompt_format = "LLaMA", "llama2"
    card = model_card(model, "me/x", "hf:owner/llama", "peft")
    assert "| prompt format | llama2 (not recorded in PEFT's format: the commands below name it) |" in card
    assert "python app.py --base hf:owner/llama --adapter hf:me/x --prompt-format llama2\n" in card
    assert "--adapter hf:me/x --template llama2 --prompt" in card and " --gate-scale 1\n" in card
    native = model_card(model, "me/x", "hf:owner/llama", "native")
    assert "| prompt format | llama2 |" in native and "--prompt-format" not in native  # ours records it
