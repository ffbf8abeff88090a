"""The demo page in headless Chromium, as a person uses it, and what its answer columns show.

One session: "Store a fresh copy" of the default document on A, a first turn on A and C, then
the follow-up on B and D, which meet the first turn afresh (B loads it from the shared
directory, D computes it). Used against the local launcher (tests/test_demo_browser.py) and
the CPU compose stack (tests/test_compose_cpu.py).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
CACHED_LABELS = ("A · lmcache-fs", "B · lmcache-fs")
PLAIN_LABELS = ("C · plain vLLM", "D · plain vLLM")


@dataclass(frozen=True)
class PageSession:
    """(engine label, column text) of every answer column after each turn, in page order."""

    first_turn: list[tuple[str, str]]
    follow_up: list[tuple[str, str]]


def _answer_columns(page) -> list[tuple[str, str]]:
    """(engine label, column text) of every drawn answer column, in page order."""
    columns = []
    for column in page.locator('[data-testid="stColumn"]').all():
        text = column.inner_text()
        if "TTFT" in text and "prompt tokens" in text:
            columns.append((text.split("\n", 1)[0], text))
    return columns


def _figures(text: str) -> tuple[int, float]:
    """Tokens loaded from the shared directory and the TTFT one column shows."""
    shared = re.search(r"([\d,]+) tokens from the shared directory", text).group(1)
    return int(shared.replace(",", "")), float(re.search(r"TTFT\s+([\d.]+) s", text).group(1))


def ask_on_the_page(url: str, screenshot: Path) -> PageSession:
    """Drive the page at ``url`` through a first turn and its follow-up; screenshot at the end.

    Skips where Playwright or Chromium is missing (a CI run fails instead: tests/conftest.py).
    """
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 2600})
            page.goto(url)
            sidebar = page.locator('[data-testid="stSidebar"]')
            sync_api.expect(sidebar.get_by_text("up", exact=True)).to_have_count(4, timeout=60_000)
            sync_api.expect(page.get_by_text("Documents (concatenated in this order)")).to_be_visible()
            assert page.get_by_text("answers are meaningless").count() == 0  # a real model
            for label in (CACHED_LABELS[1], PLAIN_LABELS[1]):
                sidebar.get_by_text(f"Ask {label}").click()
            page.get_by_role("button", name=re.compile("^Store a fresh copy")).click()
            page.get_by_text(re.compile(r"\d+ new chunk files in the shared directory")).wait_for(
                timeout=120_000)
            page.get_by_role("button", name="Ask the selected engines").click()
            page.get_by_role("button", name="Ask the follow-up").wait_for(timeout=180_000)
            page.wait_for_timeout(1000)
            first_turn = _answer_columns(page)
            page.get_by_role("button", name="Ask the follow-up").click()
            deadline = 180_000
            while len(_answer_columns(page)) < 4 and deadline > 0:
                page.wait_for_timeout(1000)
                deadline -= 1000
            page.locator('[data-testid="stVegaLiteChart"]').wait_for(timeout=60_000)
            page.get_by_text("Shared cache directory").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            follow_up = _answer_columns(page)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return PageSession(first_turn, follow_up)


def check_side_by_side_answers(session: PageSession) -> None:
    """What the session must show: the first turn on A and C, the follow-up on B and D, B
    loading the first turn from the shared directory and answering sooner than D."""
    a, b = CACHED_LABELS
    c, d = PLAIN_LABELS
    assert [label for label, _ in session.first_turn] == [a, c]
    assert [label for label, _ in session.follow_up] == [a, c, b, d]
    figures = {label: _figures(text) for label, text in session.follow_up}
    # A answers from the context it stored (its own prefix cache), C computes it all.
    assert figures[c][0] == 0
    assert figures[a][1] < figures[c][1]
    # The follow-up: B loads the first turn's prefix from the directory and answers sooner.
    assert figures[b][0] > 0 and figures[d][0] == 0
    assert figures[b][1] < figures[d][1]
    # A real model's answers: words, not the synthetic model's control characters.
    answers = [text.rsplit("own prefix cache", 1)[1] for _, text in session.follow_up]
    assert all(re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}", answer) for answer in answers), answers
