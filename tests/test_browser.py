"""The app in a real browser: Debian's headless Chromium, driven by Playwright."""

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import app

ROOT = Path(__file__).parent.parent
SCREENSHOT = ROOT / "artifacts" / "app.png"  # kept after the run; docs/app.png is a copy of one


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the browser test needs Chromium: apt-get install -y chromium (never `playwright install`)"
    return found


@pytest.fixture(scope="module")
def explorer():
    return app.Explorer("tiny-llava-next", "cpu")


@pytest.fixture(scope="module")
def browser():
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[*flags, "--disable-component-update"])
        yield browser
        browser.close()


def test_upload_pick_hired_at_20_percent_run_and_see_the_results(browser, explorer):
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(url)
    try:
        see_the_results(page)
    finally:
        demo.close()


def test_the_exported_report_opens_and_shows_the_overlay_and_the_answer(browser, explorer):
    settings = [f.default for _, f in app.SETTINGS]
    *_, last = explorer.explore(str(ROOT / "assets" / "rocket.jpg"), "What is it?", "cls", 20, True, 4, {}, *settings)
    html, _ = app.Explorer.report(last["shown"])
    page = browser.new_page()
    page.goto(Path(html).as_uri())
    overlay = page.get_by_role("img", name="thumbnail: kept and dropped")
    expect(overlay).to_be_visible()
    assert overlay.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [140, 427]
    expect(page.locator("pre.answer").first).to_have_text(last["answer"])
    expect(page.get_by_text("visual tokens", exact=True)).to_be_visible()


def see_the_results(page):
    expect(page.get_by_text("random weights")).to_be_visible(timeout=120_000)  # the model loaded
    page.locator("input[type=file]").first.set_input_files(str(ROOT / "assets" / "coffee.jpg"))
    expect(page.get_by_text("of 2144 visual tokens (20%)")).to_be_visible(timeout=60_000)

    page.get_by_label("Method").click()
    page.get_by_role("option", name="hired:").click()
    slider = page.get_by_label("number input for Budget: % of the visual tokens")
    slider.fill("20")
    slider.press("Enter")
    expect(page.get_by_text("of 2144 visual tokens (20%)")).to_be_visible()
    page.get_by_role("button", name="Run").click()

    expect(page.get_by_text(" tokens/s · full: ")).to_be_visible(timeout=120_000)  # both runs are done
    expect(page.get_by_role("row", name="visual tokens 428 2144 0.20x")).to_be_visible()
    expect(page.get_by_text("thumbnail: 214 of 576 kept")).to_be_visible()
    overlay = page.get_by_role("tabpanel").locator("img").first
    expect(overlay).to_be_visible()
    assert overlay.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [600, 400]
    assert page.get_by_label("Reduced answer").input_value() != ""

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000
