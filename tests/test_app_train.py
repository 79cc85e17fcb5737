"""The app's Train tab through gradio_client: an adapter trained on the served base while the app answers, then
served beside the others (every client may name it), a client that leaves stops its run, bad settings are named,
and --no-train-tab leaves the tab out; its zip uploaded in the Model tab is served as the same adapter."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import adapter
import app
from adapter.app_config import parse_config
from adapter.engine import Engine, Settings
from tests.app_helpers import GREEDY, QUESTION, controls, demo_files, running_app  # noqa: F401  (fixture)
from tests.finetune_helpers import alpaca_records, write_jsonl
from tests.test_finetune_vision import image_data  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")  # gradio's own pandas use


@pytest.fixture(scope="module")
def served(demo_files):
    with running_app(demo_files.flags()) as serving:
        yield serving


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("records") / "records.jsonl", alpaca_records(64))


def settings(records: Path | None, epochs: float = 2, **overrides) -> list:
    """The Train tab's inputs in order: records, mode, epochs, batch, lr, prompt tokens, layers, LoRA rank, prompt
    format, seed."""
    values = dict(mode="v1", batch_size=16, lr=0.1, prompt_len=4, prompt_layers=4, lora_rank=8,
                  prompt_format="alpaca", seed=0)
    values.update(overrides)
    return [None if records is None else handle_file(str(records)), values["mode"], epochs, values["batch_size"],
            values["lr"], values["prompt_len"], values["prompt_layers"], values["lora_rank"], values["prompt_format"],
            values["seed"]]


def answer(client: Client, name: str, gate: float) -> str:
    return client.predict(QUESTION, [], *controls(gate=gate), name, api_name="/chat")[-1]["content"][0]["text"]


def test_a_trained_adapter_is_served_beside_the_others_to_every_client(served, records, base_folder):
    trainer, other = Client(served.url, verbose=False), Client(served.url, verbose=False)
    status, loss, gates, archive, menu, image_menu, start_menu = trainer.predict(*settings(records), api_name="/train")
    assert status.startswith("**Trained** (step 8 / 8 · loss ") and "served as **trained-1**" in status, status
    assert loss["columns"] == ["step", "loss", "set"] and gates["columns"] == ["step", "mean |gate|", "layer"]
    assert [row[0] for row in loss["data"]] == list(range(1, 9)) + list(range(9)), \
        "train per step; validation first (the frozen base's, where the curve starts), then 10 times a run"
    assert loss["data"][-1][2] == "validation" and gates["data"][0] == [0, 0.0, "layer 0"]
    assert len(gates["data"]) == 4 * 9 and all(row[1] > 0 for row in gates["data"] if row[0] > 1), \
        "every layer's gates leave zero after the first step (taken at the warm-up's learning rate, 0)"
    assert menu["value"] == "trained-1" and [c[0] for c in menu["choices"]] == served.engines.names
    assert "value" not in image_menu, "the image tab keeps its adapter"
    assert start_menu["choices"][0][1] == "" and [c[1] for c in start_menu["choices"][1:]] == served.engines.names
    assert served.engines.names[-1] == "trained-1"
    assert zipfile.ZipFile(archive).namelist()[:2] == ["trained-1/adapter.json", "trained-1/adapter.safetensors"]
    engine = served.engines.get("trained-1")
    assert engine.model.tok_embeddings is served.engine.model.tok_embeddings, "trained on the served base"
    expected = list(engine.chat([], QUESTION, Settings(**GREEDY)))[-1]
    assert answer(other, "trained-1", 1.0) == expected, "a client whose page never listed it may name it"
    bare = Engine(adapter.load(base_folder, device="cpu"))
    assert answer(other, "trained-1", 0.0) == list(bare.chat([], QUESTION, Settings(**GREEDY)))[-1], \
        "at gate 0 the frozen base answers"
    assert other.predict("trained-1", api_name="/model_info")["adapters_served"] == served.engines.names


def test_the_app_answers_while_it_trains_and_a_client_that_leaves_stops_its_run(served, tmp_path):
    many = write_jsonl(tmp_path / "many.jsonl", alpaca_records(640))
    trainer, other = Client(served.url, verbose=False), Client(served.url, verbose=False)
    names = served.engines.names
    job = trainer.submit(*settings(many, epochs=40, batch_size=16), api_name="/train")  # 1,600 steps
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.outputs() and job.outputs()[-1][0].startswith("step "), "the run shows its progress"
    assert answer(other, None, 1.0), "answered between training steps"
    assert not job.done(), "while the run goes on"
    job.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            status = trainer.predict(*settings(tmp_path / "many.jsonl", epochs=1), api_name="/train")[0]
            break
        except AppError as error:  # the cancelled run is still ending its step
            assert "another adapter is being trained" in str(error)
            time.sleep(0.2)
    assert status.startswith("**Trained**")
    assert served.engines.names == [*names, status.split("served as **")[1].split("**")[0]], \
        "the cancelled run was not served; the next one was"


@pytest.mark.parametrize("arguments, message", [
    (lambda records: settings(None), "data: give a records file to train on"),
    (lambda records: settings(records, epochs=1.5), "epochs: expected a whole number, got 1.5"),
    (lambda records: settings(records, lr=-1), "lr: must be a finite number above 0, got -1"),
    (lambda records: settings(records, lr=None), "lr: must be a finite number above 0, got nan"),
    # a shared check's flag by the setting's name
    (lambda records: settings(records, mode="lora", lora_rank=0), "^lora_rank: --mode lora trains LoRA alone"),
    (lambda records: [*settings(records), "", [], False, -1],
     r"early_stop: give 0 \(never\) or how many validations without a lower loss end the run, got -1"),
    (lambda records: settings(records, epochs=40, batch_size=1),
     r"epochs: 40 epoch\(s\) of \d+ steps are \d+ optimizer steps, more than the 2000 a run may take here"),
])
def test_bad_training_settings_get_a_clear_message(served, records, arguments, message):
    client = Client(served.url, verbose=False)
    names = served.engines.names
    with pytest.raises(AppError, match=message):
        client.predict(*arguments(records), api_name="/train")
    assert served.engines.names == names


def test_a_full_disk_is_said_on_the_page(served, records, monkeypatch):
    """A checkpoint that could not be written said torch.save's "unexpected pos 64 vs 0" alone (its RuntimeError on a
    full disk); now which checkpoint and the space left, the server's folders left out as in every message."""
    from adapter.finetune import checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    names = served.engines.names
    with pytest.raises(AppError, match=r"^step-\d{6}: could not be written \(\[enforce fail at inline_container"
                                       r"\.cc:672\] \. unexpected pos 64 vs 0\); [\d.]+ [GM]iB free on its disk$"):
        Client(served.url, verbose=False).predict(*settings(records), api_name="/train")
    assert served.engines.names == names, "nothing served"


def test_resume_without_a_stopped_run_says_what_it_continues(served):
    with pytest.raises(AppError, match="resume: your last run here was not stopped; Stop ends a run and keeps what "
                                       "it learnt served, and Resume then continues it"):
        Client(served.url, verbose=False).predict(api_name="/resume_training")


def test_image_records_train_an_adapter_that_sees_on_the_served_tower(served, image_data):
    """A new image adapter (vision) and the demo's image adapter trained further, on LLaVA records and the pictures
    uploaded beside them; both read the served CLIP tower and answer in the Image tab as the engine does."""
    data, folder = image_data
    pictures = [handle_file(str(p)) for p in sorted(folder.iterdir())]
    client = Client(served.url, verbose=False)
    seeing = served.engines.names[0]  # the demo's v2 image adapter
    tower = served.engines.get(seeing).model.image_encoder
    status = client.predict(*settings(data, mode="vision", batch_size=4), "", pictures, api_name="/train")[0]
    assert status.startswith("**Trained** (step 8 / 8") and "ask it about a picture in the Image tab" in status
    new = status.split("served as **")[1].split("**")[0]
    status = client.predict(*settings(data, epochs=1, batch_size=4), seeing, pictures, api_name="/train")[0]
    further = status.split("served as **")[1].split("**")[0]
    for name in (new, further):
        engine = served.engines.get(name)
        assert engine.can_see_images and engine.model.image_encoder is tower, "the served tower, shared"
        expected = list(engine.ask_image(folder / "red.png", "What colour is it?", Settings(**GREEDY)))[-1]
        answer = client.predict(handle_file(str(folder / "red.png")), "What colour is it?", *controls(), name,
                                api_name="/image")
        assert answer == expected
    assert served.engines.get(further).model.adapter_args == served.engines.get(seeing).model.adapter_args
    assert served.engines.get(new).model.adapter_args.prompt_len == 4, "a new one takes the tab's shape"
    missing = r"^data: llava\.json has 4 bad record\(s\), none read:\n  llava\.json \[index 0\]: image file red\.png"
    with pytest.raises(AppError, match=missing + r" does not exist\n"):  # the server's folders left out
        client.predict(*settings(data, mode="vision"), "", [handle_file(str(p)) for p in sorted(folder.iterdir())
                                                            if p.name != "red.png"], api_name="/train")
    with pytest.raises(AppError, match=r"\nimages: upload the pictures the records name beside the file \(none was "
                                       r"given\)$"):  # the page's way to give them, where none was
        client.predict(*settings(data, mode="vision"), "", [], api_name="/train")


def test_the_loss_plot_names_both_curves_before_any_point_arrives(served):
    """The browser's plot draws only the series named in the first data it gets: the page starts with both."""
    demo = app.build_demo(served.engines, parse_config(["--base", served.engine.base], environ={}))
    plot = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "train_loss")
    assert plot.value["data"] == [[0, None, "train"], [0, None, "validation"]], "both named, no points"


def test_a_closed_page_forgets_its_stopped_run_in_public_mode_too(served):
    """(only private adapters forgot it: kept for good)"""
    demo = app.build_demo(served.engines, parse_config(["--base", served.engine.base], environ={}))
    unload = [fn for fn in demo.fns.values() if any(event == "unload" for _, event in fn.targets)]
    assert [fn.fn.__name__ for fn in unload] == ["forget_session"]


def test_an_app_that_stops_leaves_the_cache_it_shares_with_other_apps(demo_files, tmp_path):
    """gradio's cache is one folder for every app on the machine, a file's place named by its content; its
    delete_cache removed every file an app had cached when it stopped: another app's same examples, offered files
    and uploads answered 404."""
    import httpx

    upload = tmp_path / "records.jsonl"
    upload.write_text('{"instruction": "a", "output": "b"}\n')
    with running_app(demo_files.flags()) as first:
        response = httpx.post(f"{first.url}gradio_api/upload", files=[("files", (upload.name, upload.read_bytes()))])
        (cached,) = response.json()
        examples = [path for files in first.demo.temp_file_sets for path in files if path != cached]
        assert examples, "the app cached its examples"
    assert Path(cached).read_text() == upload.read_text()
    assert all(Path(path).exists() for path in examples)


def test_the_cache_sweep_removes_only_files_older_than_its_age(tmp_path):
    """(kept, a public Space's disk grew with every upload of up to 20 MB)"""
    from types import SimpleNamespace

    from adapter.cache_sweep import sweep_by_age

    old, new = tmp_path / "old.png", tmp_path / "new.png"
    for path in (old, new):
        path.write_bytes(b"picture")
    demo = SimpleNamespace(is_running=True, blocks={}, temp_file_sets=[{str(old)}, {str(new)}])
    stop = sweep_by_age(demo, every_s=0.05, age_s=-1)  # every file is older than that
    deadline = time.monotonic() + 10
    while any(demo.temp_file_sets) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    assert not old.exists() and not new.exists() and demo.temp_file_sets == [set(), set()]
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"picture")
    other = SimpleNamespace(is_running=True, blocks={}, temp_file_sets=[{str(kept)}])  # (the first may still sweep)
    stop = sweep_by_age(other, every_s=0.05)  # four hours
    time.sleep(0.3)
    stop.set()
    assert kept.exists() and other.temp_file_sets == [{str(kept)}]


def test_the_image_tab_reads_a_picture_as_every_other_way_in_does(served, tmp_path):
    """gradio's image_mode "RGB" converted uploads itself: a transparent PNG kept its hidden colours (not white)
    and a 16-bit one was clipped near white, where the library, the CLI, the API and training read them otherwise."""
    import numpy as np
    from gradio.data_classes import ImageData
    from PIL import Image

    from adapter.images import load_image

    demo = app.build_demo(served.engines, parse_config(["--base", served.engine.base], environ={}))
    tab = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "image")
    clear = Image.new("RGBA", (8, 8), (220, 20, 30, 0))
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1)))
    assert ramp.mode == "I;16"  # what the mode argument used to force: a 16-bit picture
    for name, picture in (("clear.png", clear), ("ramp.png", ramp)):
        picture.save(tmp_path / name)
        uploaded = tab.preprocess(ImageData(path=str(tmp_path / name), orig_name=name))
        assert np.array_equal(np.asarray(load_image(uploaded)), np.asarray(load_image(tmp_path / name))), name


def test_choosing_an_adapter_runs_its_handlers_one_after_another_so_a_bad_name_gets_one_message(served):
    """Four handlers each on the menu's change gave four copies of one error for a name typed in and not served."""
    demo = app.build_demo(served.engines, parse_config(["--base", served.engine.base], environ={}))
    menu = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "adapter")
    on_change = [fn for fn in demo.fns.values() if (menu._id, "change") in fn.targets]
    assert [fn.fn.__name__ for fn in on_change] == ["gates"], "the rest follow it on success"


def test_no_train_tab_and_no_upload_leave_them_out(served):
    def endpoints(*flags: str) -> list[str]:
        config = parse_config(["--base", served.engine.base, *flags], environ={})
        return [fn.api_name for fn in app.build_demo(served.engines, config).fns.values()]

    assert {"train", "serve_adapter"} <= set(endpoints())
    assert "train" not in endpoints("--no-train-tab") and "serve_adapter" in endpoints("--no-train-tab")
    assert "serve_adapter" not in endpoints("--no-upload") and "train" in endpoints("--no-upload")
    assert parse_config(["--base", served.engine.base], environ={"ADAPTER_NO_TRAIN_TAB": "1"}).no_train_tab
    assert parse_config(["--base", served.engine.base], environ={"ADAPTER_NO_UPLOAD": "1"}).no_upload
    assert "push_adapter" in endpoints() and "push_adapter" not in endpoints("--no-push")
    assert "api_key" in endpoints("--private-adapters", "--openai-api"), "a page's key, where it reaches something"
    assert "api_key" not in endpoints("--private-adapters") and "api_key" not in endpoints("--openai-api")
    assert parse_config(["--base", served.engine.base], environ={"ADAPTER_NO_PUSH": "1"}).no_push
    bounded = app.build_demo(served.engines, parse_config(["--base", served.engine.base, "--train-max-steps", "7"],
                                                          environ={}))
    texts = [block.value for block in bounded.blocks.values() if isinstance(getattr(block, "value", None), str)]
    assert any("one run at a time, of at most 7 steps;" in text for text in texts), "the Train tab says its bound"


def test_an_adapter_trained_here_is_pushed_to_the_users_hub_repository_with_their_token(served, records, tmp_path,
                                                                                        monkeypatch):
    from adapter.formats import read_adapter
    from tests.test_push import FakeHub

    hub = FakeHub(tmp_path / "hub", token="hf_the_servers_own")
    hub.install(monkeypatch)
    client = Client(served.url, verbose=False)
    name = client.predict(*settings(records, epochs=1), api_name="/train")[4]["value"]
    with pytest.raises(AppError, match=r"^token: give a Hugging Face token that may write to me/trained "
                                       r"\(huggingface\.co/settings/tokens\); it is used for this push alone"):
        client.predict("me/trained", "  ", False, name, api_name="/push_adapter")
    with pytest.raises(AppError, match=r"^repo: 'me' is not a hub repository id like owner/name$"):
        client.predict("me", "hf_user", False, name, api_name="/push_adapter")
    assert hub.calls == [], "nothing reached the hub, and never with the server's token"
    status = client.predict(" hf:me/trained ", "hf_user", True, name, api_name="/push_adapter")
    assert status == (f"Pushed **{name}** to [me/trained](https://huggingface.co/me/trained) "
                      "([the commit](https://huggingface.co/me/trained/commit/0123abc)): served anywhere on this base "
                      "with `--adapter hf:me/trained`, on a Space of yours by `python -m adapter.space`.")
    assert hub.tokens == ["hf_user"] and hub.calls[0] == ("create_repo", "me/trained",
                                                          {"private": True, "exist_ok": True})
    pushed = hub.folder("me/trained")
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "adapter.json", "adapter.safetensors",
                                                        "gates.png", "loss.png"]
    served_tensors = served.engines.get(name).model.adapter_state_dict()
    for key, tensor in read_adapter(pushed).tensors.items():
        assert torch.equal(tensor, served_tensors[key].cpu()), key
    card = (pushed / "README.md").read_text()
    assert "The adapter after the last step of a run of `python -m adapter.finetune`:" in card
    assert "| data | `records.jsonl`: " in card and "| step | 4 of 4 (1 epoch), 16 examples a step |" in card


def test_a_trained_adapters_zip_uploaded_in_the_model_tab_is_served_as_it_was_trained_and_downloads(served, records,
                                                                                                     tmp_path):
    client = Client(served.url, verbose=False)
    archive, trained_menu = client.predict(*settings(records, epochs=1), api_name="/train")[3:5]
    status, menu, image_menu, start_menu = client.predict(handle_file(archive), api_name="/serve_adapter")
    name = menu["value"]
    assert name.startswith("uploaded-") and served.engines.names[-1] == name
    assert status == (f"Served as **{name}** (native format: 4 prompt tokens on 4 layers), chosen in the adapter "
                      "menu above; the gate slider moves between the frozen base (0) and it (1).")
    assert "value" not in image_menu and [c[1] for c in start_menu["choices"][1:]] == served.engines.names
    for gate in (1.0, 0.5):
        assert answer(client, name, gate) == answer(client, trained_menu["value"], gate), "the same adapter"
    downloaded = client.predict("native", name, api_name="/download_adapter")  # the Model tab's download
    assert zipfile.ZipFile(downloaded).namelist() == [f"{name}/adapter.json", f"{name}/adapter.safetensors"]
    with pytest.raises(AppError, match=r"^PEFT's adaption_prompt format cannot hold this adapter: its gate_activation "
                       r"is tanh; PEFT uses raw gates; our own format \(native\) holds every adapter$"):
        client.predict("peft", name, api_name="/download_adapter")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AppError, match=r"^junk\.pth: not a readable weights-only torch checkpoint"):
        client.predict(handle_file(str(tmp_path / "junk.pth")), api_name="/serve_adapter")
    with pytest.raises(AppError, match=r"^Invalid file type\. Please upload a file that is one of these formats: "
                                       r"\['\.safetensors', '\.pth', '\.bin', '\.pt', '\.zip'\]"):
        client.predict(handle_file(str(records)), api_name="/serve_adapter")
    with pytest.raises(AppError, match=r"^adapter: '/etc/passwd' is not hf:owner/name or official:NAME; files on "
                                       r"the server are not read by name"):
        client.predict(None, "/etc/passwd", api_name="/serve_adapter")  # a name instead of a file: hub or release
    assert served.engines.names[-1] == name


def test_an_adapter_trained_or_uploaded_here_is_served_no_more_when_removed_and_the_first_stays(served, records):
    client = Client(served.url, verbose=False)
    archive, trained_menu = client.predict(*settings(records, epochs=1), api_name="/train")[3:5]
    trained = trained_menu["value"]
    uploaded = client.predict(handle_file(archive), api_name="/serve_adapter")[1]["value"]
    serving = served.engines.names  # earlier tests' adapters too, the oldest given way to these
    first, sees = serving[0], served.engines.for_images
    for name in (trained, uploaded):
        status, menu, image_menu, start_menu = client.predict(name, api_name="/remove_adapter")
        assert status == f"**{name}** is served no more; its files are removed."
        assert name not in served.engines.names and [c[0] for c in menu["choices"]] == served.engines.names
        assert menu["value"] == first and image_menu["value"] == sees, "back on the first adapters"
        assert name not in [c[1] for c in start_menu["choices"]]
        for asking in (client, Client(served.url, verbose=False)):  # its menus updated, and never changed
            with pytest.raises(AppError, match=f"^adapter: '{name}' is not served here; choose from "):
                answer(asking, name, 1.0)
    assert served.engines.names == [name for name in serving if name not in (trained, uploaded)]
    other = client.predict(handle_file(archive), api_name="/serve_adapter")
    added_elsewhere = Client(served.url, verbose=False).predict(handle_file(archive), api_name="/serve_adapter")
    assert answer(client, added_elsewhere[1]["value"], 1.0), "not in the choices this client was last sent: served"
    for name in (other[1]["value"], added_elsewhere[1]["value"]):
        client.predict(name, api_name="/remove_adapter")
    with pytest.raises(AppError, match="^adapter: adapter was served from the start; only adapters trained or "
                                       "uploaded here can be removed"):  # the demo's adapter, named by its folder
        client.predict(first, api_name="/remove_adapter")
    assert served.engines.names[0] == first


def test_private_adapters_are_served_to_the_client_that_added_them_alone_until_it_leaves(demo_files, records,
                                                                                         monkeypatch):
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # a client that leaves is noticed at once
    with running_app([*demo_files.flags(), "--private-adapters"]) as served:
        everyone = served.engines.names
        owner, other = Client(served.url, verbose=False), Client(served.url, verbose=False)
        said = [str(c["props"].get("value")) for c in owner.config["components"] if c["type"] == "markdown"]
        assert sum("to you alone, until this page is closed or reloaded" in text for text in said) == 2, \
            "the Train tab and the upload say whose their adapters are"
        archive, menu, image_menu, start_menu = owner.predict(*settings(records, epochs=1), api_name="/train")[3:7]
        trained = menu["value"]
        uploaded = owner.predict(handle_file(archive), api_name="/serve_adapter")[1]["value"]
        assert served.engines.names == everyone, "served to no one else (nor to the OpenAI API)"
        assert owner.predict(api_name="/model_info")["adapters_served"] == [*everyone, trained, uploaded]
        assert [c[1] for c in start_menu["choices"][1:]] == [*everyone, trained]
        assert answer(owner, trained, 1.0) == answer(owner, uploaded, 1.0) != answer(owner, trained, 0.0)
        assert other.predict(api_name="/model_info")["adapters_served"] == everyone
        listed = ", ".join(Path(name).name for name in everyone)  # the app names no server folders
        refused = f"^adapter: '{trained}' is not served here; choose from {listed}$"
        for ask in (lambda: answer(other, trained, 1.0), lambda: other.predict(trained, api_name="/model_info"),
                    lambda: other.predict("native", trained, api_name="/download_adapter"),
                    lambda: other.predict(trained, api_name="/remove_adapter")):
            with pytest.raises(AppError, match=refused):
                ask()
        with pytest.raises(AppError, match=f"^start_from: adapter: '{trained}' is not served here"):
            other.predict(*settings(records, epochs=1), trained, api_name="/train")
        assert sorted(served.engines.private) == sorted([trained, uploaded])
        owner.close()  # as a browser tab closed: its session ends
        deadline = time.monotonic() + 30
        while served.engines.private and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not served.engines.private, "its adapters go with it"
        assert served.engines.names == everyone


def test_a_pages_api_key_reaches_its_private_adapters_on_the_openai_api_until_it_leaves(demo_files, records,
                                                                                       monkeypatch):
    import re

    import httpx

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")
    with running_app([*demo_files.flags(), "--private-adapters", "--openai-api"]) as served:
        everyone = served.engines.names
        owner, other = Client(served.url, verbose=False), Client(served.url, verbose=False)
        trained = owner.predict(*settings(records, epochs=1), api_name="/train")[4]["value"]
        shown = owner.predict(api_name="/api_key")
        key = re.search(r"`(sk-session-[\w-]+)`", shown).group(1)
        assert f"`base_url`: `{served.url.rstrip('/')}/v1`" in shown and owner.predict(api_name="/api_key") == shown
        others_key = re.search(r"`(sk-session-[\w-]+)`", other.predict(api_name="/api_key")).group(1)
        assert others_key != key

        def ask(key: str | None, path: str = "v1/chat/completions", **body):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(f"{served.url}{path}", json=body, headers=headers, timeout=120)

        def listed(key: str | None) -> list[str]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return [m["id"] for m in httpx.get(f"{served.url}v1/models", headers=headers, timeout=60).json()["data"]]

        assert listed(key) == [*everyone, trained] and listed(None) == listed(others_key) == listed("sk-x") == everyone
        question = {"model": trained, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                    "max_tokens": 8}
        answered = ask(key, **question)
        assert answered.status_code == 200, answered.text
        engine = served.engines.private[trained][1]
        expected = list(engine.chat([], QUESTION, Settings(temperature=0.0, max_new_tokens=8)))[-1]
        assert answered.json()["choices"][0]["message"]["content"] == expected
        assert ask(key, "tokenize", model=trained, prompt=QUESTION).json()["tokens"] == \
            engine.model.tokenizer.encode(QUESTION, bos=True, eos=False)
        for refused_key in (None, others_key):
            refused = ask(refused_key, **question)
            assert refused.status_code == 404 and refused.json()["error"]["message"].startswith(
                f"model: no adapter '{trained}' is served"), refused.text
        owner.close()  # its page closed: its adapters go, and its key reaches nothing more
        deadline = time.monotonic() + 30
        while served.engines.private and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listed(key) == everyone
        served.engines.add("late", engine, owner.session_hash)  # were the session to add one now: out of reach
        assert listed(key) == everyone and "late" in served.engines.seen_by(owner.session_hash).names
        assert served.engines.api_key(owner.session_hash) != key, "a new key, were it asked for again"
        served.engines.remove("late")


def test_private_adapters_need_a_way_to_add_adapters(served):
    base = ["--base", served.engine.base]
    assert parse_config(base, environ={"ADAPTER_PRIVATE_ADAPTERS": "1"}).private_adapters
    with pytest.raises(ValueError, match="^--private-adapters: nothing to keep private; --no-train-tab and "
                                         "--no-upload leave out both ways of adding adapters$"):
        parse_config([*base, "--private-adapters", "--no-train-tab", "--no-upload"], environ={})
