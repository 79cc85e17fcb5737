"""Chromium driven by playwright, for the browser tests and the README's screenshots (`python -m
docs.screenshots`): Debian's /usr/bin/chromium, never a downloaded browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium (playwright's Browser), closed afterwards. One per thread at a time."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1200, height: int = 1000):
    """A new page on `url`, waiting up to a minute for anything it is asked to wait for."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(60_000)
    page.goto(url)
    return page


def coloured(page, element: str) -> None:
    """Wait for an answer to be complete: its tokens then get coloured."""
    page.locator(f"{element} [data-testid='highlighted-text:textfield'] .token").first.wait_for()


def ask(page, question: str) -> str:
    """Send `question` in the chat tab; the last answer once it is complete."""
    page.fill("#message textarea", question)
    page.click("#send")
    bot = page.locator("#chatbot [data-testid='bot']").last
    bot.wait_for()
    coloured(page, "#chat_colours")
    return bot.inner_text()


def finished(page, *elements: str) -> None:
    """Wait until none of the elements (CSS ids) is still marked as pending or generating."""
    busy = ", ".join(f"{e} .generating, {e} .progress-text" for e in elements)
    page.wait_for_function(f"() => !document.querySelector({busy!r})")


def compare(page, question: str) -> tuple[str, str]:
    """Ask `question` in the compare tab; (frozen base's answer, adapter's answer) once both are complete."""
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare_question textarea", question)
    page.click("#compare")
    page.wait_for_function("() => document.querySelector('#adapted_answer textarea').value.length > 0")
    finished(page, "#base_answer", "#adapted_answer")
    return page.input_value("#base_answer textarea"), page.input_value("#adapted_answer textarea")


def sweep(page, scales: str, prefix: str = "") -> list[list[str]]:
    """Sweep the open tab's question over `scales` (prefix "image_" in the image tab); the table's rows
    (scale, answer) once complete."""
    page.fill(f"#{prefix}sweep_scales textarea", scales)
    page.click(f"#{prefix}sweep")
    rows = page.locator(f"#{prefix}sweep_table [role=row]:has([role=gridcell])")
    rows.first.wait_for()
    finished(page, f"#{prefix}sweep_table")
    return [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]


def next_token(page, scales: str, prefix: str = "") -> list[list[str]]:
    """The next token's table of the open tab's question over `scales` (prefix "image_" in the image tab), once
    complete: one row per token (quoted token, % per scale), the rest last."""
    page.fill(f"#{prefix}sweep_scales textarea", scales)
    page.click(f"#{prefix}next_token")
    rows = page.locator(f"#{prefix}next_token_table [role=row]:has([role=gridcell])")
    rows.first.wait_for()
    finished(page, f"#{prefix}next_token_table", f"#{prefix}next_token_plot")
    return [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]


def layer_sweep(page, prefix: str = "") -> list[list[str]]:
    """The layer sweep of the open tab's question (prefix "image_" in the image tab), once complete: one row per
    number of top layers speaking (label, answer)."""
    page.click(f"#{prefix}layer_sweep")
    rows = page.locator(f"#{prefix}layer_sweep_table [role=row]:has([role=gridcell])")
    rows.first.wait_for()
    finished(page, f"#{prefix}layer_sweep_table")
    return [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]


def every_adapter(page) -> list[list[str]]:
    """The Compare tab's question asked of every adapter: one row per adapter (name, answer), once complete."""
    page.click("#every_adapter")
    rows = page.locator("#every_adapter_table [role=row]:has([role=gridcell])")
    rows.first.wait_for()
    finished(page, "#every_adapter_table")
    return [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]


def score(page, scales: str) -> list[list[str]]:
    """Score the Score tab's records over `scales`; the table's rows once complete."""
    page.fill("#score_scales textarea", scales)
    page.click("#score")
    rows = page.locator("#score_table [role=row]:has([role=gridcell])")
    rows.first.wait_for()
    finished(page, "#score_table", "#score_plot")
    return [row.locator("[role=gridcell]").all_inner_texts() for row in rows.all()]


def choose_adapter(page, name: str, dropdown: str = "adapter") -> None:
    """Pick the served adapter `name` in a dropdown (`adapter`: chat, compare, gates, model; `image_adapter`)."""
    page.click(f"#{dropdown} input")
    page.get_by_role("option", name=name, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#{dropdown} input').value === {name!r}")


def start_training(page, records: str, epochs: int) -> None:
    """In the Train tab: the offered records file `records` clicked, `epochs` set, Train pressed."""
    page.get_by_role("tab", name="Train").click()
    page.get_by_text(records).first.click()
    page.locator(f"#train_file [aria-label='{records}']").wait_for()
    page.fill("#train_epochs input[type=number]", str(epochs))
    page.keyboard.press("Tab")
    page.click("#train")


def download(page, format_label: str, name: str) -> None:
    """In the Model tab: the adapter chosen at the top downloaded in the format labelled `format_label`, its file
    `name` offered."""
    page.get_by_role("tab", name="Model").click()
    page.click("#download_format input")
    page.get_by_role("option", name=format_label, exact=True).click()
    page.click("#download")
    page.locator(f"#download_file [aria-label='{name}']").wait_for(timeout=60_000)
