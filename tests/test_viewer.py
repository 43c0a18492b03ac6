"""The browser's picture (assets/viewer) alone on a page of Debian's headless Chromium, fed `viewer.scene` and
`viewer.value` as Gradio feeds it: its hover text is `visual.describe`'s word for word, and its look comes
from the scene's style (explorer/views/style.py), the one the PIL pictures are drawn with."""

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, toy_geometry
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from explorer.core import Selection
from explorer.views import style, viewer
from explorer.views import visual as vis
from explorer.views.preview import preview

VIEWER = {
    part: (Path(__file__).parent.parent / "assets" / "viewer" / f"viewer.{part}").read_text()
    for part in ("html", "css", "js")
}

# What gr.HTML does with the viewer: its HTML in `element`, its JS run once with `props`, `server` and `watch`
MOUNT = """([js, scene]) => {
    const element = document.getElementById('picture'), props = {value: null}, watchers = [];
    window.show = (value) => { props.value = value; watchers.forEach((f) => f()); };
    const server = {scene: async (key) => (key === scene.key ? scene : null)};
    new Function('element', 'props', 'server', 'watch', js)(element, props, server, (name, f) => watchers.push(f));
}"""


@pytest.fixture(scope="module")
def page():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "the browser test needs Chromium: apt-get install -y chromium (never `playwright install`)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=found, args=[*flags, "--disable-component-update"])
        yield browser.new_page(viewport={"width": 1000, "height": 900})
        browser.close()


def shown(page, picture, g, selection: Selection) -> dict:
    """The viewer on a fresh page, showing `selection`; its scene."""
    scene = viewer.scene(picture, g, "k")
    page.set_content(f"<style>{VIEWER['css']}</style><div id='picture' style='width: 500px'>{VIEWER['html']}</div>")
    page.evaluate(MOUNT, [VIEWER["js"], scene])
    page.evaluate("value => window.show(value)", viewer.value("k", g, selection, "the line"))
    expect(page.locator("#picture")).to_have_attribute("data-draws", re.compile(r"\d+"))  # its photo loaded
    return scene


def hover(page, scene: dict, token: int) -> str:
    """Put the mouse on the middle of `token`'s patch, in the view that shows it; the hover text."""
    view = next(v for v in scene["views"] if token in array(v["tokens"], "<i4"))
    x, y = on_canvas(scene, view, token, 0.5, 0.5)
    pick(page, view["name"])
    canvas = page.locator("#picture canvas").bounding_box()
    k = canvas["width"] / view["width"]  # CSS pixels per canvas pixel
    page.mouse.move(canvas["x"] + x * k, canvas["y"] + y * k)
    return page.locator("#picture .tdx-tip").text_content()


def on_canvas(scene: dict, view: dict, token: int, fx: float, fy: float) -> tuple[float, float]:
    """The canvas pixel at (fx, fy) of the way across and down `token`'s patch, in `view`."""
    x0, y0, x1, y1 = array(scene["boxes"], "<i2").reshape(-1, 4)[token].tolist()  # on the photo
    partition = array(scene["partition"], "<u2")[token]
    panel = next(p for p in view["panels"] if p["partition"] == partition)
    return x0 + fx * (x1 - x0) + panel["dst"][0] - panel["src"][0], y0 + fy * (y1 - y0) + panel["dst"][1] - panel[
        "src"
    ][1]


def pick(page, name: str) -> None:
    page.locator("#picture .tdx-views").get_by_role("button", name=name, exact=True).click()
    expect(page.locator("#picture")).to_have_attribute("data-view", name)


def array(b64: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype)


def some_of_each_fate(g, selection: Selection) -> dict[str, list[int]]:
    """The first and the last token with a patch of each fate (the crops' tokens come after newlines)."""
    kept = torch.zeros(len(g), dtype=torch.bool)
    kept[selection.keep] = True
    into = selection.groups if selection.groups is not None else torch.full((len(g),), -1)
    boxed = ~torch.isnan(g.boxes[:, 0])
    out = {}
    for fate, where in {"kept": kept, "merged": ~kept & (into >= 0), "dropped": ~kept & (into < 0)}.items():
        tokens = (where & boxed).nonzero()[:, 0].tolist()
        out[fate] = tokens[:1] + tokens[-1:]
    return out


@pytest.mark.parametrize("method", ["visionzip", "hired"])  # one merges, one drops
def test_the_hover_text_is_describes_for_kept_merged_and_dropped_tokens(page, backend, method):
    picture = photo(600, 400, seed=4)
    made = preview(backend, picture, method, 0.2)
    g, selection = made.geometry, made.selection
    newlines = torch.isnan(g.boxes[:, 0]).nonzero()[:, 0]
    assert len(newlines) and newlines[0] < len(g) - 1  # tiny-llava-next closes each crop row with a newline token
    scene = shown(page, picture, g, selection)
    tokens = some_of_each_fate(g, selection)
    assert tokens["kept"] and tokens["merged" if method == "visionzip" else "dropped"]
    for fate, some in tokens.items():
        for token in some:
            expected = vis.describe(g, selection, token)
            assert expected.split("; ")[-1].startswith(fate)
            assert hover(page, scene, token) == expected
    assert tokens["kept"][-1] > newlines[0]  # a token after a newline too


TRICKY = [1.0625, 1.0635, 12345, 12355, 9999.5, 999.95, 1e-5, 0.00012345, -0.0, 0, 17, 2.5e10, -3.14159, 0.1]


def test_scores_are_worded_as_python_formats_them(page):
    """Ties to even, exponents, signs, zero, infinities, no score: the JS words a score as Python's `.4g`."""
    g = toy_geometry()
    scores = torch.full((len(g),), float("nan"))
    scores[:16] = torch.tensor([*TRICKY, float("inf"), float("nan")])  # the thumbnail's 16 tokens
    selection = Selection(keep=torch.tensor([0, 5]), scores=scores)
    scene = shown(page, photo(80, 80), g, selection)
    for token in range(16):
        assert hover(page, scene, token) == vis.describe(g, selection, token)


def test_the_look_and_the_legend_come_from_the_style(page):
    g = toy_geometry()
    scene = shown(page, photo(80, 80), g, Selection(keep=torch.tensor([5])))
    assert scene["style"]["kept"] == vis.KEPT and scene["style"]["hatch"]["every"] == vis.hatch_step((80, 80))
    view = scene["views"][1]
    pick(page, view["name"])
    x, y = on_canvas(scene, view, 1, 0.5, 0.95)  # token 1 is dropped, above the kept token 5: the line on its side
    drawn = page.locator("#picture canvas").evaluate(f"c => [...c.getContext('2d').getImageData({x}, {y}, 1, 1).data]")
    assert tuple(drawn[:3]) == vis.KEPT

    legend = page.locator("#picture .tdx-legend > span:not(.tdx-scale)")
    assert legend.all_text_contents() == [entry["words"] for entry in style.legend()]
    assert all(legend.locator("i").evaluate_all("all => all.map((i) => i.style.cssText)"))
    assert not re.search(r"#[0-9a-fA-F]{3,8}\b|rgba?\(\s*\d|hsla?\(\s*\d", VIEWER["js"])  # no colour of its own
    assert "background" not in VIEWER["css"].split(".tdx-legend", 1)[1]  # nor the legend's CSS


def two_frames() -> tuple:
    """A clip of two flat grey 80x80 frames, each 4x4 tokens of 20 px: tokens 0-15, then 16-31."""
    from explorer.core import Geometry
    from explorer.engine.video import Clip

    cells = torch.tensor([(r, c) for r in range(4) for c in range(4)] * 2)
    boxes = torch.tensor([(20 * c, 20 * r, 20 * c + 20, 20 * r + 20) for r, c in cells.tolist()], dtype=torch.float)
    g = Geometry(("frame 0", "frame 1"), torch.arange(2).repeat_interleave(16), cells, boxes, (80, 80))
    grey = Image.new("RGB", (80, 80), (120, 120, 120))
    return g, Clip([grey, grey], [0, 5], [0.0, 0.5], 10.0, 1.0, False)


def test_a_token_merged_into_another_frame_has_its_target_s_colour_in_both_frames(page):
    from explorer.views import clip as clips

    g, clip = two_frames()
    groups = torch.full((32,), -1)
    groups[[0, 5, 21]] = torch.tensor([0, 5, 21])  # kept
    groups[[1, 17, 18]] = torch.tensor([0, 0, 21])  # 1 and 17 (of frame 1) went into 0; 18 into 21
    selection = Selection(keep=torch.tensor([0, 5, 21]), groups=groups)
    tints = []
    for frame, token in ((0, 1), (1, 17 - 16), (1, 18 - 16)):
        scene = clips.frame_scene(clip, g, frame, f"k{frame}")
        value = clips.frame_value(f"k{frame}", g, selection, frame, "line")
        page.set_content(f"<style>{VIEWER['css']}</style><div id='picture' style='width: 500px'>{VIEWER['html']}</div>")
        page.evaluate(MOUNT, [VIEWER["js"], scene])
        page.evaluate("value => window.show(value)", value)
        expect(page.locator("#picture")).to_have_attribute("data-draws", re.compile(r"\d+"))
        x, y = on_canvas(scene, scene["views"][0], token, 0.5, 0.5)
        tints.append(
            page.locator("#picture canvas").evaluate(f"c => [...c.getContext('2d').getImageData({x}, {y}, 1, 1).data]")
        )
    assert tints[0] == tints[1] != tints[2]  # 1 and 17 share 0's colour in both frames; 18 has 21's
    assert tints[0][:3] != [120, 120, 120]  # tinted, not only greyed


def test_the_frame_strip_and_the_waterfall_count_what_the_clip_keeps():
    from explorer.views import clip as clips

    g, clip = two_frames()
    selection = Selection(keep=torch.tensor([0, 1, 2, 20]))
    strip = clips.strip(clip, g, selection, chosen=1)
    assert re.findall(r"<b>(\d+)</b> of (\d+) kept", strip) == [("3", "16"), ("1", "16")]
    assert strip.count('class="clip-frame chosen"') == 1 and "frame 1 · 0.5 s" in strip
    figure = clips.waterfall_figure(clips.Flow(2, 98, 32, 4, (32, 32, 10, 4)), "t")
    assert list(figure.data[0].x) == ["frames", "encoder patches", "visual tokens", "reach the LLM", *(
        f"LLM layer {i}" for i in range(4))]  # fmt: skip
    assert list(figure.data[0].y) == [2, 98, 32, 4, 32, 32, 10, 4]
