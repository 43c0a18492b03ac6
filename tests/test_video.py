"""Video files through `load_video`: clips written here with PyAV's encoders (and PIL for GIF), each frame
drawing its own index, so the test sees which frames came back, in which order and at which times."""

import dataclasses
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from explorer import ExplorerError
from explorer.engine import images, video
from explorer.engine.video import MAX_FRAMES, default_frames, frame_indices, load_video

WIDTH, HEIGHT, RATE = 64, 32, 10  # 8 columns of 8 px: bit b of the frame's index is column b, white if set


def drawn(index: int) -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: the frame that shows `index` in binary."""
    bits = np.array([(index >> b) & 1 for b in range(8)], dtype=np.uint8) * 255
    return np.repeat(np.repeat(bits[None, :, None], 8, axis=1), HEIGHT, axis=0).repeat(3, axis=2)


def shown(image: Image.Image) -> int:
    """The index a decoded frame draws (column means read as bits, so codec noise does not matter)."""
    columns = np.asarray(image.convert("L"), dtype=np.float64).mean(axis=0).reshape(8, -1).mean(axis=1)  # (8,)
    return sum(1 << b for b, level in enumerate(columns) if level > 128)


def write(path: Path, codec: str, count: int = 30, audio: str | None = None, **options) -> Path:
    """A clip of `count` drawn frames at RATE fps, with one second of silence in `audio` if given."""
    if codec == "gif":
        frames = [Image.fromarray(drawn(i)) for i in range(count)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // RATE, loop=0)
        return path
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream(audio, rate=48000) if audio else None
        for i in range(count):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(drawn(i), format="rgb24")))
        container.mux(stream.encode())
        if sound:
            write_silence(container, sound)
    return path


def write_silence(container, stream) -> None:
    samples = np.zeros((1, 48000), dtype=np.int16 if stream.codec_context.name == "pcm_s16le" else np.float32)
    frame = av.AudioFrame.from_ndarray(samples, format="s16" if samples.dtype == np.int16 else "fltp", layout="mono")
    frame.sample_rate = 48000
    container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_audio(path: Path, codec: str) -> Path:
    """An audio-only file."""
    with av.open(str(path), "w") as container:
        write_silence(container, container.add_stream(codec, rate=48000))
    return path


CLIPS = [
    ("mp4", "libx264"),
    ("mp4", "mpeg4"),
    ("webm", "libvpx"),
    ("webm", "libvpx-vp9"),
    ("mov", "mpeg4"),
    ("mkv", "libx264"),
    ("gif", "gif"),
]


@pytest.mark.parametrize("suffix,codec", CLIPS)
def test_uniform_frames_come_back_in_order_with_their_times(tmp_path, suffix, codec):
    path = write(tmp_path / f"clip.{suffix}", codec)  # 30 frames, 3 s
    clip = load_video(path, frames=8)
    assert clip.indices == [0, 3, 7, 11, 15, 18, 22, 26]  # arange(8) * 30 // 8
    assert [shown(f) for f in clip.frames] == clip.indices
    assert clip.times_s == pytest.approx([i / RATE for i in clip.indices])
    assert clip.fps == pytest.approx(RATE)
    assert clip.duration_s == pytest.approx(3.0)
    assert clip.size == (WIDTH, HEIGHT) and all(f.size == clip.size and f.mode == "RGB" for f in clip.frames)
    assert clip.audio is False


def test_sampling_is_transformers_default(tmp_path):
    """Same indices as transformers' default sampler, and the same pixels as its own PyAV `load_video`."""
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    from transformers.video_utils import load_video as stock_load_video

    for total in [*range(1, 130), 999, 1000, 27000]:
        for count in range(1, min(total, MAX_FRAMES) + 1):
            stock = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=count)
            assert frame_indices(total, count) == stock.tolist(), (total, count)
    for fps in (0.5, 1, 2.5, 5):  # 12 s: up to 60 frames, under the cap
        stock = default_sample_indices_fn(VideoMetadata(total_num_frames=300, fps=25.0), fps=fps)
        assert frame_indices(300, video.frames_at(fps, 300, 25.0)) == stock.tolist()
    path = write(tmp_path / "clip.mp4", "libx264")
    pixels, metadata = stock_load_video(str(path), num_frames=8, backend="pyav")  # (8, HEIGHT, WIDTH, 3)
    clip = load_video(path, frames=8)
    assert clip.indices == metadata.frames_indices.tolist()
    assert np.array_equal(np.stack([np.asarray(f) for f in clip.frames]), pixels)


def test_fps_sampling_and_its_cap(tmp_path, monkeypatch):
    path = write(tmp_path / "clip.mkv", "libx264")  # 30 frames at 10 fps, no frame count in the header
    clip = load_video(path, fps=2)
    assert clip.indices == [0, 5, 10, 15, 20, 25] and [shown(f) for f in clip.frames] == clip.indices
    assert clip.times_s == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    assert load_video(path, fps=100).indices == list(range(30))  # more than the clip has: all of it
    monkeypatch.setattr(video, "MAX_FRAMES", 4)
    assert load_video(path, fps=5).indices == [0, 7, 15, 22]  # 15 frames at 5 fps, capped at 4 over the clip


def test_decoding_stops_at_the_last_wanted_frame(tmp_path):
    frames, decoded = video._decode(write(tmp_path / "clip.mp4", "libx264"), [0, 3, 7])
    assert [shown(image) for image, _ in frames] == [0, 3, 7] and decoded == 8  # of 30


def test_fewer_frames_than_asked_gives_all_of_them(tmp_path):
    clip = load_video(write(tmp_path / "short.mp4", "libx264", count=5), frames=8)
    assert clip.indices == [0, 1, 2, 3, 4] and [shown(f) for f in clip.frames] == [0, 1, 2, 3, 4]


def test_default_count_follows_the_device(tmp_path):
    assert default_frames("cpu") == 8 and default_frames("cuda") == 16 and default_frames("cuda:1") == 16
    path = write(tmp_path / "clip.webm", "libvpx")
    assert len(load_video(path).frames) == 8
    assert load_video(path, device="cuda").indices == [i * 30 // 16 for i in range(16)]


@pytest.mark.parametrize(
    "suffix,codec,audio", [("mkv", "libx264", "aac"), ("mp4", "mpeg4", "aac"), ("webm", "libvpx", "libopus")]
)
def test_audio_is_noticed_and_ignored(tmp_path, suffix, codec, audio):
    clip = load_video(write(tmp_path / f"talk.{suffix}", codec, audio=audio), frames=4)
    assert clip.audio is True
    assert [shown(f) for f in clip.frames] == clip.indices == [0, 7, 15, 22]


def test_times_count_from_the_stream_start(tmp_path):
    """A stream whose first frame is presented at 2 s (as in a clip cut from a longer recording)."""
    path = tmp_path / "late.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(drawn(i), format="rgb24")
            frame.pts, frame.time_base = 2 * RATE + i, Fraction(1, RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip = load_video(path, frames=4)
    assert [shown(f) for f in clip.frames] == clip.indices == [0, 2, 5, 7]
    assert clip.times_s == pytest.approx([0.0, 0.2, 0.5, 0.7])


def test_phone_rotation_is_undone(tmp_path):
    """A tkhd display matrix of 90 degrees clockwise (as phones write): frames come back upright."""
    path = write(tmp_path / "clip.mp4", "libx264", count=4)
    data = path.read_bytes()
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.rfind(identity)  # the track's matrix (the movie header's comes first)
    rotated = tmp_path / "rotated.mp4"
    rotated.write_bytes(
        data[:at] + struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000) + data[at + 36 :]
    )
    plain, turned = load_video(path), load_video(rotated)
    assert turned.size == (HEIGHT, WIDTH)
    for a, b in zip(plain.frames, turned.frames):
        assert np.array_equal(np.asarray(b), np.rot90(np.asarray(a), k=-1))  # turned clockwise


def test_a_stream_shorter_than_its_header_is_sampled_over_what_is_there(tmp_path, monkeypatch):
    """As when an edit list drops frames the header counts: the header here says 40 frames, the stream has 30."""
    header = video._header
    monkeypatch.setattr(video, "_header", lambda *args: dataclasses.replace(header(*args), total=40, duration_s=4.0))
    clip = load_video(write(tmp_path / "clip.mp4", "libx264"), frames=4)
    assert clip.indices == [0, 7, 15, 22] and [shown(f) for f in clip.frames] == clip.indices  # arange(4) * 30 // 4
    assert clip.duration_s == pytest.approx(3.0)


def test_a_cut_file_with_its_index_first_fails_where_the_data_stops(tmp_path):
    path = write(tmp_path / "clip.mp4", "mpeg4", movflags="faststart")  # the index before the frames
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ExplorerError, match=r"cut.mp4 is corrupt: frame \d+ could not be decoded"):
        load_video(cut, frames=4)


def test_bad_files_get_one_clear_message_each(tmp_path):
    def refused(path, message):
        with pytest.raises(ExplorerError, match=message):
            load_video(path)

    refused(tmp_path / "missing.mp4", "no video file at")
    (tmp_path / "empty.mp4").write_bytes(b"")
    refused(tmp_path / "empty.mp4", r"empty \(0 bytes\)")
    whole = write(tmp_path / "whole.mp4", "libx264").read_bytes()  # its index is at the end, cut off here
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    refused(tmp_path / "cut.mp4", "corrupt or truncated")
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    refused(tmp_path / "notes.mp4", "is not a video this app can read")
    Image.fromarray(drawn(3)).save(tmp_path / "photo.jpg")
    refused(tmp_path / "photo.jpg", "is an image, not a video")
    for suffix, codec in [("m4a", "aac"), ("ogg", "libvorbis"), ("wav", "pcm_s16le")]:
        refused(write_audio(tmp_path / f"sound.{suffix}", codec), "has only audio, no video stream")
    refused(write(tmp_path / "silent.mkv", "libx264", count=0, audio="aac"), "has a video stream with no frames")


def test_an_unknown_codec_is_named_as_such(tmp_path):
    """FFmpeg reads a Matroska CodecID it does not know as a stream with no decoder: the same path as a codec
    this PyAV wheel was built without."""
    data = write(tmp_path / "clip.mkv", "mpeg4").read_bytes()
    assert data.count(b"V_MPEG4/ISO/ASP") == 1
    (tmp_path / "odd.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/ASP", b"V_MPEG4/ISO/XYZ"))
    with pytest.raises(ExplorerError, match="uses a video codec this app cannot decode"):
        load_video(tmp_path / "odd.mkv")


def no_decoding(*args):
    raise AssertionError("a frame was decoded")


def test_huge_frames_are_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "_decode", no_decoding)
    data = bytearray(write(tmp_path / "clip.gif", "gif", count=3).read_bytes())
    data[6:10] = struct.pack("<HH", 12000, 12000)  # the GIF's logical screen: 144 megapixels
    (tmp_path / "huge.gif").write_bytes(bytes(data))
    with pytest.raises(ExplorerError, match="too large: its frames are 12000x12000, 144 megapixels, the limit is 100"):
        load_video(tmp_path / "huge.gif")
    monkeypatch.setattr(images, "MAX_PIXELS", WIDTH * HEIGHT - 1)
    with pytest.raises(ExplorerError, match=f"its frames are {WIDTH}x{HEIGHT}"):
        load_video(write(tmp_path / "clip.webm", "libvpx"))


def test_a_clip_s_pixels_are_limited_together_before_decoding(tmp_path, monkeypatch):
    assert video.MAX_CLIP_PIXELS == 64 * 1920 * 1080  # 64 full-HD frames; 4K (3840x2160) gets 16
    assert video.MAX_CLIP_PIXELS // (3840 * 2160) == 16 < video.MAX_FRAMES
    path = write(tmp_path / "clip.mp4", "libx264")  # 30 frames of 64x32 = 2048 pixels
    monkeypatch.setattr(video, "MAX_CLIP_PIXELS", 8 * WIDTH * HEIGHT)
    assert len(load_video(path, frames=8).frames) == 8
    monkeypatch.setattr(video, "_decode", no_decoding)
    message = "9 frames of 64x32 are 0 megapixels, more than the 0 a clip may hold; ask for at most 8 frames"
    with pytest.raises(ExplorerError, match=message):
        load_video(path, frames=9)
    with pytest.raises(ExplorerError, match="ask for at most 8 frames"):
        load_video(path, fps=4.0)  # 12 frames


@pytest.mark.parametrize("suffix,codec", [("mp4", "libx264"), ("webm", "libvpx"), ("gif", "gif")])
def test_duration_limit(tmp_path, monkeypatch, suffix, codec):
    path = write(tmp_path / f"clip.{suffix}", codec)  # 3 s
    monkeypatch.setattr(video, "MAX_DURATION_S", 3)
    assert len(load_video(path, frames=2).frames) == 2
    monkeypatch.setattr(video, "MAX_DURATION_S", 2)
    monkeypatch.setattr(video, "_decode", no_decoding)
    with pytest.raises(ExplorerError, match="too long: 3 s, the limit is 2 s"):
        load_video(path)


def test_duration_limit_without_a_duration_in_the_header(tmp_path, monkeypatch):
    """A live-recorded webm (a browser's MediaRecorder) has no duration: the packets are timed instead."""
    path = write(tmp_path / "clip.webm", "libvpx", live="1")
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].frames == 0
    assert load_video(path, frames=3).duration_s == pytest.approx(3.0)
    monkeypatch.setattr(video, "MAX_DURATION_S", 2)
    with pytest.raises(ExplorerError, match="too long"):
        load_video(path)


def test_byte_limit(tmp_path, monkeypatch):
    path = write(tmp_path / "clip.mp4", "libx264")
    monkeypatch.setattr(video, "MAX_VIDEO_BYTES", path.stat().st_size)
    assert len(load_video(path, frames=2).frames) == 2
    monkeypatch.setattr(video, "MAX_VIDEO_BYTES", path.stat().st_size - 1)
    with pytest.raises(ExplorerError, match="too large: .* MB, the limit for a video is"):
        load_video(path)


@pytest.mark.parametrize(
    "frames,fps",
    [(0, None), (65, None), (2.5, None), (True, None), (None, 0), (None, -1.0), (None, float("nan")), (4, 2.0)],
)
def test_bad_requests_are_refused(tmp_path, frames, fps):
    path = write(tmp_path / "clip.mp4", "libx264", count=3)
    with pytest.raises(ExplorerError, match="number of frames|frame rate"):
        load_video(path, frames=frames, fps=fps)


def test_importing_explorer_does_not_import_av():
    import subprocess
    import sys

    code = "import explorer, explorer.engine.video, sys; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
