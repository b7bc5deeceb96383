"""Zig-zag sharding of a sequence over P context-parallel ranks.

The sequence is padded to a multiple of 2P and cut into 2P equal chunks; rank r keeps chunks r and
2P-1-r, so under a causal mask every rank does the same attention work (an early chunk pairs with a
late one). Padding goes at the end: no real position can see it, so it never changes real results.
Source: Long-VITA (arXiv 2502.05177) section 4; ring-flash-attention's zig-zag layout; TransformerEngine
"DualChunkSwap".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ZigZagPlan:
    """Who owns which positions. seq_len: real tokens S; world_size: P; multiple: extra pad granularity."""
    seq_len: int
    world_size: int
    multiple: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"ZigZagPlan: 'world_size' must be >= 1, got {self.world_size}")
        if self.seq_len < 1:
            raise ValueError(f"ZigZagPlan: 'seq_len' must be >= 1, got {self.seq_len}")

    @property
    def padded_len(self) -> int:
        unit = 2 * self.world_size * self.multiple
        return -(-self.seq_len // unit) * unit

    @property
    def chunk(self) -> int:
        return self.padded_len // (2 * self.world_size)

    def chunks_of(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world_size - 1 - rank

    def positions(self, rank: int) -> Tensor:
        """Global positions held by ``rank``, in local order: [2 * chunk] int64."""
        c = self.chunk
        a, b = self.chunks_of(rank)
        return torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)])

    def owner(self, position: int) -> int:
        """The rank holding a global position."""
        k = position // self.chunk
        return k if k < self.world_size else 2 * self.world_size - 1 - k

    def local_index(self, position: int) -> int:
        """Index of a global position in its owner's local sequence."""
        k, off = divmod(position, self.chunk)
        return off if k < self.world_size else self.chunk + off

    def pad(self, x: Tensor, value: float | int, dim: int = 1) -> Tensor:
        """Pad ``x`` along ``dim`` from seq_len to padded_len with ``value``."""
        extra = self.padded_len - x.shape[dim]
        if extra < 0:
            raise ValueError(f"ZigZagPlan.pad: dim {dim} has {x.shape[dim]} > padded length {self.padded_len}")
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_full(shape, value)], dim=dim)

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """Rank's two chunks of a padded [.., padded_len, ..] tensor, concatenated along ``dim``."""
        c = self.chunk
        a, b = self.chunks_of(rank)
        return torch.cat([x.narrow(dim, a * c, c), x.narrow(dim, b * c, c)], dim=dim)

    def unshard(self, shards: list[Tensor], dim: int = 1) -> Tensor:
        """Inverse of ``shard`` over all ranks (for tests and gathers): [.., padded_len, ..]."""
        c = self.chunk
        pieces: list[Tensor | None] = [None] * (2 * self.world_size)
        for rank, s in enumerate(shards):
            a, b = self.chunks_of(rank)
            pieces[a], pieces[b] = s.narrow(dim, 0, c), s.narrow(dim, c, c)
        return torch.cat(pieces, dim=dim)

    def local_vision(self, context_positions: Tensor, tokens_per_tile: int, rank: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The tiles this rank must encode and where their features go locally.

        Args:
            context_positions: [tiles * T] global CONTEXT positions (tile k owns [k*T, (k+1)*T)).
        Returns:
            (tile_ids [n] of the tiles with at least one position on this rank,
             feature_rows [m] indices into those tiles' flattened [n * T] features,
             local_rows [m] local sequence indices where those features go).
        A tile cut by a chunk boundary is encoded by both ranks that hold part of it.
        """
        owner = self._owner_tensor(context_positions)
        mine = owner == rank
        tiles = context_positions.view(-1, tokens_per_tile)
        tile_ids = mine.view(-1, tokens_per_tile).any(dim=1).nonzero().flatten()
        sel = mine.view(-1, tokens_per_tile)[tile_ids].reshape(-1)
        feature_rows = sel.nonzero().flatten()
        local_rows = self._local_tensor(tiles[tile_ids].reshape(-1)[sel])
        return tile_ids, feature_rows, local_rows

    def _owner_tensor(self, positions: Tensor) -> Tensor:
        k = positions // self.chunk
        return torch.where(k < self.world_size, k, 2 * self.world_size - 1 - k)

    def _local_tensor(self, positions: Tensor) -> Tensor:
        k, off = positions // self.chunk, positions % self.chunk
        return torch.where(k < self.world_size, off, self.chunk + off)
