"""Open any video a user may give: check it before decoding, sample its frames as transformers does, make them RGB.

Decoder: PyAV (`av`), FFmpeg's libraries inside its wheels, so mp4, mov, mkv, webm and animated GIF (h264,
hevc, mpeg4, vp8/vp9, av1, gif, ...) decode with no system FFmpeg. Checked against this venv (PyAV 15.1.0,
FFmpeg 7.1.1): transformers 5.23's `video_utils.load_video` defaults to `backend="pyav"` (`read_video_pyav`);
torchvision 0.29.1's `torchvision.io` has no `read_video` (deprecated in 0.22, removed in 0.26, as
transformers' `TORCHVISION_VIDEO_DECODING_ERROR` says); decord's last release, 0.6.0, has wheels for
x86-64 Linux and Windows only (pip finds none for aarch64 Linux or Apple silicon; lmms-eval swaps in
`eva-decord` on macOS); OpenCV (here only because lmms-eval needs it) estimates frame counts, has no
presentation times, and cannot tell an audio-only file from a broken one. PyAV reports each of those.

Sampling, as transformers' default sampler (`video_utils.default_sample_indices_fn`, which the base video
processor's `sample_frames`, LLaVA-OneVision's among them, and `load_video` use): n frames of `total` are
`arange(n) * total // n`, frame 0 first, then every (total / n)-th frame, rounded down. Qwen2-VL's float32
`torch.arange(0, total, total / n)` gives the same first n, and for some (total, n) one more. At a given
`fps`, n = max(1, int(total / video_fps * fps)), as there. Two departures, both where transformers would
fail: n is capped at MAX_FRAMES (evenly spread over the whole clip, so the rate is then lower than asked;
`Clip.times_s` says when each frame is), and a video with fewer frames than asked gives all of them.
lmms-eval's loaders use `linspace(0, total - 1, n)` instead (first and last frame), and SmolVLM's processor
skips a second at each end of long clips, so "the same frames" means the same as transformers' default
sampler and `load_video`.

`total` is the stream header's frame count, as in transformers' PyAV reader; where the header has none
(mkv, webm) the packets are counted without decoding them. Frames are decoded in order and decoding stops
at the last wanted one. A stream that ends cleanly before its header says (frames an edit list drops) is
sampled again over the frames it has, and `duration_s` says so; one whose data breaks off (a cut file) is
refused as corrupt. Frames are turned upright as the stream's display matrix says (phone videos), as
`images.load_image` follows EXIF; transformers' reader does not. Audio is never decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import ExplorerError
from . import images

MAX_FRAMES = 64  # frames sampled from one clip, at most
CPU_FRAMES, GPU_FRAMES = 8, 16  # the default count of frames on a CPU and on a GPU
MAX_VIDEO_BYTES = 500_000_000  # 25x the 20 MB image limit: 15 minutes at 4.4 Mbit/s, typical of 1080p web video
# the pixels of a clip's sampled frames, together: 64 full-HD frames (or 16 4K ones), ~400 MB as decoded RGB, to
# which each frame's own limit (`images.MAX_PIXELS`, 100 MP) would let 64 frames bring 19 GB
MAX_CLIP_PIXELS = MAX_FRAMES * 1920 * 1080
MAX_DURATION_S = 15 * 60  # decoding runs up to the last sampled frame: 15 min at 30 fps is 27,000 frames (of
# the order of a minute at 1080p, an estimate); it admits MVBench, EgoSchema and Video-MME's short and medium clips
_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Clip:
    """Frames sampled from a video, in time order."""

    frames: list[Image.Image]  # RGB, the video's own size (upright)
    indices: list[int]  # each frame's index among the video's decoded frames
    times_s: list[float]  # each frame's presentation time in seconds, from the stream's start
    fps: float  # the video's average frame rate
    duration_s: float
    audio: bool  # the file has an audio stream (always ignored; the app says so)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self.frames[0].size


@dataclass(frozen=True)
class _Header:
    """What the container says about its first video stream, before any frame is decoded."""

    total: int  # frames, 0 where the header does not say
    fps: float
    duration_s: float | None
    start_s: float  # the presentation time of the stream's first frame
    audio: bool
    size: tuple[int, int]  # (width, height) of its frames as decoded


def default_frames(device) -> int:
    """How many frames to sample when none are asked for: CPU_FRAMES on a CPU, GPU_FRAMES on a GPU."""
    return CPU_FRAMES if str(device).split(":")[0] == "cpu" else GPU_FRAMES


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frames of `total`, evenly spaced as transformers samples them; all of them if count >= total."""
    if count >= total:
        return list(range(total))
    return (np.arange(count, dtype=np.int64) * total // count).tolist()


def frames_at(fps: float, total: int, video_fps: float) -> int:
    """How many frames sampling at `fps` gives (transformers' rule), capped at MAX_FRAMES and at `total`."""
    return min(max(1, int(total / video_fps * fps)), MAX_FRAMES, total)


def load_video(path: str | Path, frames: int | None = None, fps: float | None = None, device: str = "cpu") -> Clip:
    """`frames` frames evenly spaced over the video (default: `default_frames(device)`), or frames at `fps`."""
    _check_request(frames, fps)
    path = Path(path)
    _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        header = _header(container, stream, path)
    finally:
        container.close()
    if header.total == 0:
        raise ExplorerError(f"{path} has a video stream with no frames")
    count = frames if frames is not None else default_frames(device)
    wanted = _wanted(header.total, count, fps, header.fps)
    _check_clip_pixels(len(wanted), header.size, path)
    decoded, seen = _decode(path, wanted)
    duration = header.duration_s if header.duration_s is not None else header.total / header.fps
    if len(decoded) < len(wanted):  # the stream ended before its header said: sample the frames it has
        if seen == 0:
            raise ExplorerError(f"{path} is corrupt: none of its {header.total} frames could be decoded")
        wanted = _wanted(seen, count, fps, header.fps)
        duration = seen / header.fps
        decoded, _ = _decode(path, wanted)
    times = [round(t - header.start_s, 6) if t is not None else i / header.fps for (_, t), i in zip(decoded, wanted)]
    return Clip([image for image, _ in decoded], wanted, times, header.fps, duration, header.audio)


def _wanted(total: int, count: int, fps: float | None, video_fps: float) -> list[int]:
    """The indices to decode: `count` frames, or as many as `fps` gives when it is set."""
    return frame_indices(total, frames_at(fps, total, video_fps) if fps is not None else count)


def _check_request(frames: int | None, fps: float | None) -> None:
    if frames is not None and fps is not None:
        raise ExplorerError("ask for a number of frames or a frame rate, not both")
    if frames is not None and (
        isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES
    ):
        raise ExplorerError(f"the number of frames must be a whole number from 1 to {MAX_FRAMES}, not {frames!r}")
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ExplorerError(f"the frame rate to sample at must be a positive number, not {fps!r}")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ExplorerError(f"no video file at {path}")
    size = path.stat().st_size
    if size == 0:
        raise ExplorerError(f"{path} is empty (0 bytes)")
    if size > MAX_VIDEO_BYTES:
        raise ExplorerError(
            f"{path} is too large: {size / 1e6:.0f} MB, the limit for a video is {MAX_VIDEO_BYTES / 1e6:.0f} MB"
        )


def _open(path: Path):
    import av

    try:
        return av.open(str(path), "r")
    except av.error.FFmpegError as e:  # no container FFmpeg knows, or one it cannot read (an mp4 cut before its index)
        if _container_signature(path):
            raise ExplorerError(f"{path} is corrupt or truncated: FFmpeg cannot open it ({e.strerror})") from None
        raise ExplorerError(f"{path} is not a video this app can read ({e.strerror})") from None


def _container_signature(path: Path) -> bool:
    """Whether the file starts as an MP4/MOV, Matroska/WebM, GIF or AVI file does."""
    with path.open("rb") as file:
        head = file.read(12)
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO base media (mp4, mov, m4a)
        or head[:4] in (b"\x1aE\xdf\xa3", b"GIF8")  # EBML (mkv, webm), GIF
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
    )


def _video_stream(container, path: Path):
    """The first video stream, refused if the file is an image, has no video, or needs a decoder FFmpeg lacks."""
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):  # FFmpeg's demuxers for still images (jpeg_pipe, png_pipe, ...)
        raise ExplorerError(f"{path} is an image, not a video")
    if not container.streams.video:
        if container.streams.audio:
            raise ExplorerError(f"{path} has only audio, no video stream")
        if not container.streams:
            raise ExplorerError(f"{path} is corrupt or truncated: FFmpeg finds no streams in it")
        raise ExplorerError(f"{path} has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg has no decoder for the stream's codec
        raise ExplorerError(f"{path} uses a video codec this app cannot decode")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise ExplorerError(f"{path} is corrupt: its video stream has no frame size")
    if width * height > images.MAX_PIXELS:
        raise ExplorerError(
            f"{path} is too large: its frames are {width}x{height}, {width * height / 1e6:.0f} megapixels, "
            f"the limit is {images.MAX_PIXELS / 1e6:.0f}"
        )
    return stream


def _header(container, stream, path: Path) -> _Header:
    """Frame count, rate and duration from the header; packets counted (not decoded) where it has no count."""
    total, duration = stream.frames, None
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1e6  # in AV_TIME_BASE units
    if duration is not None:
        _check_duration(duration, path)
    rate = stream.average_rate or stream.guessed_rate
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if total == 0:
        total, end = _count_packets(container, stream, path)
        duration = duration if duration is not None else max(0.0, end - start)
    fps = float(rate) if rate else (total / duration if duration else 0.0)
    if total and fps <= 0:
        raise ExplorerError(f"{path} is corrupt: its video stream has no frame rate")
    size = (stream.codec_context.width, stream.codec_context.height)
    return _Header(total, fps, duration, start, bool(container.streams.audio), size)


def _count_packets(container, stream, path: Path) -> tuple[int, float]:
    """The number of video packets (one per frame) and where the last one ends, in seconds; nothing decoded."""
    import av

    count, end = 0, 0.0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's closing empty packet
                continue
            count += 1
            if packet.pts is not None:
                end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
                _check_duration(end, path)
    except av.error.FFmpegError as e:
        raise ExplorerError(f"{path} is corrupt: reading it failed after {count} frames ({e.strerror})") from None
    return count, end


def _check_clip_pixels(count: int, size: tuple[int, int], path: Path) -> None:
    """Refuse, before decoding, a clip whose sampled frames hold more than MAX_CLIP_PIXELS together."""
    width, height = size
    if count * width * height > MAX_CLIP_PIXELS:
        most = MAX_CLIP_PIXELS // (width * height)
        raise ExplorerError(
            f"{path}: {count} frames of {width}x{height} are {count * width * height / 1e6:.0f} megapixels, more "
            f"than the {MAX_CLIP_PIXELS / 1e6:.0f} a clip may hold; ask for at most {most} frames of this video"
        )


def _check_duration(duration: float, path: Path) -> None:
    if duration > MAX_DURATION_S:
        raise ExplorerError(f"{path} is too long: {duration:.0f} s, the limit is {MAX_DURATION_S} s")


def _decode(path: Path, wanted: list[int]) -> tuple[list[tuple[Image.Image, float | None]], int]:
    """The wanted frames (RGB, upright) with their presentation times, and how many frames were decoded;
    decoding stops at the last wanted frame."""
    import av

    keep, out, seen = set(wanted), [], 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        for frame in container.decode(stream):
            if seen in keep:  # every frame at the header's size, so a stream that changes size still stacks
                out.append((_upright(frame.to_image(width=width, height=height), frame.rotation), frame.time))
            seen += 1
            if seen > wanted[-1]:
                break
    except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
        raise ExplorerError(f"{path} uses a video codec this app cannot decode ({e.strerror})") from None
    except av.error.FFmpegError as e:
        raise ExplorerError(f"{path} is corrupt: frame {seen} could not be decoded ({e.strerror})") from None
    finally:
        container.close()
    return out, seen


def _upright(image: Image.Image, rotation: int) -> Image.Image:
    """The frame as a player shows it: `rotation` is the display matrix's counter-clockwise angle in degrees."""
    turn = _ROTATIONS.get(round(rotation) % 360)
    return image.transpose(turn) if turn is not None else image
