"""The app in a real browser (Debian's Chromium driven by playwright): ask, move the gate slider to 0, ask
again, and the answer changes. Skipped where Chromium is not installed (CI installs it, see .ci/run)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from tests.app_helpers import QUESTION, demo_files, served  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install -y chromium)"),
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword)")]


@pytest.fixture(scope="module")
def page(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(served.url)
        yield page
        browser.close()


def coloured(page, element: str) -> None:
    """Wait for an answer to be complete: its tokens then get coloured."""
    page.locator(f"{element} [data-testid='highlighted-text:textfield'] .token").first.wait_for()


def ask(page, question: str) -> str:
    page.fill("#message textarea", question)
    page.click("#send")
    bot = page.locator("#chatbot [data-testid='bot']").last
    bot.wait_for()
    coloured(page, "#chat_colours")
    return bot.inner_text()


def test_moving_the_gate_slider_changes_the_answer(page, tmp_path):
    adapted = ask(page, QUESTION)
    assert adapted.strip()
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
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("adapted.png", "frozen.png"))


def test_an_uploaded_image_gets_an_answer(page, tmp_path):
    Image.new("RGB", (40, 30), (220, 20, 30)).save(tmp_path / "red.png")
    page.get_by_role("tab", name="Image").click()
    page.locator("#image input[type=file]").set_input_files(str(tmp_path / "red.png"))
    page.locator("#image img").wait_for()
    page.click("#ask")
    coloured(page, "#image_colours")
    assert page.input_value("#image_answer textarea").strip()
