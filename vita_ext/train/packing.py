"""Sequence packing: tokenised samples -> fixed-length sequences of ``seq_len`` tokens.

Greedy next-fit in data order: samples are appended to the current sequence until the next one does
not fit; then the sequence is padded and emitted and that sample opens the next one. A sample longer
than ``seq_len`` is skipped and counted (``too_long``), never truncated: cutting a sample could split
an image's CONTEXT tokens from their tile and would silently train on a conversation without its end.

Two modes (LONG_VITA.md section 5):
- ``reset`` (stages 1-2): position ids restart at 0 in every sample and attention is block-diagonal
  causal through ``cu_seqlens`` (``attention_lse`` varlen); no [S, S] mask exists. The padding tail
  is one more segment.
- ``no-reset`` (stages 3-4): global positions 0..S-1 and plain causal attention over the whole row
  (a sample sees the samples packed before it, as in the paper's long-context stages).
The tail is padded with ``<|endoftext|>`` tokens whose labels are -100.

Next-token targets are shifted per sample (each sample's last token and the padding get -100), so a
token is never trained to predict the first token of the next sample in either mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from vita_ext.processing.prompt import IGNORE_INDEX
from vita_ext.train.data import JsonlDataset, Sample

PAD_TOKEN_ID = 151643  # <|endoftext|>
MODES = ("reset", "no-reset")


@dataclass
class PackedBatch:
    """One packed sequence (micro-batch 1, as in Long-VITA).

    input_ids, labels, targets, position_ids: [1, S] int64 (labels unshifted; targets = the next-token
    labels, shifted per sample). cu_seqlens: [n + 1] int32 segment boundaries (reset mode) or None;
    max_seqlen: the longest segment (reset mode), handed to attention with cu_seqlens so the boundaries
    are built and checked here once per batch, never copied back to the host per layer.
    pixel_values: [tiles, 3, s, s] of all samples in order; context_positions: [tiles * T] indices into
    the packed row. sample_indices: the record numbers packed here; num_tokens: real (non-pad) tokens.
    """
    input_ids: Tensor
    labels: Tensor
    targets: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor | None
    pixel_values: Tensor
    context_positions: Tensor
    sample_indices: list[int] = field(default_factory=list)
    num_tokens: int = 0
    max_seqlen: int | None = None

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_supervised(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def shift_targets(labels: Tensor) -> Tensor:
    """Next-token targets of one sample: targets[t] = labels[t + 1], -100 at the last position."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def pack_samples(samples: list[Sample], seq_len: int, mode: str = "reset", pad_token_id: int = PAD_TOKEN_ID
                 ) -> PackedBatch:
    """Concatenate ``samples`` (total length <= seq_len) into one padded sequence; see the module doc.

    Raises ValueError for an unknown mode or samples that do not fit.
    """
    if mode not in MODES:
        raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")
    used = sum(s.length for s in samples)
    if used > seq_len:
        raise ValueError(f"pack_samples: {used} tokens do not fit in seq_len {seq_len}")
    pad = seq_len - used
    ids = [s.input_ids for s in samples] + [torch.full((pad,), pad_token_id, dtype=torch.long)]
    labels = [s.labels for s in samples] + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]
    targets = [shift_targets(s.labels) for s in samples] + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]
    lengths = [s.length for s in samples] + ([pad] if pad else [])
    offsets = torch.tensor([0] + lengths).cumsum(0)
    if mode == "reset":
        positions = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        cu_seqlens = offsets.to(torch.int32)
    else:
        positions, cu_seqlens = torch.arange(seq_len), None
    pixel = [s.pixel_values for s in samples if s.pixel_values.shape[0]]
    if pixel:
        pixel_values = torch.cat(pixel)
    else:
        shape = samples[0].pixel_values.shape[1:] if samples else (3, 0, 0)
        pixel_values = torch.empty((0, *shape))
    context = torch.cat([s.context_positions + offsets[k] for k, s in enumerate(samples)]) if samples else \
        torch.zeros(0, dtype=torch.long)
    max_seqlen = max(lengths, default=0) if cu_seqlens is not None else None
    return PackedBatch(torch.cat(ids)[None], torch.cat(labels)[None], torch.cat(targets)[None], positions[None],
                       cu_seqlens, pixel_values, context, [s.index for s in samples], used, max_seqlen)


class Packer:
    """Streams packed sequences from a dataset, epoch after epoch, in a seeded shuffled order.

    The order of epoch e is a permutation seeded by (seed, e) alone, so the stream is reproducible and
    its position is two integers (``state_dict``): the epoch and the cursor (the first record of that
    epoch's order not yet in an emitted sequence). A sequence never spans two epochs.
    Raises ValueError when a whole epoch yields no usable sample.
    """

    def __init__(self, dataset: JsonlDataset, seq_len: int, mode: str = "reset", seed: int = 0,
                 shuffle: bool = True, pad_token_id: int = PAD_TOKEN_ID):
        if mode not in MODES:
            raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.dataset, self.seq_len, self.mode, self.seed = dataset, seq_len, mode, seed
        self.shuffle, self.pad_token_id = shuffle, pad_token_id
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order(0)
        self._cached: tuple[int, int, Sample | None] | None = None  # (epoch, cursor, sample) of a sample that did not fit

    def _make_order(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _encode_at_cursor(self) -> Sample | None:
        if self._cached is not None and self._cached[:2] == (self.epoch, self.cursor):
            return self._cached[2]
        index = self._order[self.cursor]
        sample = self.dataset.encode(index)
        if sample is not None and sample.length > self.seq_len:
            self.dataset._bad(index, "too_long", f"{sample.length} tokens > seq_len {self.seq_len}")
            sample = None
        return sample

    def _next_epoch(self) -> None:
        self.epoch, self.cursor = self.epoch + 1, 0
        self._order = self._make_order(self.epoch)

    def next_batch(self) -> PackedBatch:
        """The next packed sequence. The epoch advances as soon as its last record is consumed, so
        ``epoch`` is always the epoch of the next sequence."""
        samples: list[Sample] = []
        used, scanned = 0, 0
        while True:
            if self.cursor >= len(self._order):
                if samples:
                    break
                if scanned >= len(self._order):  # a whole epoch without one usable sample
                    raise ValueError(f"{self.dataset.path}: no usable training record "
                                     f"({self.dataset.report.summary(len(self.dataset))})")
                self._next_epoch()
                continue
            sample = self._encode_at_cursor()
            scanned += 1
            if sample is None:
                self.cursor += 1
                continue
            if used + sample.length > self.seq_len:
                self._cached = (self.epoch, self.cursor, sample)
                break
            samples.append(sample)
            used += sample.length
            self.cursor += 1
        if self.cursor >= len(self._order):
            self._next_epoch()
        return pack_samples(samples, self.seq_len, self.mode, self.pad_token_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order(self.epoch)
        self._cached = None
