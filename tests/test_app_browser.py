"""The app in a real browser (Debian's Chromium driven by playwright): on the random demo model, ask, move the
gate slider to 0, ask again, and the answer changes; on the embedded tiny model, a held-out example clicked in
the compare tab shows the frozen base's answer beside the adapter's, and the gate sweep's table; with
--private-adapters an upload is one page's alone and goes when it closes. Skipped where
Chromium is not installed (CI installs it, see .ci/run)."""

from __future__ import annotations

import json
import time
import zipfile

import httpx
import pytest
import safetensors.torch
import torch
from PIL import Image

from adapter.app_config import tiny_available
from adapter.engine import Settings
from adapter.finetune.records import read_records
from app import DOWNLOAD_FORMATS
from tests.app_helpers import QUESTION, demo_files, running_app, served  # noqa: F401  (fixtures)
from tests.browser import (
    CHROMIUM,
    ask,
    choose_adapter,
    chromium,
    coloured,
    compare,
    download,
    every_adapter,
    layer_sweep,
    next_token,
    open_page,
    score,
    start_training,
    sweep,
)

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install -y chromium)"),
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api")
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def page(browser, served):
    return open_page(browser, served.url)


def test_moving_the_gate_slider_changes_the_answer(page, tmp_path):
    adapted = ask(page, QUESTION)
    assert adapted.strip()
    page.locator("#chat_layers img").wait_for()  # the answer's prompt share per adapter layer, drawn
    page.screenshot(path=str(tmp_path / "adapted.png"), full_page=True)
    assert page.input_value("#message textarea") == "", "sending empties the box"
    page.click("#clear")
    page.locator("#chatbot [data-testid='bot']").wait_for(state="detached")
    page.fill("#gate input[type=number]", "0")
    page.keyboard.press("Tab")
    assert page.input_value("#gate input[type=range]") == "0"
    frozen = ask(page, QUESTION)
    assert frozen.strip() and frozen != adapted
    page.screenshot(path=str(tmp_path / "frozen.png"), full_page=True)
    assert not page.locator("#adapter").is_visible(), "one adapter served: nothing to choose"
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("adapted.png", "frozen.png"))


def test_on_a_phone_the_chat_buttons_share_one_row_and_show_their_words(browser, served):
    """At a phone's 390 px, gradio's 160 px least width stacked Send, Stop, Retry, Undo and Clear one under another,
    a screen's height of buttons between the question and the answer's colours."""
    phone = open_page(browser, served.url, width=390, height=844)
    try:
        boxes = [phone.locator(f"#{name}").bounding_box() for name in ("send", "stop", "retry", "undo", "clear")]
        assert len({round(box["y"]) for box in boxes}) == 1, boxes
        assert boxes[-1]["x"] + boxes[-1]["width"] <= 390
        cut = phone.evaluate("['send', 'stop', 'retry', 'undo', 'clear'].filter(name => "
                             "{ const b = document.getElementById(name); return b.scrollWidth > b.clientWidth; })")
        assert cut == [], f"words cut off: {cut}"
    finally:
        phone.close()


def test_on_a_phone_the_sweep_tables_first_column_keeps_its_numbers_and_words_whole(browser, served):
    """At 390 px gradio gave the gate scale 12% of the width: 0.25 broke into "0." and "25", the header into single
    letters; and a style on the header alone left it misaligned with the rows, which gradio draws apart."""
    phone = open_page(browser, served.url, width=390, height=844)
    try:
        phone.get_by_role("tab", name="Compare").click()
        phone.fill("#compare_question textarea", QUESTION)
        rows = sweep(phone, "0, 0.25, 1")
        assert [row[0] for row in rows] == ["0", "0.25", "1"]
        found = phone.evaluate("""() => {
            const table = document.getElementById('sweep_table');
            const box = element => element.getBoundingClientRect();
            const lines = element => {  // the line boxes of the text it shows
                const text = [...element.querySelectorAll('*')].find(e => !e.children.length && e.textContent.trim());
                const range = document.createRange();
                range.selectNodeContents(text || element);
                return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size; };
            const header = table.querySelector('th');
            const scales = [...table.querySelectorAll('[role=gridcell]')].filter((_, i) => i % 2 == 0);
            return {header: [box(header).left, box(header).width, lines(header)],
                    cells: scales.map(cell => [box(cell).left, box(cell).width, lines(cell)]),
                    right: Math.max(...[...table.querySelectorAll('th, [role=gridcell]')].map(e => box(e).right))};
        }""")
        left, width, header_lines = found["header"]
        assert width >= 80 and header_lines <= 2, found  # "gate" and "scale", each whole
        assert all(cell[:2] == [left, width] and cell[2] == 1 for cell in found["cells"]), found
        assert found["right"] <= 390, found
    finally:
        phone.close()


def test_a_conversation_is_saved_from_the_chat_tab_as_a_training_record(page, served):
    page.get_by_role("tab", name="Chat").click()
    page.click("#clear")
    page.locator("#chatbot [data-testid='bot']").wait_for(state="detached")
    answer = ask(page, QUESTION)
    page.get_by_text("Save this conversation as a training record").click()
    page.click("#save_conversation")
    link = page.locator("#conversation_file a").first
    link.wait_for(timeout=30_000)
    href = link.get_attribute("href")
    saved = json.loads(httpx.get(href if href.startswith("http") else served.url.rstrip("/") + href).text)
    assert saved == {"messages": [{"role": "user", "content": QUESTION},
                                  {"role": "assistant", "content": answer}]}, "what the chat shows"


def test_the_chat_keeps_a_refused_question_shows_save_errors_and_clear_and_undo_stop_the_answer(browser, served):
    """A refused question emptied the box; Save's error (an unqueued event's) showed a bare "Error"; an answer
    being written went on streaming into the chat after Clear or Undo, Undo left the last answer's colours, and
    the box was emptied only once the answer ended (what was typed meanwhile was lost)."""
    page = open_page(browser, served.url)
    toast = page.locator(".toast-body")
    page.get_by_text("Save this conversation as a training record").click()
    page.click("#save_conversation")
    toast.filter(has_text="no answered question to save yet").wait_for()
    long = "word " * 1000  # 5,000 characters, over the box's 4,000
    page.fill("#message textarea", long)
    page.click("#send")
    toast.filter(has_text="characters is too long").wait_for()
    page.wait_for_function("document.querySelector('#message textarea').value.length > 4000")
    assert page.input_value("#message textarea") == long

    ask(page, QUESTION)
    page.click("#undo")
    page.locator("#chat_colours .token").first.wait_for(state="detached")
    assert page.input_value("#message textarea") == QUESTION
    for button, message in (("#clear", ""), ("#undo", QUESTION)):
        page.fill("#message textarea", QUESTION)
        page.click("#send")
        page.locator("#chatbot [data-testid='bot']").last.wait_for()  # writing
        assert page.input_value("#message textarea") == "", "emptied as it is sent (it was when the answer ended)"
        page.click(button)
        page.locator("#chatbot [data-testid='bot']").wait_for(state="detached")
        time.sleep(2)  # where the answer went on, it came back by now
        assert page.locator("#chatbot [data-testid='bot']").count() == 0, button
        assert page.input_value("#message textarea") == message
    page.close()


def test_an_uploaded_image_gets_an_answer_and_a_sweep(page, served, tmp_path):
    Image.new("RGB", (40, 30), (220, 20, 30)).save(tmp_path / "red.png")
    page.get_by_role("tab", name="Image").click()
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "red.png"))
    page.locator("#image img").wait_for()
    page.click("#ask")
    coloured(page, "#image_colours")
    assert page.input_value("#image_answer textarea").strip()
    question = page.input_value("#image_question textarea")
    expected = list(served.engine.sweep_image(Image.open(tmp_path / "red.png"), question, [0, 1.5], Settings()))[-1]
    assert sweep(page, "0, 1.5", prefix="image_") == [["0", expected[0]], ["1.5", expected[1]]]


def test_follow_up_questions_about_a_picture_build_its_conversation(browser, served, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, served.url)  # the controls at their defaults, as Settings() has them
    Image.new("RGB", (40, 30), (20, 200, 30)).save(tmp_path / "green.png")
    picture = Image.open(tmp_path / "green.png")
    page.get_by_role("tab", name="Image").click()
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "green.png"))
    page.locator("#image img").wait_for()
    user_turns = page.locator("#image_chat [data-testid='user']")
    expect(user_turns).to_have_count(0)  # a new picture starts over
    first = page.input_value("#image_question textarea")
    first_answer = list(served.engine.ask_image(picture, first, Settings()))[-1]
    page.click("#ask")
    expect(page.locator("#image_answer textarea")).to_have_value(first_answer, timeout=60_000)
    follow_up = "And what is beside it?"
    turns = [(first, first_answer)]
    expected = list(served.engine.ask_image(picture, follow_up, Settings(), turns))[-1]
    at_zero = list(served.engine.ask_image(picture, follow_up, Settings(gate_scale=0.0), turns))[-1]
    assert at_zero != expected  # so that the second answer cannot be mistaken for the first one still shown
    for gate, answer in (("1", expected), ("0", at_zero)):  # a new question follows the last turn; the same
        page.fill("#gate input[type=number]", gate)  # question again (at another gate) is answered in the same turns
        page.keyboard.press("Tab")
        page.fill("#image_question textarea", follow_up)
        page.click("#ask")
        expect(user_turns).to_have_text([first])
        expect(page.locator("#image_answer textarea")).to_have_value(answer, timeout=60_000)
    page.get_by_text("Save this conversation as a training record").last.click()  # the image tab's
    page.click("#save_image_conversation")
    link = page.locator("#image_conversation_file a").first
    link.wait_for(timeout=30_000)
    href = link.get_attribute("href")
    (tmp_path / "saved.zip").write_bytes(httpx.get(href if href.startswith("http")
                                                   else served.url.rstrip("/") + href).content)
    zipfile.ZipFile(tmp_path / "saved.zip").extractall(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "conversation" / "conversation.jsonl").read_text())
    assert record == {"image": "picture.png", "conversations": [
        {"from": "human", "value": f"<image>\n{first}"}, {"from": "gpt", "value": first_answer},
        {"from": "human", "value": follow_up}, {"from": "gpt", "value": at_zero}]}, "the turns, the last one asked"
    saved_picture = Image.open(tmp_path / "saved" / "conversation" / "picture.png").convert("RGB")
    assert saved_picture.tobytes() == picture.convert("RGB").tobytes(), "the picture asked about, beside it"
    [examples] = read_records(tmp_path / "saved" / "conversation" / "conversation.jsonl",
                              tmp_path / "saved" / "conversation")
    assert [e.response for e in examples] == [first_answer, at_zero], "fine-tuning reads an example per answer"
    page.fill("#image_question textarea", "And below it?")
    page.press("#image_question textarea", "Enter")  # Enter asks, as Ask does
    expect(user_turns).to_have_text([first, follow_up])
    page.click("#image_clear")
    expect(user_turns).to_have_count(0)
    expect(page.locator("#image_answer textarea")).to_have_value("")


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_a_held_out_example_in_the_compare_tab_shows_both_answers_and_a_sweep_of_the_tiny_model(browser):
    from playwright.sync_api import expect

    from adapter.app_config import ServeConfig
    from adapter.app_examples import tiny_held_out, tiny_held_out_images
    from adapter.tiny.questions import text_questions

    example = text_questions(100, "held-out", 6)[0]
    with running_app([]) as tiny:
        page = open_page(browser, tiny.url)
        page.get_by_role("tab", name="Compare").click()
        page.get_by_role("button", name=example.instruction[:20]).last.click()
        expect(page.locator("#compare_question textarea")).to_have_value(example.instruction)
        base, adapted = compare(page, example.instruction)
        assert (base, adapted) == list(tiny.engine.compare(example.instruction, Settings()))[-1]
        expected = list(tiny.engine.sweep(example.instruction, [0, 1, 2], Settings()))[-1]
        assert sweep(page, "0, 1 2") == [[scale, answer] for scale, answer in zip(["0", "1", "2"], expected)]
        likely = tiny.engine.next_tokens(example.instruction, [0, 1, 2], Settings()).rows()
        shown = next_token(page, "0, 1 2")
        assert [row[0] for row in shown] == [row[0] for row in likely]
        assert [[float(cell) for cell in row[1:]] for row in shown] == [row[1:] for row in likely]
        labels, answers = tiny.engine.layer_sweep(example.instruction, Settings())
        assert layer_sweep(page) == [[label, answer] for label, answer in zip(labels, list(answers)[-1])]
        page.fill("#gate_layers textarea", "top 2")
        assert compare(page, example.instruction) == \
            list(tiny.engine.compare(example.instruction, Settings(gate_layers="top 2")))[-1]
        page.fill("#gate_layers textarea", "all")
        own = {name: list(tiny.engines.get(name).compare(example.instruction, Settings()))[-1][1]
               for name in tiny.engines.names}
        assert every_adapter(page) == [[name, answer] for name, answer in own.items()], "each adapter's, a row each"
        page.get_by_role("tab", name="Score").click()
        page.get_by_text("tiny_held_out.jsonl").first.click()  # the tiny model's held-out questions, offered
        page.locator("#score_file [aria-label='tiny_held_out.jsonl']").wait_for()  # loaded before scoring
        scored = score(page, "0, 1")
        held = tiny.engine.score(tiny_held_out(ServeConfig())[0], "0, 1", Settings())
        assert [[float(cell) for cell in row[:4]] for row in scored] == \
            [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1)]
             for s in held.scores]
        assert held.scores[1].loss < held.scores[0].loss
        page.get_by_role("tab", name="Image").click()
        assert page.input_value("#image_adapter input") == "tiny-image", "the image tab starts with the one that sees"
        choose_adapter(page, "tiny-image")
        other = compare(page, example.instruction)
        assert other == list(tiny.engines.get("tiny-image").compare(example.instruction, Settings()))[-1]
        page.get_by_role("tab", name="Score").click()
        page.get_by_text("tiny_held_out_images.jsonl").first.click()  # its image questions and their pictures
        page.locator("#score_file [aria-label='tiny_held_out_images.jsonl']").wait_for()
        page.locator("#score_images [aria-label='000039.png']").wait_for()
        records, pictures = tiny_held_out_images(ServeConfig())
        seen = tiny.engines.get("tiny-image").score(records, "0, 1", Settings(), images=pictures)
        assert [[float(cell) for cell in row[:4]] for row in score(page, "0, 1")] == \
            [[s.gate_scale, round(s.loss, 4), round(s.perplexity, 3), round(100 * s.token_accuracy, 1)]
             for s in seen.scores]
    assert adapted == example.answer and base != adapted, (base, adapted)
    assert other[0] == base, "the frozen base is the same whichever adapter is chosen"


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_the_train_tab_trains_on_the_offered_questions_stops_and_resumes_on_request_and_serves_the_adapter(
        browser):
    from playwright.sync_api import expect

    from adapter.tiny.questions import text_questions

    example = text_questions(100, "held-out", 6)[0]
    with running_app([]) as tiny:
        page = open_page(browser, tiny.url)
        start_training(page, "tiny_training.jsonl", epochs=3)  # the tiny model's training questions, offered
        status = page.locator("#train_status")
        expect(status).to_contain_text("step ", timeout=60_000)  # under way, drawn as it goes
        page.locator("#train_gates canvas, #train_gates svg").first.wait_for()  # the curves, drawn as they grow
        page.click("#train_stop")
        expect(status).to_contain_text("served as trained-1", timeout=60_000)
        assert status.inner_text().startswith("Stopped (step "), status.inner_text()
        page.locator("#train_zip [aria-label='trained-1.zip']").wait_for()  # to download
        assert tiny.engines.names == ["tiny-text", "tiny-image", "trained-1"]
        assert page.input_value("#adapter input") == "trained-1", "the new adapter is chosen"
        page.get_by_role("tab", name="Compare").click()
        shown = compare(page, example.instruction)
        assert shown == list(tiny.engines.get("trained-1").compare(example.instruction, Settings()))[-1]
        assert shown[0] == list(tiny.engine.compare(example.instruction, Settings()))[-1][0], \
            "at gate 0 the trained adapter is the frozen base"
        page.get_by_role("tab", name="Train").click()
        stopped_at = steps_done(status.inner_text())
        page.click("#train_resume")
        expect(status).not_to_contain_text("Stopped", timeout=60_000)  # under way again
        expect(status).to_contain_text("step ", timeout=60_000)
        page.click("#train_stop")
        expect(status).to_contain_text("served as trained-1", timeout=60_000)
        assert status.inner_text().startswith("Stopped (step "), status.inner_text()
        assert steps_done(status.inner_text()) > stopped_at, "it went on from where it stopped"
        assert tiny.engines.names == ["tiny-text", "tiny-image", "trained-1"], "served in the stopped one's place"


def steps_done(status: str) -> int:
    """N of a Train-tab status "... (step N / M · ..."."""
    return int(status.split("(step ")[1].split(" /")[0])


@pytest.mark.skipif(not tiny_available(), reason="assets/tiny not built yet")
def test_the_train_tab_trains_an_image_adapter_on_the_offered_pictures_and_the_image_tab_asks_it(browser, tmp_path):
    from playwright.sync_api import expect

    from adapter.tiny.questions import image_questions
    from adapter.tiny.world import render

    example = image_questions(100, "held-out", 1)[0]
    render(example.scene).save(tmp_path / "scene.png")
    with running_app([]) as tiny:
        page = open_page(browser, tiny.url)
        start_training(page, "tiny_training_images.jsonl", epochs=1)  # its pictures and the vision mode with it
        expect(page.locator("#train_mode input[value=vision]")).to_be_checked()
        status = page.locator("#train_status")
        expect(status).to_contain_text("served as trained-1", timeout=120_000)
        assert status.inner_text().startswith("Trained (step 60 / 60 "), status.inner_text()
        assert "ask it about a picture in the Image tab" in status.inner_text()
        trained = tiny.engines.get("trained-1")
        tower = tiny.engines.get("tiny-image").model.image_encoder
        assert trained.can_see_images and trained.model.image_encoder is tower, "on the served tower"
        page.get_by_role("tab", name="Image").click()
        choose_adapter(page, "trained-1", "image_adapter")
        page.locator("#image input[type=file]").set_input_files(str(tmp_path / "scene.png"))
        page.locator("#image img").wait_for()
        page.fill("#image_question textarea", example.question)
        page.click("#ask")
        expected = list(trained.ask_image(Image.open(tmp_path / "scene.png"), example.question, Settings()))[-1]
        expect(page.locator("#image_answer textarea")).to_have_value(expected, timeout=60_000)


def test_an_adapter_uploaded_in_the_model_tab_is_served_chosen_downloaded_and_pushed(browser, demo_files, tmp_path,
                                                                                      monkeypatch):
    from playwright.sync_api import expect

    from tests.test_push import FakeHub

    hub = FakeHub(tmp_path / "hub")
    hub.install(monkeypatch)
    with running_app(demo_files.flags()) as demo:
        page = open_page(browser, demo.url)
        page.get_by_role("tab", name="Model").click()
        page.locator("#upload_adapter input[type=file]").set_input_files(
            str(demo_files.adapter / "adapter.safetensors"))  # the demo's own image adapter, once more
        page.locator("#upload_adapter [aria-label='adapter.safetensors']").wait_for()
        page.click("#serve_upload")
        expect(page.locator("#upload_status")).to_contain_text("Served as uploaded-1 (native format: ",
                                                               timeout=60_000)
        assert demo.engines.names[-1] == "uploaded-1" and demo.engines.get("uploaded-1").can_see_images
        expect(page.locator("#adapter input")).to_have_value("uploaded-1")
        page.get_by_role("tab", name="Image").click()
        expect(page.locator("#image_adapter input")).to_have_value("uploaded-1")  # it sees: chosen there too
        download(page, DOWNLOAD_FORMATS[0][0], "uploaded-1.zip")  # and downloads again, as it was uploaded
        link = page.locator("#download_file a[download]").first
        with page.expect_download() as downloading:
            link.click()
        with zipfile.ZipFile(downloading.value.path()) as archive:
            downloaded = safetensors.torch.load(archive.read("uploaded-1/adapter.safetensors"))
        uploaded = safetensors.torch.load_file(demo_files.adapter / "adapter.safetensors")
        assert downloaded.keys() == uploaded.keys()
        assert all(torch.equal(downloaded[key], uploaded[key]) for key in uploaded)

        page.fill("#push_repo input", "me/uploaded")  # and pushed to the hub with the user's token
        assert page.locator("#push_token input").get_attribute("type") == "password"
        page.fill("#push_token input", "hf_user")
        page.locator("#push_private input").check()
        page.click("#push")
        expect(page.locator("#push_status")).to_contain_text(
            "Pushed uploaded-1 to me/uploaded (the commit): served anywhere on this base with --adapter hf:me/uploaded",
            timeout=60_000)
        assert hub.tokens == ["hf_user"] and hub.calls[0] == ("create_repo", "me/uploaded",
                                                              {"private": True, "exist_ok": True})
        pushed = safetensors.torch.load_file(hub.folder("me/uploaded") / "adapter.safetensors")
        assert pushed.keys() == uploaded.keys() and all(torch.equal(pushed[key], uploaded[key]) for key in uploaded)


def test_a_private_upload_is_shown_to_its_page_alone_and_goes_when_the_page_closes(browser, demo_files, monkeypatch):
    from playwright.sync_api import expect

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # a page that closes is noticed at once
    with running_app([*demo_files.flags(), "--private-adapters"]) as demo:
        page, other = open_page(browser, demo.url), open_page(browser, demo.url)
        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text("uploaded stay served) to you alone, until this page is closed")).to_be_visible()
        page.locator("#upload_adapter input[type=file]").set_input_files(
            str(demo_files.adapter / "adapter.safetensors"))
        page.locator("#upload_adapter [aria-label='adapter.safetensors']").wait_for()
        page.click("#serve_upload")
        expect(page.locator("#upload_status")).to_contain_text("Served as uploaded-1", timeout=60_000)
        expect(page.locator("#adapter input")).to_have_value("uploaded-1")
        assert list(demo.engines.private) == ["uploaded-1"] and "uploaded-1" not in demo.engines.names
        other.get_by_role("tab", name="Model").click()
        other.click("#refresh")
        expect(other.locator("#model_info")).to_contain_text("adapters_served")
        assert "uploaded-1" not in other.locator("#model_info").inner_text(), "not served to another page"
        page.click("#refresh")
        expect(page.locator("#model_info")).to_contain_text("uploaded-1")
        page.close()
        deadline = time.monotonic() + 30
        while demo.engines.private and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not demo.engines.private, "served no more once its page is closed"
