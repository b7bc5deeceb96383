"""Training data in the Long-VITA release format: JSON lines, one conversation per line.

    {"messages": [{"role": "user", "content": "<image>\\nWhich digit is this?"},
                  {"role": "assistant", "content": "7"}],
     "images": ["images/00012.png"], "videos": []}

Media paths are relative to the JSONL file (absolute paths are kept). Records are tokenised by
``LongVITAProcessor.encode_conversation`` exactly as at inference, with labels on the assistant
content and its ``<|im_end|>\\n`` only. A bad record is skipped with a ``BadRecordWarning`` and
counted by reason (``DataReport``); it never stops training. Records are parsed when the dataset is
opened (text only); media are decoded when a record is encoded, so memory holds one packed sequence's
pixels at a time, not the dataset's.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from vita_ext.processing.prompt import IGNORE_INDEX, IMAGE_TAG, ROLES, VIDEO_TAG

# reason -> what it means (the order of the final report)
REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not valid JSON",
    "invalid_record": "not a record with a 'messages' list of {role, content} (or media lists of paths)",
    "empty_conversation": "no message, or every message is empty",
    "tag_mismatch": "the <image>/<video> tags do not match the images/videos lists",
    "missing_media": "a media file does not exist",
    "unreadable_media": "a media file cannot be decoded",
    "label_mismatch": "piecewise tokenization (labels) differs from whole-text tokenization (strict mode)",
    "no_supervised_token": "no supervised token (no assistant message)",
    "too_long": "longer than seq_len (skipped, never truncated)",
}


class BadRecordWarning(UserWarning):
    """A training record was skipped (it is counted in the DataReport)."""


@dataclass
class Sample:
    """One tokenised record. index: its record number (0-based, over the file's non-blank lines).
    input_ids / labels: [S] int64 (labels unshifted, -100 where unsupervised); pixel_values:
    [tiles, 3, s, s]; context_positions: [tiles * T] indices into this sample's S tokens."""
    index: int
    input_ids: Tensor
    labels: Tensor
    pixel_values: Tensor
    context_positions: Tensor

    @property
    def length(self) -> int:
        return self.input_ids.numel()

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class DataReport:
    """Skipped records by reason. Each record is counted once, however many epochs meet it."""

    def __init__(self, warn: bool = True):
        self.bad: dict[int, str] = {}
        self.warn = warn

    def add(self, index: int, reason: str, detail: str, source: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"DataReport: unknown reason {reason!r}")
        if index in self.bad:
            return
        self.bad[index] = reason
        if self.warn:
            warnings.warn(f"{source}record {index}: skipped ({reason}: {detail})", BadRecordWarning, stacklevel=3)

    def counts(self) -> Counter:
        return Counter(self.bad.values())

    @property
    def num_bad(self) -> int:
        return len(self.bad)

    def summary(self, total: int | None = None) -> str:
        if not self.bad:
            return "data: no record skipped" + (f" ({total} records)" if total is not None else "")
        counts = self.counts()
        parts = ", ".join(f"{counts[r]} {r}" for r in REASONS if counts[r])
        of = f" of {total}" if total is not None else ""
        return f"data: {self.num_bad}{of} record(s) skipped: {parts}"

    def state_dict(self) -> dict[str, Any]:
        return {"bad": {str(k): v for k, v in self.bad.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad = {int(k): v for k, v in state["bad"].items()}


def _media_list(record: dict, key: str) -> list[str]:
    items = record.get(key) or []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise TypeError(f"'{key}' must be a list of paths")
    return items


class JsonlDataset:
    """A JSONL file of conversations, encoded on demand.

    Args:
        path: the .jsonl file.
        processor: a LongVITAProcessor (its image_size / patch_size must match the model).
        max_frames / max_tiles: video frame and image tile limits (processor defaults when None).
        strict: reject records whose piecewise labels differ from whole-text tokenization.
        report: a DataReport to count skipped records into (a new one by default).
    Raises FileNotFoundError if the file does not exist.
    """

    def __init__(self, path: str | os.PathLike, processor, max_frames: int | None = None,
                 max_tiles: int | None = None, strict: bool = True, report: DataReport | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"training data file not found: {self.path}")
        self.root = os.path.dirname(os.path.abspath(self.path))
        self.processor, self.max_frames, self.max_tiles, self.strict = processor, max_frames, max_tiles, strict
        self.report = report if report is not None else DataReport()
        self.lines, self.line_numbers = read_lines(self.path)

    def __len__(self) -> int:
        return len(self.lines)

    def _bad(self, index: int, reason: str, detail: str) -> None:
        self.report.add(index, reason, detail, f"{os.path.basename(self.path)} line {self.line_numbers[index]}, ")

    def _resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def encode(self, index: int) -> Sample | None:
        """The tokenised record ``index``, or None (counted in the report) when it is bad."""
        line = self.lines[index]
        if isinstance(line, UnicodeDecodeError):
            self._bad(index, "invalid_utf8", f"byte {line.start} ({line.object[line.start:line.start + 1]!r}): {line.reason}")
            return None
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            self._bad(index, "invalid_json", str(exc))
            return None
        try:
            messages, images, videos = self._validate(record)
        except TypeError as exc:
            self._bad(index, "invalid_record", str(exc))
            return None
        except _Skip as skip:
            self._bad(index, skip.reason, skip.detail)
            return None
        try:
            out = self.processor.encode_conversation(messages, images=images or None, videos=videos or None,
                                                     max_frames=self.max_frames, max_tiles=self.max_tiles,
                                                     strict=self.strict)
        except FileNotFoundError as exc:
            self._bad(index, "missing_media", str(exc))
            return None
        except (ValueError, OSError) as exc:
            self._bad(index, _classify(str(exc)), str(exc))
            return None
        labels = out["labels"][0]
        if not bool((labels != IGNORE_INDEX).any()):
            self._bad(index, "no_supervised_token", "every label is -100")
            return None
        return Sample(index, out["input_ids"][0], labels, out["pixel_values"], out["context_positions"])

    def _validate(self, record: Any) -> tuple[list[dict], list[str], list[str]]:
        if not isinstance(record, dict):
            raise TypeError(f"expected a JSON object, got {type(record).__name__}")
        messages = record.get("messages")
        if messages is None or messages == []:
            raise _Skip("empty_conversation", "no messages")
        if not isinstance(messages, list):
            raise TypeError("'messages' must be a list")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise TypeError(f"messages[{k}] must be {{'role': one of {ROLES}, 'content': str}}")
        if all(not m["content"].strip() for m in messages):
            raise _Skip("empty_conversation", "every message is empty")
        images, videos = _media_list(record, "images"), _media_list(record, "videos")
        text = "".join(m["content"] for m in messages)
        n_img, n_vid = text.count(IMAGE_TAG), text.count(VIDEO_TAG)
        if n_img != len(images) or n_vid != len(videos):
            raise _Skip("tag_mismatch", f"{n_img} <image> tag(s) for {len(images)} image(s), "
                                        f"{n_vid} <video> tag(s) for {len(videos)} video(s)")
        images, videos = [self._resolve(p) for p in images], [self._resolve(p) for p in videos]
        missing = [p for p in images + videos if not os.path.exists(p)]
        if missing:
            raise _Skip("missing_media", f"not found: {missing[0]}" + (f" (+{len(missing) - 1})" if len(missing) > 1 else ""))
        return messages, images, videos


def read_lines(path: str) -> tuple[list, list[int]]:
    """The non-blank lines of a text file (a UTF-8 BOM is ignored) and their 1-based line numbers. A
    line that is not valid UTF-8 is kept as its UnicodeDecodeError, so one bad line costs one record."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines, numbers = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            lines.append(exc)
        numbers.append(lineno)
    return lines, numbers


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _classify(message: str) -> str:
    if "piecewise tokenization" in message:
        return "label_mismatch"
    if "tag(s)" in message:
        return "tag_mismatch"
    if "reserved vision token" in message or "messages[" in message:
        return "invalid_record"
    return "unreadable_media"


def scan(dataset: JsonlDataset, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Encode every record once: (indices of the good records, their lengths). Records longer than
    ``max_len`` are reported as too_long. Used to count the steps of an epoch (``--epochs``)."""
    good, lengths = [], []
    for i in range(len(dataset)):
        sample = dataset.encode(i)
        if sample is None:
            continue
        if max_len is not None and sample.length > max_len:
            dataset._bad(i, "too_long", f"{sample.length} tokens > seq_len {max_len}")
            continue
        good.append(i)
        lengths.append(sample.length)
    return good, lengths


__all__ = ["BadRecordWarning", "DataReport", "JsonlDataset", "REASONS", "Sample", "scan"]
