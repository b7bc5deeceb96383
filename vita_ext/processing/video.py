"""Video frame sampling and decoding as Long-VITA does it: video files (PyAV), animated GIFs (Pillow),
directories of frame images, or lists of PIL frames.

Source: Long-VITA's ImageProcessor (get_video_frames / process_video): for a file,
step = max(fps / max_fps, n_frames / (max_frames + 1)) and indices int(k * step) for k < max_frames
that fall inside the video; for a frame directory, int(total / target) * x for x < target with
target = int(min(total, max_frames)). Each frame is padded to a square with the mean colour and resized
bicubic (image.prepare_tile). Frames are decoded in one sequential pass (no per-frame seek).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageSequence
from tqdm import tqdm

from .image import _reason, load_image, normalize_tile, prepare_tile, to_rgb

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
# The most frames one video may be sampled to: 2^20 context tokens at the smallest tile (4 tokens + 2
# markers per frame) hold fewer. It bounds the work of a --max-frames request.
MAX_FRAMES = 1 << 18
GIF_DEFAULT_FRAME_MS = 100  # GIF frames without a (positive) duration are shown for 100 ms by browsers

VideoLike = Union[str, "os.PathLike[str]", Sequence[Image.Image]]


class VideoWarning(UserWarning):
    """A video gave fewer frames than sampled (truncated file or overstated header)."""


def sample_indices(n_frames: int, fps: float, max_frames: int, max_fps: float = 1.0) -> list[int]:
    """Frame indices (ascending ints < n_frames) Long-VITA samples from a video of n_frames at fps.

    step = max(fps / max_fps, n_frames / (max_frames + 1)); indices = int(k * step), k < max_frames,
    keeping those < n_frames. E.g. 40 frames at 10 fps, max_fps 1 -> [0, 10, 20, 30].
    Work is linear in the result (at most max_frames and about n_frames * max_fps / fps), not in
    max_frames. Raises ValueError for max_frames < 1, max_fps <= 0 or a non-finite/non-positive fps."""
    if max_frames < 1 or not max_fps > 0:
        raise ValueError(f"max_frames/max_fps: expected >= 1 and > 0, received {max_frames}, {max_fps}")
    if not (0 < fps < float("inf")):
        raise ValueError(f"fps: expected a positive frame rate, received {fps}")
    if n_frames <= 0:
        return []
    step = max(fps / max_fps, n_frames / (max_frames + 1))
    # int(k * step) < n_frames fails for every k >= n_frames / step (+1 for rounding): stop there
    stop = min(max_frames, int(n_frames / step) + 2)
    return [i for i in (int(k * step) for k in range(stop)) if i < n_frames]


def frame_dir_indices(total: int, max_frames: int) -> list[int]:
    """Indices Long-VITA takes from `total` frame files: target = int(min(total, max_frames)),
    int(total / target) * x for x < target (max_fps is not used for frame directories)."""
    if total <= 0:
        return []
    target = int(min(total, max_frames))
    return [int(1.0 * total / target) * x for x in range(target)]


def natural_key(text: str) -> list:
    """Sort key that orders digit runs by value ("frame2" < "frame10")."""
    return [int(p) if k % 2 else p for k, p in enumerate(re.split(r"(\d+)", text))]


def _is_gif(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(6) in (b"GIF87a", b"GIF89a")
    except OSError as e:
        raise ValueError(f"cannot read video {path}: {e}") from e


class VideoSource:
    """A video and the frames Long-VITA samples from it.

    source: a video file (anything FFmpeg reads), an animated GIF, a directory of png/jpg/jpeg frames
    (searched recursively, natural sort of the paths), or a list of PIL frames (sampled with the frame
    directory rule, i.e. kept as is when there are at most max_frames; uint8 HWC RGB arrays also work).
    Attributes: kind ("file" | "gif" | "dir" | "frames"), n_frames, fps (None for dir/frames),
    indices (list[int]); len() = number of sampled frames.
    Raises FileNotFoundError (missing path), ValueError("cannot read video <path>: <reason>")
    (undecodable file, no video stream, zero frames)."""

    def __init__(self, source: VideoLike, max_frames: int, max_fps: float = 1.0):
        if not 1 <= max_frames <= MAX_FRAMES:
            raise ValueError(f"max_frames: expected 1 <= max_frames <= {MAX_FRAMES}, received {max_frames}")
        self.path: str | None = None
        self.fps: float | None = None
        self._frames: list[Image.Image] | None = None
        self._files: list[str] | None = None
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"video not found: {self.path}")
            if os.path.isdir(self.path):
                self.kind = "dir"
                self._files = self._list_frames(self.path)
                self.n_frames = len(self._files)
            elif _is_gif(self.path):
                self.kind = "gif"
                self.n_frames, self.fps = self._gif_info()
            else:
                self.kind = "file"
                self.n_frames, self.fps = self._file_info()
        else:
            self.kind = "frames"
            self._frames = list(source)
            self.n_frames = len(self._frames)
        if self.n_frames == 0:
            raise self._error("the video has no frames")
        if self.fps is None:
            self.indices = frame_dir_indices(self.n_frames, max_frames)
        else:
            self.indices = sample_indices(self.n_frames, self.fps, max_frames, max_fps)

    def __len__(self) -> int:
        return len(self.indices)

    def _error(self, reason) -> ValueError:
        return ValueError(f"cannot read video {self.path if self.path is not None else '<frames>'}: {reason}")

    # ---- probing -------------------------------------------------------------------------------
    @staticmethod
    def _list_frames(directory: str) -> list[str]:
        files = [os.path.join(root, name) for root, _, names in os.walk(directory)
                 for name in names if name.lower().endswith(FRAME_EXTENSIONS)]
        return sorted(files, key=natural_key)

    def _gif_info(self) -> tuple[int, float]:
        try:
            with Image.open(self.path) as im:
                durations = [f.info.get("duration", 0) or 0 for f in ImageSequence.Iterator(im)]
        except Exception as e:  # noqa: BLE001 - any decoder failure on the file is "cannot read it"
            raise self._error(_reason(e)) from e
        ms = [d if isinstance(d, (int, float)) and d > 0 else GIF_DEFAULT_FRAME_MS for d in durations]
        return len(ms), (1000.0 * len(ms) / sum(ms)) if ms else 1.0

    def _open(self):
        import av

        try:
            container = av.open(self.path)
        except Exception as e:  # noqa: BLE001 - FFmpeg and PyAV errors on a bad file
            raise self._error(_reason(e)) from e
        if not container.streams.video:
            container.close()
            raise self._error("no video stream")
        return container

    def _file_info(self) -> tuple[int, float]:
        try:
            return self._probe()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a header PyAV cannot make sense of
            raise self._error(_reason(e)) from e

    def _probe(self) -> tuple[int, float]:
        import av

        with self._open() as container:
            stream = container.streams.video[0]
            n = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                        else (container.duration / 1e6 if container.duration else None))
            if n <= 0:  # the container does not store a frame count: count packets (no decoding)
                try:
                    n = sum(1 for p in container.demux(stream) if p.size > 0)
                except av.FFmpegError as e:
                    raise self._error(e) from e
        if rate and 0 < float(rate) < float("inf"):
            fps = float(rate)
        elif duration and duration > 0:
            fps = n / duration
        else:
            warnings.warn(f"{self.path}: no frame rate or duration; assuming 1 fps")
            fps = 1.0
        return n, fps

    # ---- decoding ------------------------------------------------------------------------------
    def frames(self, progress: bool = False) -> Iterator[Image.Image]:
        """Yield the sampled frames (PIL RGB, original resolution) in order, decoding once.

        May yield fewer than len(self) if the file holds fewer frames than its header says; raises
        ValueError if it yields none. progress=True shows a tqdm bar."""
        bar = tqdm(total=len(self.indices), desc="video frames", unit="frame", disable=not progress)
        count = 0
        try:
            for frame in self._iter_frames():
                count += 1
                bar.update(1)
                yield frame
        finally:
            bar.close()
        if count == 0:
            raise self._error("no frame could be decoded")
        if count < len(self.indices):
            warnings.warn(f"video {self.path}: decoded {count} of the {len(self.indices)} sampled frames (the "
                          f"file is truncated or its header overstates its {self.n_frames} frames); using "
                          f"{count}", VideoWarning, stacklevel=2)

    def _iter_frames(self) -> Iterator[Image.Image]:
        if self.kind == "frames":
            for i in self.indices:
                frame = self._frames[i]
                yield to_rgb(Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame)
        elif self.kind == "dir":
            for i in self.indices:
                yield load_image(self._files[i])
        elif self.kind == "gif":
            try:
                with Image.open(self.path) as im:
                    yield from _pick(ImageSequence.Iterator(im), self.indices, to_rgb)
            except GeneratorExit:
                raise
            except Exception as e:  # noqa: BLE001 - any decoder failure on the file
                raise self._error(_reason(e)) from e
        else:
            yield from self._decode_file()

    def _decode_file(self) -> Iterator[Image.Image]:
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                yield from _pick(container.decode(stream), self.indices, lambda f: f.to_image())
            except GeneratorExit:
                raise
            except Exception as e:  # noqa: BLE001 - FFmpeg and PyAV errors while decoding
                raise self._error(_reason(e)) from e


def _pick(frames: Iterable, indices: Sequence[int], convert) -> Iterator[Image.Image]:
    """From a sequential frame iterator, yield convert(frame) for each of the ascending `indices`.

    A repeated index (step < 1: a video slower than max_fps) yields the same image object again, as
    Long-VITA repeats such frames. Stops reading after the last index."""
    if not indices:
        return
    k = 0
    for i, frame in enumerate(frames):
        if i < indices[k]:
            continue
        image = convert(frame)
        while k < len(indices) and indices[k] == i:
            yield image
            k += 1
        if k == len(indices):
            return


def load_video_frames(video: VideoLike, max_frames: int, max_fps: float = 1.0,
                      progress: bool = False) -> list[Image.Image]:
    """The frames Long-VITA samples from a video file, GIF, frame directory or list of PIL frames.

    Returns a list of PIL RGB images at the source resolution (at most max_frames). Errors as VideoSource.
    For thousands of frames prefer `video_to_tensor`, which never holds full-resolution frames."""
    return list(VideoSource(video, max_frames, max_fps).frames(progress))


def video_frames_to_tensor(frames: Sequence[Image.Image], image_size: int = 448,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frames -> [n, 3, image_size, image_size]: each frame padded to a square with the mean colour
    (centred), resized bicubic, then normalised (x * 1.0 / 255, (x - mean) / std in float32)."""
    frames = list(frames)
    out = torch.empty((len(frames), 3, image_size, image_size), dtype=dtype)
    for k, frame in enumerate(frames):
        out[k].copy_(torch.from_numpy(normalize_tile(prepare_tile(frame, image_size))))
    return out


def video_to_tensor(video: VideoLike | VideoSource, max_frames: int = 128, max_fps: float = 1.0,
                    image_size: int = 448, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> torch.Tensor:
    """Sample, decode and normalise a video in one streaming pass -> [frames, 3, s, s] (`dtype`).

    Full-resolution frames are dropped as soon as they are normalised, so memory is the output only."""
    src = video if isinstance(video, VideoSource) else VideoSource(video, max_frames, max_fps)
    out = torch.empty((len(src), 3, image_size, image_size), dtype=dtype)
    n = 0
    for frame in src.frames(progress):
        out[n].copy_(torch.from_numpy(normalize_tile(prepare_tile(frame, image_size))))
        n += 1
    return out if n == len(src) else out[:n].clone()
