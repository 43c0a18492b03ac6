"""Overlays, heatmaps and clicks on a hand-made geometry, where every expected pixel is known."""

import numpy as np
import torch
from conftest import toy_geometry
from PIL import Image

from explorer import visual as vis
from explorer.core import Geometry, Selection

GREY = Image.new("RGB", (80, 80), (200, 200, 200))


def test_the_thumbnail_and_the_crops_are_separate_views_and_newlines_are_in_none():
    g = toy_geometry()
    views = vis.views(g)
    assert list(views) == ["thumbnail", "crops"]
    assert views["thumbnail"].tolist() == list(range(16))
    assert len(views["crops"]) == 64 and not (g.partition[views["crops"]] == 5).any()
    single = Geometry(("image",), torch.zeros(4, dtype=torch.long), g.cells[:4], g.boxes[:4], (80, 80))
    assert list(vis.views(single)) == ["image"]


def test_kept_patches_stay_dropped_ones_dim_and_the_line_sits_on_the_dropped_side():
    g = toy_geometry()
    shown = np.asarray(vis.overlay(GREY, g, Selection(keep=torch.tensor([5])), torch.arange(16)), dtype=int)
    # token 5 is the thumbnail cell (row 1, col 1): pixels 20..40 both ways
    assert (shown[20:40, 20:40] == 200).all()
    assert (shown[0:18, 0:18] == round(200 * vis.DIM)).all()  # dropped, away from any kept patch
    assert tuple(shown[19, 30]) == vis.KEPT and tuple(shown[40, 30]) == vis.KEPT  # just outside, above and below
    assert tuple(shown[30, 19]) == vis.KEPT and tuple(shown[30, 40]) == vis.KEPT


def test_merged_patches_take_their_groups_colour():
    g = toy_geometry()
    groups = torch.full((len(g),), -1)
    groups[[0, 1]] = 0  # token 0 kept, token 1 merged into it
    groups[[3, 2]] = 3  # token 3 kept, token 2 merged into it
    selection = Selection(keep=torch.tensor([0, 3]), groups=groups)
    shown = np.asarray(vis.overlay(GREY, g, selection, torch.arange(16)), dtype=int)
    colours = vis.palette(2)
    a, b = (0.5 * 200 * vis.DIM + 0.5 * colours).round().astype(int)
    assert (shown[5:15, 25:35] == a).all() and (shown[5:15, 45:55] == b).all()  # tokens 1 and 2
    assert (shown[25:35, 5:15] == round(200 * vis.DIM)).all()  # token 4 dropped, not merged
    assert not np.array_equal(a, b)


def test_heatmap_colours_follow_rank_and_leave_unscored_patches_alone():
    g = toy_geometry()
    scores = torch.full((len(g),), float("nan"))
    scores[:16] = torch.tensor([1000.0] + [float(i) for i in range(1, 16)])  # one outlier cannot wash the rest out
    scores[3] = float("nan")
    heat = np.asarray(vis.heatmap(GREY, g, scores, torch.arange(16)), dtype=float)
    assert heat.shape[:2][1] == 80 and heat.shape[0] > 80  # the colour scale sits under the image
    brightness = [heat[20 * (t // 4) + 10, 20 * (t % 4) + 10].sum() for t in (1, 2, 4, 8, 15, 0)]
    assert brightness == sorted(brightness)  # rank order, the outlier brightest
    assert (heat[5:15, 65:75] == 200).all()  # token 3 has no score


def test_a_click_finds_the_token_under_it_and_tells_its_fate():
    g = toy_geometry()
    groups = torch.full((len(g),), -1)
    groups[[16, 17]] = 16
    selection = Selection(keep=torch.tensor([16]), scores=torch.arange(len(g)).float(), groups=groups)
    crops = vis.views(g)["crops"]
    assert vis.token_at(g, crops, 5, 5) == 16 and vis.token_at(g, crops, 15, 5) == 17
    assert vis.token_at(g, crops, 80, 80) is None
    assert vis.describe(g, selection, 17) == (
        "token 17: crop 0,0, cell (row 0, col 1), pixels x 10-20, y 0-10; score 17; merged into token 16"
    )
    assert vis.describe(g, selection, 16).endswith("score 16; kept")
    assert vis.describe(g, selection, 18).endswith("dropped")


def test_big_images_are_drawn_smaller_and_clicks_scale_back():
    g = toy_geometry()
    big = Geometry(g.names, g.partition, g.cells, g.boxes * 100, (8000, 8000))
    assert vis.display_size(big) == (vis.DISPLAY, vis.DISPLAY)
    picture = vis.overlay(Image.new("RGB", (8000, 8000)), big, Selection(keep=torch.tensor([0])), torch.arange(16))
    assert picture.size == (vis.DISPLAY, vis.DISPLAY)
    assert vis.token_at(big, torch.arange(16), vis.DISPLAY - 1, vis.DISPLAY - 1) == 15


def test_every_method_has_teaching_text():
    from explorer.methods import METHODS

    for name, cls in METHODS.items():
        text = vis.explain(name)
        assert text.startswith(f"**{cls.summary}**") and len(text) > 100
    assert "vision layer 0" in vis.explain("hired") and "Differs from the paper" in vis.explain("hired")
