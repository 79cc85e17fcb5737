"""The app through gradio_client, as a program would use it: chat, image questions, compare, gates, model info,
gate 0 = the frozen base, concurrent users with different gates, stop, and bad inputs."""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import adapter
from adapter.app_handlers import Handlers, to_pairs
from adapter.gate_layers import gate_scale_rows
from adapter.prompts import STOP_STRINGS
from tests.app_helpers import GREEDY, MAX_NEW_TOKENS, QUESTION, controls, demo_files, served  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")  # gradio's own pandas use

RED, BLUE = Image.new("RGB", (40, 30), (220, 20, 30)), Image.new("RGB", (40, 30), (20, 40, 220))


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served.url, verbose=False)


@pytest.fixture
def decode_steps(served, monkeypatch) -> list[int]:
    """One entry per forward step the server's model runs during the test."""
    steps, original = [], served.engine.model.step
    monkeypatch.setattr(served.engine.model, "step", lambda *a, **k: steps.append(1) or original(*a, **k))
    return steps


def wait_until_free(lock, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while lock.locked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lock.locked(), "the generator was closed and gave the model back"


@pytest.fixture(scope="module")
def base_model(base_folder):
    """The frozen base alone, to compare gate-0 answers with."""
    return adapter.load(base_folder, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    RED.save(folder / "red.png")
    BLUE.save(folder / "blue.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "broken.jsonl").write_text('{"instruction": "Name a colour."}\n')
    return folder


def base_answer(model, prompt: str) -> str:
    return model.generate(prompt, temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"], stop=STOP_STRINGS)


def chat(client: Client, message: str, history=(), **scales) -> str:
    history = client.predict(message, list(history), *controls(**scales), api_name="/chat")
    return to_pairs(history)[-1][1]


def ask(client: Client, path, question: str = "What colour is it?", **scales) -> str:
    return client.predict(handle_file(str(path)), question, *controls(**scales), api_name="/image")


def test_chat_streams_and_keeps_the_conversation(client):
    job = client.submit(QUESTION, [], *controls(), api_name="/chat")
    partial = [to_pairs(history)[-1][1] for history in job]
    final = job.result()
    assert len(set(partial)) > 2, "the answer arrives token by token"
    assert all(final_piece.startswith(p) for p in partial for final_piece in [to_pairs(final)[-1][1]])
    follow_up = client.predict("And another one?", final, *controls(), api_name="/chat")
    pairs = to_pairs(follow_up)
    assert [user for user, _ in pairs] == [QUESTION, "And another one?"] and pairs[1][1]


def test_a_conversation_is_saved_as_a_training_record_that_fine_tuning_reads(client, served):
    from adapter.finetune.records import read_records
    from adapter.prompts import format_named

    first = client.predict(QUESTION, [], *controls(), api_name="/chat")
    history = client.predict("And another one?", first, *controls(), api_name="/chat")
    pairs = to_pairs(history)
    unanswered = [*history, {"role": "user", "content": [{"type": "text", "text": "A question being answered"}]}]
    path = client.predict(unanswered, "Answer briefly.", api_name="/save_conversation")
    record = json.loads(Path(path).read_text())
    assert record == {"messages": [{"role": "system", "content": "Answer briefly."},
                                   *({"role": role, "content": text} for user, answer in pairs
                                     for role, text in (("user", user), ("assistant", answer)))]}
    [examples] = read_records(path, None, format_named("llama2", "--prompt-format"))
    assert [e.response.strip() for e in examples] == [answer.strip() for _, answer in pairs], "one per answer"
    assert "Answer briefly." in examples[0].prompt and pairs[0][0] in examples[1].prompt
    assert "system" not in json.loads(Path(client.predict(history, "  ", api_name="/save_conversation"))
                                      .read_text())["messages"][0]["role"]
    with pytest.raises(AppError, match="conversation: no answered question to save yet; ask something first"):
        client.predict([], None, api_name="/save_conversation")
    with pytest.raises(AppError, match="system: 100,000 characters is too long"):  # as /chat refuses it (was saved)
        client.predict(history, "x" * 100_000, api_name="/save_conversation")


def test_an_image_conversation_is_not_saved_without_its_picture_or_an_answer():
    import gradio as gr

    from adapter.app_handlers import Handlers

    with pytest.raises(gr.Error, match="image: upload the picture the conversation is about first"):
        Handlers.save_image_conversation(None, "What is it?", "a star", [])
    with pytest.raises(gr.Error, match="conversation: no answered question to save yet"):
        Handlers.save_image_conversation(RED, "What is it?", "", [])
    with pytest.raises(gr.Error, match="system: expected text, got int"):
        Handlers.save_image_conversation(RED, "What is it?", "a star", [], 5)


def test_gate_zero_answers_are_the_frozen_base(client, base_model, images):
    assert chat(client, QUESTION, gate=0.0, delta=0.0) == base_answer(base_model, adapter.chat((), QUESTION))
    at_gate_zero = ask(client, images / "red.png", gate=0.0, delta=0.0)
    assert at_gate_zero == base_answer(base_model, adapter.image_question("What colour is it?"))
    assert ask(client, images / "blue.png", gate=0.0, delta=0.0) == at_gate_zero, "gate 0 is image-blind"
    assert ask(client, images / "blue.png", gate=2.0) != ask(client, images / "red.png", gate=2.0)


def test_compare_answers_base_and_adapter_side_by_side(client, base_model):
    base, adapted = client.predict(QUESTION, *controls(gate=2.0), api_name="/compare")
    assert base == base_answer(base_model, adapter.alpaca(QUESTION))
    assert adapted != base
    assert adapted == chat(client, QUESTION, gate=2.0), "one batch of two rows answers as two single requests"


def test_the_controls_are_named_on_the_api_and_taken_as_keywords(client):
    """gradio named them param_2, param_3, ... (the handlers take them as *controls): a client passed all of them,
    in order, to set one."""
    named = {name: [p["parameter_name"] for p in endpoint["parameters"]]
             for name, endpoint in client.view_api(return_format="dict", print_info=False)["named_endpoints"].items()}
    settings = ["gate_scale", "delta_scale", "temperature", "top_p", "max_new_tokens", "seed", "adapter", "system"]
    assert named["/chat"] == ["message", "history", *settings, "layers"]
    assert named["/sweep"] == named["/next_tokens"] == ["question", "scales", *settings, "layers"]
    assert named["/compare"] == named["/layer_sweep"] == named["/every_adapter"] == ["question", *settings, "layers"]
    assert named["/image"] == named["/image_layer_sweep"] == ["image", "question", *settings, "layers", "conversation"]
    assert named["/image_sweep"] == named["/image_next_tokens"] == ["image", "question", "scales", *settings,
                                                                   "layers", "conversation"]
    assert named["/score"] == ["data", "scales", "exact", *settings, "images", "layers"]
    by_keyword = client.predict(QUESTION, [], gate_scale=2.0, temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"],
                                api_name="/chat")
    assert by_keyword[-1]["content"][0]["text"] == chat(client, QUESTION, gate=2.0)
    table = client.predict(question=QUESTION, scales="0, 2", temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"],
                           api_name="/sweep")
    assert [answer for _, answer in table["data"]] == [chat(client, QUESTION, gate=0.0), chat(client, QUESTION, gate=2.0)]


def test_concurrent_clients_each_get_their_own_gate(served, client):
    gates = (0.0, 1.5)
    alone = {gate: chat(client, QUESTION, gate=gate) for gate in gates}
    assert alone[0.0] != alone[1.5]
    results, start = {}, threading.Barrier(len(gates))

    def user(gate: float) -> None:
        own = Client(served.url, verbose=False)
        start.wait()
        results[gate] = chat(own, QUESTION, gate=gate)

    threads = [threading.Thread(target=user, args=(gate,)) for gate in gates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == alone


LONG = controls(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)  # seeded sampling: the same answer every time


def whole_answer_steps(client: Client, decode_steps: list[int]) -> int:
    """The forward steps of a whole LONG answer (the count then starts again from 0)."""
    client.predict(QUESTION, [], *LONG, api_name="/chat")
    complete = len(decode_steps)
    decode_steps.clear()
    return complete


def test_stop_ends_decoding_and_frees_the_model(served, client, decode_steps):
    complete = whole_answer_steps(client, decode_steps)
    job = client.submit(QUESTION, [], *LONG, api_name="/chat")
    while len(job.outputs()) < 3:  # decoding has started
        time.sleep(0.01)
    job.cancel()
    wait_until_free(served.engine.lock)
    stopped = len(decode_steps)
    assert stopped < complete / 2, f"decoding stopped early ({stopped} of {complete} steps)"
    time.sleep(0.2)
    assert len(decode_steps) == stopped, "and did not go on in the background"
    assert chat(client, QUESTION), "the app keeps serving"


def test_a_client_that_goes_away_stops_its_generation(served, client, decode_steps):
    complete = whole_answer_steps(client, decode_steps)
    chat_index = next(i for i, d in enumerate(httpx.get(served.url + "config").json()["dependencies"])
                      if d.get("api_name") == "chat")
    body = {"data": [QUESTION, [], *LONG, served.engines.names[0], "", "all"], "fn_index": chat_index,
            "session_hash": "leaving"}
    httpx.post(served.url + "gradio_api/queue/join", json=body).raise_for_status()
    with httpx.stream("GET", served.url + "gradio_api/queue/data", params={"session_hash": "leaving"},
                      timeout=30) as events:
        generating = (line for line in events.iter_lines() if "process_generating" in line)
        for _ in range(3):  # decoding has started
            next(generating)
    wait_until_free(served.engine.lock)
    assert len(decode_steps) < complete / 2, f"decoding stopped early ({len(decode_steps)} of {complete} steps)"
    assert chat(client, QUESTION), "the app keeps serving"


@pytest.mark.parametrize("event, inputs, conversation", [
    ("chat", (QUESTION, []), ()), ("sweep", (QUESTION, "0, 1"), ()), ("layer_sweep", (QUESTION,), ()),
    ("every_adapter", (QUESTION,), ()), ("compare", (QUESTION,), ()), ("ask_image", (RED, QUESTION), ([],)),
    ("sweep_image", (RED, QUESTION, "0, 1"), ([],)), ("layer_sweep_image", (RED, QUESTION), ([],))])
def test_closing_an_event_stops_the_decode_under_it_at_once(served, client, decode_steps, event, inputs,
                                                           conversation):
    """gradio stops an answer by closing the event's generator. The decode under it must close then, not when the
    garbage collector frees the event's frame: on Python 3.10 that was after the whole answer (the two tests
    above failed there). A reference to the frame (a traceback, a debugger) keeps it alive here on any Python."""
    complete = whole_answer_steps(client, decode_steps)
    answering = getattr(Handlers(served.engines), event)(None, *inputs, *LONG, *conversation)
    for _ in range(4):  # decoding has started
        next(answering)
    frame = answering.gi_frame
    answering.close()
    try:
        wait_until_free(served.engine.lock)
        assert len(decode_steps) < complete / 2, f"decoding stopped early ({len(decode_steps)} of {complete} steps)"
    finally:  # a decode left open is collected with the frame, so that it does not hold the model for later tests
        del frame
        gc.collect()


@pytest.mark.parametrize("endpoint, arguments, message", [
    ("/chat", lambda images: ("", [], *controls()), "message: is empty"),
    ("/chat", lambda images: ("x" * 100_000, [], *controls()), "message: 100,000 characters is too long"),
    ("/chat", lambda images: (QUESTION, [], *controls(gate=3.0)), r"gate_scale: must be in \[0, 2\]"),
    ("/chat", lambda images: (QUESTION, [], *controls(delta=-1.0)), r"delta_scale: must be in \[0, 2\]"),
    ("/chat", lambda images: (QUESTION, [], *controls(temperature=5.0)), r"temperature: must be in \[0, 2\]"),
    ("/chat", lambda images: (QUESTION, [], *controls(top_p=0.0)), r"top_p: must be in \(0, 1\]"),
    ("/chat", lambda images: (QUESTION, [], *controls(max_new_tokens=10_000)), "max_new_tokens: must be between 1 and 1024"),
    ("/compare", lambda images: ("   ", *controls()), "question: is empty"),
    ("/sweep", lambda images: (QUESTION, "0, 1, 3", *controls()), r"gate_scales: must be in \[0, 2\], got 3.0"),
    ("/image", lambda images: (handle_file(str(images / "notes.png")), "What is it?", *controls()),
     "image: notes.png is not an image file"),
    ("/image", lambda images: (None, "What is it?", *controls()), "image: upload an image first"),
    ("/image_sweep", lambda images: (None, "What is it?", "0, 1", *controls()), "image: upload an image first"),
    ("/next_tokens", lambda images: (QUESTION, "0, 1, 3", *controls()), r"gate_scales: must be in \[0, 2\], got 3.0"),
    ("/next_tokens", lambda images: ("", "0, 1", *controls()), "question: is empty"),
    ("/image_next_tokens", lambda images: (None, "What is it?", "0, 1", *controls()), "image: upload an image first"),
    ("/gates", lambda images: (-1.0,), r"gate_scale: must be in \[0, 2\]"),
    ("/chat", lambda images: (QUESTION, [], *controls(), None, "Be brief."),
     "system: the alpaca prompt format has no system prompt"),
    ("/compare", lambda images: (QUESTION, *controls(), None, "x" * 5000), "system: 5,000 characters is too long"),
    ("/score", lambda images: (None, "0, 1", False, *controls()),
     r"data: upload a file of records \(JSON, JSONL or Parquet\) or of plain text \(\.txt\) first"),
    ("/score", lambda images: (handle_file(str(images / "broken.jsonl")), "0, 1", False, *controls()),
     r"broken.jsonl has 1 bad record\(s\), none read:\n  .*broken.jsonl:1: missing 'output'"),
    ("/score", lambda images: (handle_file(str(images / "broken.jsonl")), "0, 5", False, *controls()),
     r"gate_scales: must be in \[0, 2\], got 5.0"),
    ("/compare", lambda images: (QUESTION, *controls(), None, None, "0-9"),
     r"gate_layers: layer\(s\) 0, 4-9 have no adaption prompt; this adapter's prompts are in layers 1-3"),
    ("/layer_sweep", lambda images: ("", *controls()), "question: is empty"),
    ("/image_layer_sweep", lambda images: (None, "What is it?", *controls()), "image: upload an image first"),
    ("/gates", lambda images: (1.0, None, "top 9"), r"gate_layers: the top N layers needs N from 0 to 3"),
])
def test_bad_inputs_get_a_clear_message_and_the_app_keeps_serving(client, images, endpoint, arguments, message,
                                                                  capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=message):
        client.predict(*arguments(images), api_name=endpoint)
    assert chat(client, QUESTION, max_new_tokens=4)
    assert "Traceback" not in capfd.readouterr().err, "a user's mistake filled the server's log with a traceback"


def test_the_layer_sweeps_and_a_layer_choice_reach_the_model(served, client, images):
    model = served.engine.model
    sweep = client.predict(QUESTION, *controls(gate=1.5), api_name="/layer_sweep")
    assert sweep["headers"] == ["adapter layers speaking", "answer"]
    assert [label for label, _ in sweep["data"]] == ["top 0: none", "top 1: 3", "top 2: 2-3", "top 3: 1-3"]
    greedy = dict(temperature=0.0, max_new_tokens=GREEDY["max_new_tokens"], stop=STOP_STRINGS)
    only = {n: model.generate(adapter.alpaca(QUESTION), gate_scale=gate_scale_rows(model, [1.5], range(4 - n, 4)),
                              **greedy) for n in range(4)}
    assert [answer for _, answer in sweep["data"]] == [only[n] for n in range(4)]
    assert chat(client, QUESTION, gate=1.5) == only[3]
    history = client.predict(QUESTION, [], *controls(gate=1.5), None, None, "top 2", api_name="/chat")
    assert to_pairs(history)[-1][1] == only[2]
    pictured = client.predict(handle_file(str(images / "red.png")), "What colour is it?", *controls(),
                              api_name="/image_layer_sweep")
    assert len(pictured["data"]) == 4 and pictured["data"][0][0] == "top 0: none"


def test_gates_and_model_info(client, demo_files):
    info = client.predict(api_name="/model_info")
    model = adapter.load(demo_files.base, adapter=demo_files.adapter, clip=demo_files.clip,
                         clip_model=str(demo_files.clip_model), device="cpu")
    assert info["parameters"] == model.count_parameters()
    assert info["trainable_parameters"] == model.count_parameters(trainable_only=True)
    assert (info["base_format"], info["base_family"], info["adapter_format"], info["quantization"], info["device"]) \
        == ("meta", "LLaMA", "native", "none", "cpu")
    assert info["sees_images"] and info["process_memory_mb"] > 0
    plot = client.predict(1.0, api_name="/gates")
    assert plot["type"] == "matplotlib" and plot["plot"]


def test_the_apps_openai_api_asks_for_its_key_and_the_page_stays_open(demo_files):  # noqa: F811
    """`python app.py --openai-api --api-key KEY`: /v1 answers requests presenting KEY alone; the page is the
    page (whoever reaches it may ask through it), so --api-key without --openai-api is refused as guarding nothing."""
    from adapter.app_config import parse_config
    from tests.app_helpers import running_app

    key = "app-key-" + "y" * 16
    with running_app([*demo_files.flags(), "--openai-api", "--api-key", key]) as served:
        assert httpx.get(f"{served.url}v1/models", timeout=30).status_code == 401
        listed = httpx.get(f"{served.url}v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == served.engines.names
        asked = {"input": "What colour is the star?", "max_output_tokens": 4}
        assert httpx.post(f"{served.url}v1/responses", json=asked, timeout=60).status_code == 401
        answered = httpx.post(f"{served.url}v1/responses", json=asked, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
        assert answered.status_code == 200 and answered.json()["output"][0]["content"][0]["text"], answered.text
        assert httpx.get(served.url, timeout=30).status_code == 200, "the page"
    with pytest.raises(ValueError, match=r"^--api-key: it guards the OpenAI-compatible API, which --openai-api "):
        parse_config([*demo_files.flags()], {"ADAPTER_API_KEY": key})


def test_the_server_keeps_at_most_max_sessions_sessions(demo_files, served):  # noqa: F811
    """gradio copies every component's settings into each session (about 0.3 MB for this app) and kept 10,000
    sessions, so the server's memory grew with every visitor and API client up to about 3 GB. --max-sessions
    (ADAPTER_MAX_SESSIONS, default 1000) bounds it, the least recently active forgotten first."""
    from adapter.app_config import MAX_SESSIONS, parse_config
    from tests.app_helpers import running_app

    assert served.demo.state_session_capacity == MAX_SESSIONS == 1000
    with running_app([*demo_files.flags(), "--max-sessions", "32"]) as small:  # the least beside --concurrency 2
        clients = [Client(small.url, verbose=False) for _ in range(40)]
        for client in clients:
            client.predict(api_name="/model_info")
        kept = small.demo.state_holder.session_data
        assert len(kept) == 32 and list(kept) == [client.session_hash for client in clients[8:]]
        answer = clients[0].predict(QUESTION, [], *controls(**GREEDY), api_name="/chat")  # forgotten: starts anew
        assert answer[-1]["role"] == "assistant" and list(kept)[-1] == clients[0].session_hash
    assert parse_config([*demo_files.flags()], {"ADAPTER_MAX_SESSIONS": "40"}).max_sessions == 40
    with pytest.raises(ValueError, match=r"^--max-sessions: must be at least 32, the requests the queue holds \(16 "
                                         r"per --concurrency slot\), got 20$"):
        parse_config([*demo_files.flags(), "--concurrency", "2", "--max-sessions", "20"])


def test_auth_asks_the_page_and_gradios_api_for_a_login(demo_files):  # noqa: F811
    """`--auth USER:PASSWORD` (ADAPTER_AUTH): an app served beyond this machine answered anyone who found it."""
    from gradio_client.exceptions import AuthenticationError

    from adapter.app_config import parse_config
    from tests.app_helpers import running_app

    login = ("teacher", "gates-open-slowly")
    with running_app([*demo_files.flags(), "--auth", ":".join(login)]) as served:
        assert httpx.get(f"{served.url}config", timeout=30).status_code == 401
        with pytest.raises(AuthenticationError):
            Client(served.url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(served.url, auth=(login[0], "wrong-password"), verbose=False)
        client = Client(served.url, auth=login, verbose=False)
        assert client.predict(QUESTION, [], *controls(**GREEDY), api_name="/chat")[-1]["role"] == "assistant"
    for auth in ("teacher", ":gates-open-slowly", "teacher:short"):
        with pytest.raises(ValueError, match=r"^--auth: give USER:PASSWORD, a user name and a password of at least 8 "):
            parse_config([*demo_files.flags()], {"ADAPTER_AUTH": auth})
    assert parse_config([*demo_files.flags(), "--auth", "a:b:c-d-e-f-g"]).login == ("a", "b:c-d-e-f-g")
