"""Bad and odd input through the library: unreadable files, every image mode, bad models."""

import json
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from conftest import photo
from PIL import Image, ImageFile

import backends
from explorer import ExplorerError, load_image, run
from explorer.engine.images import MAX_PIXELS


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG that claims the given size (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no image file at"),
        (b"", r"is empty \(0 bytes\)"),
        (b"this is not an image, just some text", "is not an image this app can read"),
        (png_header(11_000, 10_000), "is too large: 11000x10000 is 110 megapixels, the limit is 100"),
        (png_header(20_000, 20_000), "is too large: over 100 megapixels"),
        (png_header(200, 100), "could not be decoded"),  # a header and no pixels
    ],
)
def test_unreadable_files_get_one_clear_message(tmp_path, content, message, monkeypatch):
    path = tmp_path / "upload.png"
    if content is not None:
        path.write_bytes(content)
    decoded = []  # the size of every image whose pixels were allocated and decoded
    load = ImageFile.ImageFile.load

    def spy(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ExplorerError, match=message):
        load_image(path)
    assert all(width * height <= MAX_PIXELS for width, height in decoded), decoded  # refused before any large decode
    if "could not be decoded" in message:
        assert (200, 100) in decoded  # the spy sees decodes: this small one was tried, and failed


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_is_refused(tmp_path, fmt, monkeypatch):
    # PIL's default, which the app runs with; importing lmms-eval (test_eval does, in this process) sets it
    # to True for the whole process, so that an evaluation reads a truncated image as lmms-eval's models do
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    path = tmp_path / f"cut.{fmt.lower()}"
    photo(300, 200).save(path, fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExplorerError, match="could not be decoded"):
        load_image(path)


def test_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_a_palette_with_a_transparent_colour_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert np.asarray(load_image(tmp_path / "deep.png")).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]


@pytest.mark.parametrize(
    "mode, fmt",
    [
        ("L", "PNG"),
        ("1", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("RGB", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_every_common_mode_and_format_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    photo(30, 20).convert(mode).save(path, fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)


def test_exif_rotation_is_undone(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo(40, 20).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


@pytest.mark.parametrize(
    "image", [Image.new("RGB", (1, 1), "red"), Image.new("I;16", (3000, 2)), photo(2, 2000), Image.new("RGBA", (9, 9))]
)
def test_tiny_thin_and_odd_images_run_end_to_end(backend, image):
    result = run(backend, image, "What is this?", "hired", 0.2, max_new_tokens=1)
    assert result.done and result.tokens["visual_kept"] >= 1


@pytest.mark.parametrize(
    "model, message",
    [
        ("explorer-tests/not-a-cached-model", "not a local folder and could not be loaded from the Hugging Face cache"),
        ("/nonexistent/checkpoint", r"not a checkpoint folder \(no such folder\)"),
        ("./also/missing", r"no such folder"),
    ],
)
def test_models_that_cannot_be_found_are_named_with_a_way_out(model, message, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ExplorerError, match=message) as error:
        backends.load(model, "cpu")
    if "cache" in message:
        assert "--model PATH" in str(error.value) and "--model tiny-llava-next" in str(error.value)


def test_without_network_an_uncached_hub_id_fails_at_once(tmp_path, monkeypatch):
    def no_dns(*args):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as on a user's machine
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    waits, sleep, caller = [], time.sleep, threading.get_ident()

    def no_wait(seconds):  # huggingface_hub's retries back off with time.sleep: counted, and not waited here
        if threading.get_ident() != caller:
            return sleep(seconds)
        waits.append(seconds)

    monkeypatch.setattr(time, "sleep", no_wait)
    with pytest.raises(ExplorerError, match=r"\(huggingface.co cannot be reached\).*--model tiny-llava-next"):
        backends.load("llava-hf/llava-v1.6-vicuna-7b-hf", "cpu")
    assert waits == []  # no retry: huggingface_hub's would have backed off for 1, 2, 4, 8, 8 s


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ExplorerError, match="has no config.json, so it is not a Hugging Face checkpoint folder"):
        backends.load(str(tmp_path), "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ExplorerError, match="is not a checkpoint transformers recognises"):
        backends.load(str(tmp_path), "cpu")


def test_a_checkpoint_of_another_family_is_named(tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    families = (
        "llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe, idefics3, smolvlm, "
        "llava, gemma3, internvl"
    )
    with pytest.raises(ExplorerError, match=f"is a 'llama' checkpoint; the explorer runs {families} checkpoints"):
        backends.load(str(tmp_path), "cpu")


def test_a_checkpoint_without_weights_is_named(tmp_path, checkpoint):
    (tmp_path / "config.json").write_text((Path(checkpoint) / "config.json").read_text())
    with pytest.raises(ExplorerError, match="could not load"):
        backends.load(str(tmp_path), "cpu")


def test_a_hub_id_in_the_local_cache_loads_without_network(tmp_path, monkeypatch, checkpoint):
    repo = tmp_path / "models--explorer-tests--tiny-llava-next"
    shutil.copytree(checkpoint, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    backend = backends.load("explorer-tests/tiny-llava-next", "cpu")
    assert backend.name == "explorer-tests/tiny-llava-next" and not backend.random_weights
    assert run(backend, photo(64, 64), "hi", "hired", max_new_tokens=1).done


def test_a_local_folder_loads_through_the_same_path_as_the_hub(backend, checkpoint):
    local = backends.load(checkpoint, "cpu")
    assert not local.random_weights and local.name == checkpoint
    image = photo(640, 480)
    assert (
        run(local, image, "hi", "hired", max_new_tokens=8).answer_ids
        == run(backend, image, "hi", "hired", max_new_tokens=8).answer_ids
    )
