"""Chat messages -> one ChatML prompt with <image>/<video> tags, and the media those tags place.

Message content is a string or a list of parts (OpenAI's shape):
    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": URL}}
    {"type": "video_url", "video_url": {"url": URL}}     (a video file, animated GIF or frame directory)
URL is a local path, a ``file://`` URL, or a ``data:`` URL (base64; images and video files). Remote
(http/https) URLs are refused: the server reads only what is on its own host, and with a media root
only under that directory (symlinks resolved, so a link cannot lead out of it).

Tags follow ``vita-ext generate`` (``insert_media_tags``): in a message whose text has no <image>/<video>
tag, each image part becomes "<image>\\n" and each video part "<video>" at its place among the text
parts; text that has tags places the message's media itself, in order (a count mismatch is a 400).
So [image, text "Which digit is this?"] is the same prompt as
``vita-ext generate --image D --prompt "Which digit is this?"``.
"""
from __future__ import annotations

import io
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from vita_ext.processing import apply_chat_template
from vita_ext.processing.prompt import IMAGE_TAG, VIDEO_TAG

from .protocol import ChatCompletionRequest, bad_request


@dataclass(frozen=True)
class Media:
    """One image or video of a request: a checked local ``path`` or the decoded bytes of a data: URL.
    ``where`` names it in errors (e.g. "messages[0].content[1]")."""
    kind: str
    where: str
    path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Prompt:
    """What every rank needs to build the model inputs: the ChatML text and its media in tag order."""
    text: str
    images: tuple[Media, ...]
    videos: tuple[Media, ...]


class MediaPolicy:
    """Where request paths may point. ``media_root`` None: any path this process can read (a server
    for one user); a directory: only paths under it (relative paths are taken relative to it)."""

    def __init__(self, media_root: str | None = None):
        if media_root is not None and not os.path.isdir(media_root):
            raise FileNotFoundError(f"--media-root {media_root}: no such directory")
        self.root = os.path.realpath(media_root) if media_root is not None else None

    def resolve(self, url: str, kind: str, where: str) -> Media:
        """A Media for ``url``; raises APIError(400) for a remote URL, a bad data: URL, a path outside
        the media root, or a missing file."""
        param = f"{where}.{kind}_url"
        scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
        if scheme == "data":
            return Media(kind, where, data=_data_url_bytes(url, param))
        if scheme == "file":
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise bad_request(f"{param}: file:// URLs must name a local file (host {parts.netloc!r})", param)
            path = urllib.request.url2pathname(parts.path)
        elif scheme:
            raise bad_request(f"{param}: {scheme}:// URLs are not fetched; pass a local path, a file:// URL "
                              f"or a base64 data: URL", param)
        else:
            path = url
        return Media(kind, where, path=self._checked_path(path, kind, param))

    def _checked_path(self, path: str, kind: str, param: str) -> str:
        if not path:
            raise bad_request(f"{param}: empty path", param)
        base = self.root if self.root is not None else os.getcwd()
        real = os.path.realpath(os.path.join(base, path))
        if self.root is not None and os.path.commonpath([real, self.root]) != self.root:
            raise bad_request(f"{param}: {path} is outside the server's media root", param, "path_not_allowed")
        if not os.path.exists(real):
            raise bad_request(f"{param}: no such file: {path}", param, "file_not_found")
        if kind == "image" and not os.path.isfile(real):
            raise bad_request(f"{param}: {path} is not a file", param)
        return real


def _data_url_bytes(url: str, param: str) -> bytes:
    # The standard library's data: URL reader (RFC 2397), not a parser of our own.
    try:
        with urllib.request.urlopen(url) as response:
            data = response.read()
    except (ValueError, urllib.error.URLError, OSError) as exc:
        raise bad_request(f"{param}: malformed data: URL ({exc})", param) from exc
    if not data:
        raise bad_request(f"{param}: the data: URL holds no data", param)
    return data


def build_prompt(request: ChatCompletionRequest, policy: MediaPolicy) -> Prompt:
    """The ChatML prompt (generation prompt appended) and the media of ``request.messages``."""
    messages, images, videos = [], [], []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, str):
            messages.append({"role": message.role, "content": content})
            continue
        texts = [p.text for p in content if p.type == "text"]
        auto_tags = not any(IMAGE_TAG in t or VIDEO_TAG in t for t in texts)
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                pieces.append(part.text)
                continue
            ref = getattr(part, part.type)
            url = ref if isinstance(ref, str) else ref.url
            kind = "image" if part.type == "image_url" else "video"
            (images if kind == "image" else videos).append(policy.resolve(url, kind, where))
            if auto_tags:
                pieces.append(IMAGE_TAG + "\n" if kind == "image" else VIDEO_TAG)
        messages.append({"role": message.role, "content": "".join(pieces)})
    return Prompt(apply_chat_template(messages, add_generation_prompt=True), tuple(images), tuple(videos))


# ---------------------------------------------------------------- on every rank: media -> processor inputs
def open_image(media: Media) -> str | Image.Image:
    """A path for the processor, or the decoded image of a data: URL (RGB). Raises ValueError."""
    if media.data is None:
        return media.path
    try:
        with Image.open(io.BytesIO(media.data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{media.where}: cannot read the image in the data: URL: {exc}") from exc


@contextmanager
def video_paths(videos: tuple[Media, ...]) -> Iterator[list[str]]:
    """Paths of the videos; data: URL videos are written to temporary files, removed on exit."""
    paths, temps = [], []
    try:
        for media in videos:
            if media.data is None:
                paths.append(media.path)
                continue
            f = tempfile.NamedTemporaryFile(prefix="vita_ext_video_", delete=False)
            temps.append(f.name)
            with f:
                f.write(media.data)
            paths.append(f.name)
        yield paths
    finally:
        for name in temps:
            try:
                os.unlink(name)
            except OSError:
                pass


__all__ = ["Media", "MediaPolicy", "Prompt", "build_prompt", "open_image", "video_paths"]
