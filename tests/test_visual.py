"""Overlays, heatmaps and clicks on a hand-made geometry, where every expected pixel is known."""

import numpy as np
import torch
from conftest import photo, toy_geometry
from PIL import Image

from explorer.core import Geometry, Selection
from explorer.views import visual as vis

GREY = Image.new("RGB", (80, 80), (200, 200, 200))


def test_the_thumbnail_and_the_crops_are_separate_views_and_newlines_are_in_none():
    g = toy_geometry()
    views = vis.views(g)
    assert list(views) == ["thumbnail", "crops"]
    assert views["thumbnail"].tolist() == list(range(16))
    assert len(views["crops"]) == 64 and not (g.partition[views["crops"]] == 5).any()
    single = Geometry(("image",), torch.zeros(4, dtype=torch.long), g.cells[:4], g.boxes[:4], (80, 80))
    assert list(vis.views(single)) == ["image"]


def dropped_look(value: int, shape=(80, 80)) -> np.ndarray:
    """(H, W, 3) how a dropped patch of a uniform grey `value` is drawn: grey at DIM, hatched."""
    dim = np.full((*shape, 3), round(value * vis.DIM))
    return np.where(vis.hatch(shape)[..., None], np.array(vis.HATCH), dim)


def test_kept_patches_stay_dropped_ones_grey_and_hatched_and_the_line_sits_on_the_dropped_side():
    g = toy_geometry()
    shown = np.asarray(vis.overlay(GREY, g, Selection(keep=torch.tensor([5])), torch.arange(16)), dtype=int)
    # token 5 is the thumbnail cell (row 1, col 1): pixels 20..40 both ways
    assert (shown[20:40, 20:40] == 200).all()
    assert (shown[0:18, 0:18] == dropped_look(200)[0:18, 0:18]).all()  # dropped, away from any kept patch
    assert 0 < vis.hatch((80, 80))[0:18, 0:18].mean() < 0.5  # hatched, not covered
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
    a, b = (0.5 * round(200 * vis.DIM) + 0.5 * colours).round().astype(int)
    assert (shown[5:15, 25:35] == a).all() and (shown[5:15, 45:55] == b).all()  # tokens 1 and 2: tinted, no hatch
    assert (shown[25:35, 5:15] == dropped_look(200)[25:35, 5:15]).all()  # token 4 dropped, not merged
    assert not np.array_equal(a, b)


def test_kept_pixels_are_the_inputs_bit_for_bit_on_any_image():
    g = toy_geometry()
    keep = torch.tensor([0, 5, 6, 15])
    for image in (photo(80, 80, seed=3), Image.new("RGB", (80, 80)), Image.new("RGB", (80, 80), "white")):
        shown = np.asarray(vis.overlay(image, g, Selection(keep=keep), torch.arange(16)))
        kept = np.isin(vis.labels(g, torch.arange(16)), keep.numpy())
        assert (shown[kept] == np.asarray(image)[kept]).all()
        assert not (shown[~kept] == np.asarray(image)[~kept]).all()


def lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB 0..255 -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# A dropped patch must read apart from a kept one at a glance. The measure: the mean CIE76 colour difference
# (Delta E*ab) between each pixel of a dropped patch as drawn and as it would be drawn if kept (the input
# pixel), the patches' outlines left out; on a uniform image that is the distance between kept and dropped
# patches. Delta E 2.3 is a just noticeable difference (Sharma, Digital Color Imaging Handbook, 2003) and
# above 5 an observer sees two different colours (Mokrzycki & Tatol, Machine Graphics & Vision 20, 2011):
# 15 asks for three times that, averaged over the whole patch, hatch lines and all.
READABLE = 15.0


def contrast(image: Image.Image, drawn) -> float:
    g = toy_geometry()
    keep = torch.tensor([0, 5, 10, 15])  # a diagonal: every dropped patch but a few touches no kept one
    label = vis.labels(g, torch.arange(16))
    out = np.asarray(drawn(image, g, Selection(keep=keep), torch.arange(16)))
    dropped = (label >= 0) & ~np.isin(label, keep.numpy())
    pad = np.pad(np.isin(label, keep.numpy()), 1)
    outline = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    where = dropped & ~outline
    return float(np.linalg.norm(lab(out[where]) - lab(np.asarray(image.convert("RGB"))[where]), axis=-1).mean())


def test_dropped_patches_read_apart_from_kept_ones_on_black_white_and_noisy_images():
    images = {
        "black": Image.new("RGB", (80, 80)),
        "white": Image.new("RGB", (80, 80), "white"),
        "noise": photo(80, 80, seed=1),
        "mid grey": Image.new("RGB", (80, 80), (128, 128, 128)),
    }
    for name, image in images.items():
        assert contrast(image, vis.overlay) > READABLE, name

    def dimmed_only(image, g, selection, tokens):  # the old style: dropped patches at 28% brightness
        out = np.asarray(image, dtype=np.float32).copy()
        dropped = np.isin(vis.labels(g, tokens), selection.keep.numpy(), invert=True)
        out[dropped] *= 0.28
        return Image.fromarray(out.round().astype(np.uint8))

    assert contrast(images["black"], dimmed_only) < 1  # unreadable: the measure tells the two styles apart
    assert contrast(images["white"], dimmed_only) > READABLE


def test_heatmap_colours_keep_their_contrast_on_a_black_and_a_white_image():
    g = toy_geometry()
    scores = torch.full((len(g),), float("nan"))
    scores[:16] = torch.arange(16.0)
    for colour in ("black", "white"):
        heat = np.asarray(vis.heatmap(Image.new("RGB", (80, 80), colour), g, scores, torch.arange(16)))
        centres = lab(np.array([heat[20 * (t // 4) + 10, 20 * (t % 4) + 10] for t in range(16)]))
        steps = np.linalg.norm(np.diff(centres[[0, 5, 10, 15]], axis=0), axis=-1)  # a third of the ranks apart
        assert (steps > READABLE).all(), (colour, steps)
        assert (np.diff(centres[:, 0]) > 0).all()  # lightness follows rank


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
