"""The annotator's page in a real browser: Debian's chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from qsched.study.app import create_app
from qsched.study.server import serve_in_thread
from qsched.study.service import StudyService, StudySettings
from qsched.study.synthetic import write_synthetic_evaluation

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "Debian's chromium is needed (apt-get install chromium); .ci/run installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_a_dozen_questions_by_click_and_key_all_land(browser, tmp_path: Path) -> None:
    eval_dir = write_synthetic_evaluation(tmp_path / "eval", num=6, size=32)
    service = StudyService(StudySettings(eval_dir=str(eval_dir), cache_dir=str(tmp_path / "study"), gold=2,
                                         gold_every=5, per_annotator=12))
    app = create_app(service, annotator_token="tok", organiser_token="org")
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)  # a phone
        page.goto(url + "?t=tok")
        page.get_by_label("Your name or annotator id").fill("Ada Lovelace")
        page.get_by_role("button", name="Start").click()
        expect(page.locator("#progress-text")).to_have_text("0 / 12")
        expect(page.get_by_label("Your name or annotator id")).to_be_hidden()
        assert "a=Ada-Lovelace" in page.url  # the link to come back with
        expect(page.get_by_role("button", name="left image is better")).to_be_enabled()
        # a phone: both images side by side within the screen, buttons big enough to tap
        left, right = page.locator("#left").bounding_box(), page.locator("#right").bounding_box()
        assert left["width"] > 120 and left["x"] + left["width"] <= right["x"] and right["x"] + right["width"] <= 390
        for name in ("left image is better", "tie", "right image is better"):
            box = page.get_by_role("button", name=name).bounding_box()
            assert box["height"] >= 44 and box["x"] + box["width"] <= 390
        actions = ["click left", "key ArrowRight", "click tie", "key ArrowLeft", "click right", "key ArrowDown"] * 2
        prompts = []
        for k, action in enumerate(actions):
            expect(page.get_by_role("button", name="left image is better")).to_be_enabled()
            prompts.append(page.locator("#prompt").inner_text())
            kind, what = action.split()
            if kind == "click":
                page.get_by_role("button", name={"left": "left image is better", "right": "right image is better",
                                                 "tie": "tie"}[what]).click()
            else:
                page.keyboard.press(what)
            if k < len(actions) - 1:
                expect(page.locator("#progress-text")).to_have_text(f"{k + 1} / 12")
        expect(page.get_by_text("You have answered all your questions.")).to_be_visible()
        expect(page.get_by_role("button", name="left image is better")).to_be_hidden()
        expect(page.locator("#progress-text")).to_have_text("12 / 12")
        votes = service.store.all_votes()
        assert [v.answer for v in votes] == ["left", "right", "tie", "left", "right", "tie"] * 2
        assert all(v.annotator == "Ada-Lovelace" for v in votes) and len({v.question for v in votes}) == 12
        assert [service.source.prompts[v.index] for v in votes] == prompts  # each vote is for the question on screen
        # coming back with the link: nothing is asked twice
        again = browser.new_page()
        again.goto(page.url)
        expect(again.get_by_text("You have answered all your questions.")).to_be_visible()
        assert service.store.count() == 12
        page.close()
        again.close()
