"""LongVITAProcessor: text + images + videos -> input_ids, pixel_values, context_positions (and labels).

Source: Long-VITA's inference path (ChatML prompt tokenised whole, then each <image>/<video> token
expanded into vision tokens, InternVL dynamic tiles for images, sampled frames for videos) and its
training path (labels on the assistant content and its "<|im_end|>\\n" only). Media are processed in
text order, so tile k of pixel_values feeds context_positions[k*T:(k+1)*T].
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from .._json import read_json
from .image import (MAX_TILES, ImageLike, _reason, candidate_grids, closest_grid, dynamic_tiles, load_image,
                    normalize, normalize_tile, prepare_tile)
from .prompt import (IGNORE_INDEX, MediaSpec, apply_chat_template, chat_segments, check_no_vision_tokens,
                     check_tag_counts, expand_media_tokens, expanded_length, find_media_tags, tokens_per_tile)
from .tokenizer import LongVITATokenizer
from .video import MAX_FRAMES, VideoLike, VideoSource


PROCESSOR_CONFIG = "processor_config.json"
# processor settings a checkpoint may fix in its processor_config.json (Long-VITA's releases have none)
CONFIG_KEYS = ("max_tiles", "min_tiles", "max_frames", "max_fps", "video_frame_label")


def _as_list(items, name: str) -> list:
    if items is None:
        return []
    if isinstance(items, (str, os.PathLike, Image.Image)):
        return [items]
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name}: expected a list, received {type(items).__name__}")
    return list(items)


def read_processor_config(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of ``path``/processor_config.json ({} when the file is absent). Raises ValueError
    naming an unknown key (expected: CONFIG_KEYS) or a file that is not a JSON object."""
    file = os.path.join(os.fspath(path), PROCESSOR_CONFIG)
    if not os.path.isfile(file):
        return {}
    data = read_json(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, received {type(data).__name__}")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{file}: unknown key(s) {unknown}; expected some of {list(CONFIG_KEYS)}")
    return data


def _image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height) from the header only (the pixels are decoded later, one image at a time)."""
    if isinstance(image, Image.Image):
        return image.size
    path = os.fspath(image)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001 - any decoder failure (a decompression bomb included)
        raise ValueError(f"cannot read image {path}: {_reason(e)}") from e


def _check_text(text) -> None:
    """Text must be valid Unicode (a str from a non-UTF-8 command line carries lone surrogates)."""
    if not isinstance(text, str):
        return  # the chat template names the bad field
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            bad = repr(text[e.start].encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            bad = repr(text[e.start])
        raise ValueError(f"the text is not valid UTF-8: byte {bad} at character {e.start} (decode it as UTF-8, "
                         f"or pass a UTF-8 file)") from None


def _limit(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}], received {value!r}")
    return int(value)


class LongVITAProcessor:
    """Turns a prompt (or a conversation) with <image>/<video> tags and media into model inputs.

    tokenizer: a LongVITATokenizer (None -> the packaged Qwen2.5 tokenizer). image_size / patch_size set
    the tile size and T = tokens_per_tile(image_size, patch_size) (256 for Long-VITA, 4 for 56-px tiles).
    max_tiles: image tile limit (12); max_frames / max_fps: video sampling (128 / 1.0);
    pixel_dtype: dtype of pixel_values (float32; bfloat16 halves memory for thousands of frames);
    progress: tqdm bar while decoding videos.
    video_frame_label: None (Long-VITA's layout: frames follow each other with nothing between) or a
    ``str.format`` pattern of the 1-based frame index whose text is written before each video frame's
    <vid>, e.g. "{:03d}" (the packaged digits model numbers its frames "001", "002", ... as its
    training prompts do). Raises ValueError if the pattern does not format an int or its text holds a
    special token."""

    def __init__(self, tokenizer: LongVITATokenizer | None = None, image_size: int = 448, patch_size: int = 14,
                 max_tiles: int = 12, max_frames: int = 128, max_fps: float = 1.0, min_tiles: int = 1,
                 pixel_dtype: torch.dtype = torch.float32, progress: bool = False,
                 video_frame_label: str | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else LongVITATokenizer.default()
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.tokens_per_tile = tokens_per_tile(self.image_size, self.patch_size)
        self.max_tiles = _limit(max_tiles, "max_tiles", 1, MAX_TILES)
        self.min_tiles = _limit(min_tiles, "min_tiles", 1, self.max_tiles)
        self.max_frames, self.max_fps = _limit(max_frames, "max_frames", 1, MAX_FRAMES), float(max_fps)
        self.pixel_dtype, self.progress = pixel_dtype, progress
        self.video_frame_label = video_frame_label
        self._label_cache: dict[int, list[int]] = {}
        if video_frame_label is not None:
            self._frame_label_ids(1)  # fail now on a bad pattern, not on the first video

    def _frame_label_ids(self, index: int) -> list[int]:
        """Token ids of the label before 1-based video frame ``index`` (video_frame_label)."""
        ids = self._label_cache.get(index)
        if ids is None:
            try:
                text = self.video_frame_label.format(index)
            except (ValueError, IndexError, KeyError) as e:
                raise ValueError(f"video_frame_label: expected a str.format pattern of the frame index such as "
                                 f"'{{:03d}}', received {self.video_frame_label!r} ({e})") from e
            ids = self.tokenizer.encode(text)
            specials = [i for i in ids if i >= 151643]  # <|endoftext|> and every added/special token
            if specials:
                raise ValueError(f"video_frame_label: the label of frame {index} ({text!r}) holds special "
                                 f"token(s) {sorted(self.tokenizer.id_to_token(i) for i in set(specials))}")
            self._label_cache[index] = ids
        return ids

    def config_dict(self) -> dict[str, Any]:
        """The settings a checkpoint's processor_config.json holds (CONFIG_KEYS)."""
        return {k: getattr(self, k) for k in CONFIG_KEYS}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write processor_config.json (CONFIG_KEYS) into ``directory``."""
        with open(os.path.join(os.fspath(directory), PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.config_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "LongVITAProcessor":
        """Processor for a checkpoint directory: its tokenizer files (or, if it has none, the packaged
        tokenizer, with a warning), config.json's visual.image_size / visual.patch_size (448 / 14 if
        absent) and, when present, processor_config.json (CONFIG_KEYS; a model's own settings, e.g. the
        digits model's frame numbering). kwargs override both. Raises FileNotFoundError if `path` is
        missing, ValueError for an unknown processor_config.json key."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        if "tokenizer" not in kwargs:
            try:
                kwargs["tokenizer"] = LongVITATokenizer.from_pretrained(path)
            except FileNotFoundError:
                warnings.warn(f"{path} has no tokenizer files; using the packaged Qwen2.5 tokenizer")
                kwargs["tokenizer"] = LongVITATokenizer.default()
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            config = read_json(config_path)
            visual = config.get("visual") if isinstance(config, dict) else None
            for key in ("image_size", "patch_size"):
                value = visual.get(key) if isinstance(visual, dict) else None
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{config_path}: field 'visual.{key}' must be a positive integer, got {value!r}")
                kwargs.setdefault(key, value)
        for key, value in read_processor_config(path).items():
            kwargs.setdefault(key, value)
        return cls(**kwargs)

    # ---- public API ----------------------------------------------------------------------------
    def __call__(self, text: str, images: Sequence[ImageLike] | None = None,
                 videos: Sequence[VideoLike] | None = None, max_frames: int | None = None,
                 max_tiles: int | None = None, chat: bool = True, add_generation_prompt: bool = True,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Inference inputs for one prompt.

        text: the user's text with <image>/<video> tags (one per image/video, any order). chat=True wraps
        it as one ChatML user message (+ "<|im_start|>assistant\\n" if add_generation_prompt); chat=False
        tokenises it as is. images: paths or PIL images; videos: paths (file, GIF, frame directory) or
        lists of PIL frames. max_frames / max_tiles override the processor's limits for this call
        (bounded by MAX_FRAMES / MAX_TILES). max_length: refuse, before any pixel is decoded, an input
        that would be longer (e.g. the model's max_position_embeddings).
        Returns {"input_ids": int64 [1, S], "pixel_values": pixel_dtype [tiles, 3, s, s] (empty [0, 3, s, s]
        without media), "context_positions": int64 [tiles * T]}.
        Raises ValueError (tag-count mismatch naming both counts, unreadable media, text that is not
        valid Unicode, too long), FileNotFoundError."""
        _check_text(text)
        if chat:
            text = apply_chat_template([{"role": "user", "content": text}], add_generation_prompt)
        return self._build(self.tokenizer.encode(text), None, images, videos, max_frames, max_tiles, max_length)

    def encode_conversation(self, messages: Sequence[Mapping[str, str]],
                            images: Sequence[ImageLike] | None = None, videos: Sequence[VideoLike] | None = None,
                            max_frames: int | None = None, max_tiles: int | None = None,
                            strict: bool = True) -> dict[str, torch.Tensor]:
        """Training inputs for a conversation [{"role": system|user|assistant, "content": str}, ...].

        Same tokens as inference (ChatML without generation prompt, tags expanded) plus "labels" int64
        [1, S]: the token id on assistant content and its "<|im_end|>\\n", -100 elsewhere (system/user
        messages, "<|im_start|>assistant\\n" headers, vision tokens). Labels come from tokenising each
        piece separately; with strict=True a ValueError is raised if that differs from tokenising the
        whole text (e.g. content that starts with a newline, which merges with the header's "\\n");
        strict=False keeps the piecewise tokens (what Long-VITA's training code feeds)."""
        for m in messages:
            _check_text(m.get("content") if isinstance(m, Mapping) else None)
        segments = chat_segments(messages, add_generation_prompt=False)
        pieces = self.tokenizer.encode_batch([s for s, _ in segments])
        ids, labels = [], []
        for (_, supervised), piece in zip(segments, pieces):
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        if strict:
            whole = self.tokenizer.encode("".join(s for s, _ in segments))
            if whole != ids:
                at = next((i for i, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids)))
                raise ValueError(
                    f"piecewise tokenization differs from tokenizing the whole conversation at token {at} "
                    f"(near {self.tokenizer.decode(whole[max(0, at - 3):at + 3])!r}); a message content "
                    f"starting with a newline does this. Use strict=False to keep the piecewise tokens")
        return self._build(ids, labels, images, videos, max_frames, max_tiles)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (list, 1-D tensor, or [1, S] tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"LongVITAProcessor(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"tokens_per_tile={self.tokens_per_tile}, max_tiles={self.max_tiles}, "
                f"max_frames={self.max_frames}, max_fps={self.max_fps}, pixel_dtype={self.pixel_dtype}"
                + (f", video_frame_label={self.video_frame_label!r}" if self.video_frame_label is not None else "")
                + ")")

    # ---- internals -----------------------------------------------------------------------------
    def _build(self, ids: list[int], labels: list[int] | None, images, videos,
               max_frames: int | None, max_tiles: int | None, max_length: int | None = None
               ) -> dict[str, torch.Tensor]:
        images, videos = _as_list(images, "images"), _as_list(videos, "videos")
        for k, v in enumerate(videos):
            if isinstance(v, Image.Image):
                raise ValueError(f"videos[{k}]: expected a path or a list of PIL frames, received one PIL "
                                 f"image (put the frames of one video in a list)")
        check_no_vision_tokens(ids, self.tokenizer)  # before any decoding work
        kinds = find_media_tags(ids, self.tokenizer.image_token_id, self.tokenizer.video_token_id)
        check_tag_counts(kinds, len(images), len(videos))
        max_frames = self.max_frames if max_frames is None else _limit(max_frames, "max_frames", 1, MAX_FRAMES)
        max_tiles = self.max_tiles if max_tiles is None else _limit(max_tiles, "max_tiles", 1, MAX_TILES)
        grids = candidate_grids(self.min_tiles, max_tiles)

        # Plan every medium (sizes only), then decode each straight into one preallocated tensor.
        plans, it_img, it_vid = [], iter(images), iter(videos)
        for kind in kinds:
            if kind == "image":
                image = next(it_img)
                grid = closest_grid(*_image_size(image), grids, self.image_size)
                plans.append((image, grid[0] * grid[1] + (grid[0] * grid[1] > 1), grid))
            else:
                source = VideoSource(next(it_vid), max_frames, self.max_fps)
                plans.append((source, len(source), None))
        if max_length is not None:
            specs = [MediaSpec(kind, n, grid) for kind, (_, n, grid) in zip(kinds, plans)]
            length = expanded_length(ids, specs, self.tokens_per_tile, self.tokenizer.image_token_id,
                                     self.tokenizer.video_token_id)
            if length > max_length:
                tiles = sum(n for _, n, _ in plans)
                raise ValueError(f"the input would be {length} tokens ({len(ids) - len(kinds)} of text, {tiles} "
                                 f"tile(s)/frame(s) of {self.tokens_per_tile}), more than the limit of {max_length}"
                                 f" (the model's max_position_embeddings); lower max_frames/max_tiles or shorten it")
        plans = [(item, n) for item, n, _ in plans]
        s = self.image_size
        pixel_values = torch.empty((sum(n for _, n in plans), 3, s, s), dtype=self.pixel_dtype)
        media, offset = [], 0
        for kind, (item, planned) in zip(kinds, plans):
            if kind == "image":
                tiles, grid = dynamic_tiles(load_image(item), s, max_tiles, self.min_tiles)
                if len(tiles) != planned:
                    raise ValueError(f"image changed size while loading: expected {planned} tiles, got {len(tiles)}")
                normalize([prepare_tile(t, s) for t in tiles], out=pixel_values[offset:offset + planned])
                media.append(MediaSpec("image", planned, grid))
                offset += planned
            else:
                n = 0
                for frame in item.frames(self.progress):
                    pixel_values[offset + n].copy_(torch.from_numpy(normalize_tile(prepare_tile(frame, s))))
                    n += 1
                media.append(MediaSpec("video", n))
                offset += n
        if offset != pixel_values.shape[0]:  # a video held fewer frames than its header said
            pixel_values = pixel_values[:offset].clone()
        label_ids = self._frame_label_ids if self.video_frame_label is not None else None
        out = expand_media_tokens(ids, media, self.tokenizer, self.tokens_per_tile, labels, label_ids)
        result = {
            "input_ids": torch.tensor(out.input_ids, dtype=torch.long).unsqueeze(0),
            "pixel_values": pixel_values,
            "context_positions": torch.tensor(out.context_positions, dtype=torch.long),
        }
        if out.labels is not None:
            result["labels"] = torch.tensor(out.labels, dtype=torch.long).unsqueeze(0)
        return result
