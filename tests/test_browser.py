"""The app in a real browser: Debian's headless Chromium, driven by Playwright."""

import contextlib
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import app
from explorer.core import fraction_of
from ui.explore import download, run
from ui.session import Session

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "artifacts"  # kept after the run; docs/app.png, docs/preview-*.png are copies of them
SCREENSHOT = ARTIFACTS / "app.png"
BUDGET = "Budget: % of the visual tokens"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the browser test needs Chromium: apt-get install -y chromium (never `playwright install`)"
    return found


@pytest.fixture(scope="module")
def explorer():
    return Session("tiny-llava-next", "cpu")


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
    asked = dict(image=str(ROOT / "assets" / "rocket.jpg"), prompt="What is it?", method="cls", max_new_tokens=4)
    *_, last = run(explorer, {}, budget=20, compare=True, **asked)
    html, _ = download(last["shown"])
    page = browser.new_page()
    page.goto(Path(html).as_uri())
    overlay = page.get_by_role("img", name="thumbnail: kept and dropped")
    expect(overlay).to_be_visible()
    assert overlay.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [140, 427]
    expect(page.locator("pre.answer").first).to_have_text(last["answer"])
    expect(page.get_by_text("visual tokens", exact=True)).to_be_visible()


def test_dragging_the_budget_changes_the_picture_and_the_count_without_run(browser, explorer):
    demo, url = app.serve(explorer, prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    try:
        drag_the_budget(page)
        use_the_picture(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "preview-1400.png")
        every_tab_in_reach(page)
        on_a_phone(page)
    finally:
        demo.close()


def drag_the_budget(page):
    expect(page.get_by_text("random weights")).to_be_visible(timeout=120_000)  # the model loaded
    page.locator("input[type=file]").first.set_input_files(str(ROOT / "assets" / "coffee.jpg"))
    line = page.locator("#picture .tdx-count")
    expect(line).to_have_text("428 of 2144 visual tokens kept (20%)", timeout=60_000)  # hired, the default
    picture = page.locator("#picture [data-draws]")
    drawn, pixels = int(picture.get_attribute("data-draws")), canvas_pixels(page)
    page.evaluate(SEEN)  # records every line the picture shows from now on

    slider = page.get_by_label(f"range slider for {BUDGET}")
    stops = []  # at each stop of one drag, the button still down: the budget, its line, the draws, the pixels
    with holding_the_thumb(page, slider) as move_to:
        for to in (0.35, 0.5, 0.6):
            move_to(to)
            value = int(slider.input_value())
            shown = f"{fraction_of(value / 100, 2144)} of 2144 visual tokens kept ({value}%)"
            expect(line).to_have_text(shown, timeout=30_000)  # waits for this budget's picture, mid-drag
            stops.append((value, shown, int(picture.get_attribute("data-draws")), canvas_pixels(page)))
    values, lines, draws, pictures = zip(*stops)
    assert len({20, *values}) == 4  # three budgets on the way, each new
    assert drawn < draws[0] < draws[1] < draws[2]  # the picture was drawn anew for each, while dragging...
    assert len({pixels, *pictures}) == 4  # ...and looked different each time: it followed the slider, not only its end
    assert set(lines) <= set(page.evaluate("() => window.seenLines"))
    value = int(slider.input_value())  # the button up, where it was let go
    kept = fraction_of(value / 100, 2144)
    expect(line).to_have_text(f"{kept} of 2144 visual tokens kept ({value}%)")
    expect(page.get_by_text(f"{kept} of 2144 visual tokens kept ({value}%) for this 600x400 image")).to_be_visible()
    assert page.get_by_label("Reduced answer").input_value() == ""  # no Run

    slider.focus()
    slider.press("ArrowLeft")  # keys change the budget too, and the picture and the count follow them
    kept = fraction_of((value - 1) / 100, 2144)
    expect(line).to_have_text(f"{kept} of 2144 visual tokens kept ({value - 1}%)")
    expect(page.get_by_text(f"{kept} of 2144 visual tokens kept ({value - 1}%) for this 600x400 image")).to_be_visible()


SEEN = """() => {
    window.seenLines = [];
    const line = document.querySelector('#picture .tdx-count');
    new MutationObserver(() => window.seenLines.push(line.textContent))
        .observe(line, {childList: true, characterData: true, subtree: true});
}"""


@contextlib.contextmanager
def holding_the_thumb(page, slider):
    """Press the mouse button on the slider's thumb; yields a function that moves the thumb to f (0..1 of
    its track) in small steps, as a hand does, the button still down; lets go at the end."""
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2

    def x(f):
        return box["x"] + 8 + f * (box["width"] - 16)  # the thumb is ~16 px wide

    page.mouse.move(x((float(slider.input_value()) - 1) / 99), y)  # the slider runs 1..100
    page.mouse.down()
    try:
        yield lambda f: page.mouse.move(x(f), y, steps=5)
    finally:
        page.mouse.up()


def canvas_pixels(page) -> str:
    return page.locator("#picture canvas").evaluate("canvas => canvas.toDataURL()")


def use_the_picture(page):
    """Hover tells a patch's partition, cell, score and fate; the views, the scores and the zoom work."""
    view = page.locator("#picture .tdx-view")
    box = view.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
    fate = (
        r"token \d+: crop \d,\d, cell \(row \d+, col \d+\), pixels x \d+-\d+, y \d+-\d+; score [-\d.e]+; (kept|dropped)"
    )
    expect(page.locator("#picture .tdx-tip")).to_have_text(re.compile(fate))
    page.locator("#picture").get_by_role("button", name="thumbnail").click()
    expect(page.locator("#picture [data-view]")).to_have_attribute("data-view", "thumbnail")
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    expect(page.locator("#picture .tdx-tip")).to_have_text(re.compile(r"token \d+: base, cell"))
    page.locator("#picture").get_by_role("button", name="scores").click()
    expect(page.locator("#picture .tdx-scale")).to_be_visible()
    page.locator("#picture").get_by_role("button", name="kept / dropped").click()
    page.locator("#picture").get_by_role("button", name="crops").click()
    page.get_by_role("button", name="zoom in").click()
    zoom = page.locator("#picture [data-zoom]")
    expect(zoom).to_have_attribute("data-zoom", "1.500")
    canvas = page.locator("#picture canvas")
    moved = canvas.evaluate("c => c.style.transform")
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 160, box["y"] + 130, steps=5)
    page.mouse.up()
    assert canvas.evaluate("c => c.style.transform") != moved  # dragged: panned
    line, before = page.locator("#picture .tdx-count"), page.locator("#picture .tdx-count").text_content()
    page.get_by_label(f"range slider for {BUDGET}").press("ArrowRight")
    expect(line).not_to_have_text(before)
    expect(zoom).to_have_attribute("data-zoom", "1.500")  # the zoom stays while the budget moves
    page.get_by_role("button", name="fit the picture").click()


TABS = ["Kept vs dropped", "Budget", "PNG files", "Steps", "Layers", "Two methods", "Sweep", "Animation", "Accuracy"]
TABS += ["Video"]


def every_tab_in_reach(page):
    """At 1400 px every tab is in sight; at 400 px each is in sight or in its row's overflow menu."""
    for name in TABS:
        expect(page.get_by_role("tab", name=name, exact=True)).to_be_visible()
    page.set_viewport_size({"width": 400, "height": 900})
    expect(page.get_by_role("tab", name="Steps", exact=True)).to_be_hidden()  # the row no longer fits
    found = {tab.text_content().strip() for tab in page.get_by_role("tab").all() if tab.is_visible()}
    for row in page.locator(".tab-wrapper").all():
        menu = row.get_by_role("button", name="More tabs")
        if menu.is_visible():
            menu.click()
            found |= {item.text_content().strip() for item in row.locator(".overflow-dropdown button").all()}
            menu.click()
    assert found == set(TABS)
    page.set_viewport_size({"width": 1400, "height": 1000})


def on_a_phone(page):
    """At 400 px the columns stack, the budget sits right above the picture, and nothing is cut off."""
    page.set_viewport_size({"width": 400, "height": 900})
    slider = page.get_by_label(f"range slider for {BUDGET}")
    slider.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate(SCROLLING_SIDEWAYS) == []  # no box on the page hides part of itself sideways either
    gap = page.locator("#picture canvas").bounding_box()["y"] - slider.bounding_box()["y"]
    assert 0 < gap < 400, gap  # slider and picture fit on one screen
    width = page.locator("#picture canvas").bounding_box()["width"]
    assert 300 < width <= 400
    page.evaluate("y => window.scrollBy(0, y)", slider.bounding_box()["y"] - 60)
    page.screenshot(path=ARTIFACTS / "preview-400.png")


SCROLLING_SIDEWAYS = """() => [...document.querySelectorAll('*')]
    .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX) && e.clientWidth > 10)
    .filter(e => e.scrollWidth > e.clientWidth + 1)
    .map(e => e.className.toString())"""


def see_the_results(page):
    expect(page.get_by_text("random weights")).to_be_visible(timeout=120_000)  # the model loaded
    page.locator("input[type=file]").first.set_input_files(str(ROOT / "assets" / "coffee.jpg"))
    expect(page.get_by_text("of 2144 visual tokens kept (20%) for this 600x400 image")).to_be_visible(timeout=60_000)

    page.get_by_label("Method").click()
    page.get_by_role("option", name="hired:").click()
    slider = page.get_by_label("number input for Budget: % of the visual tokens")
    slider.fill("20")
    slider.press("Enter")
    expect(page.get_by_text("of 2144 visual tokens kept (20%) for this 600x400 image")).to_be_visible()
    page.get_by_role("button", name="Run").click()

    expect(page.get_by_text(" tokens/s · full: ")).to_be_visible(timeout=120_000)  # both runs are done
    expect(page.get_by_role("row", name="visual tokens 428 2144 0.20x")).to_be_visible()
    expect(page.locator("#picture .tdx-count")).to_have_text("428 of 2144 visual tokens kept (the last run)")
    page.get_by_role("tab", name="PNG files").click()
    expect(page.get_by_text("thumbnail: 214 of 576 kept")).to_be_visible()
    overlay = page.get_by_role("tabpanel").locator("img").first
    expect(overlay).to_be_visible()
    assert overlay.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [600, 400]
    assert page.get_by_label("Reduced answer").input_value() != ""
    bars = page.locator("#stages svg.stages rect[height='22']")  # where the time went: 5 stages, reduced and full
    expect(bars).to_have_count(10)
    assert all(box["width"] > 0 for box in bars.evaluate_all("all => all.map(b => b.getBoundingClientRect())")[:2])
    expect(page.locator("#stages")).to_contain_text("A method that acts before the LLM shortens only the prefill")
    every_caption_in_full(page)

    page.get_by_role("tab", name="Kept vs dropped").click()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert SCREENSHOT.stat().st_size > 50_000


def every_caption_in_full(page):
    """The Steps tab shows each step's whole caption, at 1500 px and at 400 px."""
    page.get_by_role("tab", name="Steps").click()
    captions = page.locator("#steps figcaption")
    expect(captions.first).to_be_visible()
    for width in (1500, 400):
        page.set_viewport_size({"width": width, "height": 1300})
        assert captions.count() >= 4
        clipped = captions.evaluate_all(
            "all => all.filter(c => c.scrollWidth > c.clientWidth || c.scrollHeight > c.clientHeight).length"
        )
        assert clipped == 0
        assert "content map" in captions.first.text_content() or len(captions.first.text_content()) > 80
    page.set_viewport_size({"width": 1500, "height": 1300})


def test_video_mode_scrubs_plays_previews_and_runs_a_clip_at_1400_and_400_px(browser, clip_session):
    from ui.video import example

    clip = example()  # 24 frames of moving shapes, 256x192
    demo, url = app.serve(clip_session, prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    try:
        expect(page.get_by_text("random weights")).to_be_visible(timeout=120_000)  # the model loaded
        page.get_by_role("tab", name="Video", exact=True).click()
        page.locator("#clip input[type=file]").set_input_files(str(clip))
        line = page.locator("#clip-picture .tdx-count")  # 8 frames (the CPU's default) of 196 tokens, a newline
        expect(line).to_have_text("313 of 1569 visual tokens kept (20%) · frame 0 shown", timeout=60_000)
        expect(page.locator("#clip-strip figure")).to_have_count(8)
        expect(page.get_by_text("Audio is ignored")).to_be_visible()
        set_number(page, "Frame", 3)
        expect(line).to_have_text("313 of 1569 visual tokens kept (20%) · frame 3 shown")
        expect(page.locator("#clip-strip figure.chosen")).to_have_attribute("data-frame", "3")
        page.get_by_role("button", name="▶ Play").click()
        expect(line).to_have_text(re.compile(r"frame [4-7] shown"), timeout=20_000)  # it plays on by itself
        page.get_by_role("button", name="⏸ Pause").click()
        set_number(page, "Budget: % of the clip's visual tokens", 40)
        expect(line).to_have_text(re.compile(r"627 of 1569 visual tokens kept \(40%\) · frame \d shown"))
        page.get_by_role("button", name="Run on the clip").click()
        expect(page.locator("#video-mode").get_by_text(" · full: ")).to_be_visible(timeout=180_000)  # both runs
        expect(line).to_have_text(re.compile(r"627 of 1569 visual tokens kept \(the last run\) · frame \d shown"))
        assert page.get_by_label("Reduced answer (clip)").input_value() != ""
        page.get_by_role("tab", name="Waterfall").click()
        expect(page.locator("#video-mode .js-plotly-plot >> visible=true")).to_have_count(1)  # the waterfall
        see_a_video_method_s_steps_and_the_stage_bars(page)
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#video-mode").screenshot(path=ARTIFACTS / "video-1400.png")
        compare_two_methods_and_download_the_report(page)
        page.set_viewport_size({"width": 400, "height": 900})
        page.locator("#clip-picture canvas").scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        sideways = page.evaluate(
            SCROLLING_SIDEWAYS
        )  # the numbers table scrolls in its own box, as after an image's run
        own = ("virtual-table-viewport", "file-preview-holder")  # the table's and the report files' own boxes
        assert [box for box in sideways if not any(name in box for name in own)] == []
        assert 250 < page.locator("#clip-picture canvas").bounding_box()["width"] <= 400
        page.screenshot(path=ARTIFACTS / "video-400.png")
    finally:
        demo.close()


def see_a_video_method_s_steps_and_the_stage_bars(page):
    """After a run on the clip: what the method did, in words, and where the time went; then DyCoke's windows
    under the strip, and after its run, its decode-time cut against the KV cache."""
    expect(page.locator("#clip-steps")).to_contain_text("What uniform did on your clip")
    bars = page.locator("#clip-stages svg.stages")
    bars.scroll_into_view_if_needed()
    expect(bars).to_be_visible()
    expect(bars.locator("text", has_text="full")).to_have_count(1)  # the reduced and the full run's bars
    page.get_by_label("Method (video methods only here)").click()
    page.get_by_role("option", name="dycoke:").click()
    bands = page.locator("#clip-strip .clip-band")
    expect(bands).to_have_count(8)  # one under each frame, labelled where a window of 4 frames starts
    expect(bands.first).to_have_text("window 0: frames 0-3")
    expect(bands.nth(4)).to_have_text("window 1: frames 4-7")
    expect(page.locator("#clip-steps")).to_contain_text("TTM compared 5 frames with a reference frame")
    page.get_by_role("button", name="Run on the clip").click()
    expect(page.locator("#clip-steps")).to_contain_text("While decoding, at", timeout=180_000)
    page.get_by_role("tab", name="Decode: the KV cache").click()
    expect(page.locator("#video-mode .js-plotly-plot >> visible=true")).to_have_count(1)  # the decode chart
    expect(page.locator("#video-mode").get_by_text("in the KV cache")).to_be_visible()  # its legend


def compare_two_methods_and_download_the_report(page):
    """The last run's report, then DyCoke (A, the method picked) against uniform (B) on every frame."""
    expect(page.locator("#video-mode").get_by_text(" · full: ")).to_be_visible(timeout=180_000)  # the run ended
    page.locator("#video-mode").get_by_role("button", name="Download report").click()
    expect(page.locator("#video-mode").get_by_text(re.compile(r"^dycoke-\d+$")).first).to_be_visible(timeout=30_000)
    page.get_by_text("Two methods on the clip").click()
    page.get_by_role("button", name="Compare on the clip").click()
    pairs = page.locator("#clip-versus figure")
    expect(pairs).to_have_count(8, timeout=180_000)
    expect(pairs.first).to_contain_text(re.compile(r"frame 0\s*both \d+, only A \d+, only B \d+, neither \d+"))
    assert page.get_by_label("Answer B").input_value() != ""
    page.locator("#clip-versus").screenshot(path=ARTIFACTS / "video-versus.png")


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")
