"""Ring attention over torch.distributed for zig-zag shards (causal, GQA), forward and backward.

Each rank holds q/k/v for its two chunks [B, 2c, H, D] (chunk r and 2P-1-r). K/V travel around the
ring (rank r sends to r+1, receives from r-1) with ``batch_isend_irecv``; the transfer of the next
block is posted before the attention on the current one, so on GPUs NCCL moves it on its own stream
while the current block computes (double buffer: the block in use and the one arriving). Per step,
for the block that came from rank ``src``:
  src == rank: both local chunks vs both local chunks, causal (the diagonal);
  src <  rank: both query chunks vs src's first chunk, full (its second chunk is in their future);
  src >  rank: only the second query chunk vs both of src's chunks, full.
Partial results are merged with ``merge_attention_`` in fp32 and cast once at the end. The backward
sends dK/dV accumulators around the ring with the K/V they belong to; one last hop returns each to
its owner. Per step and layer the traffic is 2 * B * 2c * Hkv * D elements (K and V).
Source: Ring Attention (Liu et al., 2023); zig-zag layout of ring-flash-attention; Long-VITA section 4.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vita_ext.ops import attention_lse, attention_lse_backward, merge_attention_


def group_info(group=None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; raises a clear error when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallel: torch.distributed is not initialised; launch with "
                           "`torchrun --nproc-per-node P ...` (vita-ext does it for you with --context-parallel) "
                           "or call torch.distributed.init_process_group() first")
    return dist.get_rank(group), dist.get_world_size(group)


class RingComm:
    """Posts send-to-next / receive-from-previous pairs of one tensor and waits on them."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_info(group)
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)
        self._reqs: list = []

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def start(self, *send: Tensor) -> list[Tensor]:
        """Post the sends of ``send`` to the next rank and receives of same-shaped tensors from the previous."""
        recv = [torch.empty_like(t) for t in send]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        self._reqs = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


def _block(rank: int, src: int) -> tuple[bool, slice | None, slice | None]:
    """(causal, query half, key half) for the block of rank ``src`` seen from ``rank`` (None = all)."""
    if src == rank:
        return True, None, None
    if src < rank:
        return False, None, slice(0, 1)
    return False, slice(1, 2), None


def _half(x: Tensor, which: slice | None) -> Tensor:
    if which is None:
        return x
    c = x.shape[1] // 2
    return x[:, which.start * c:which.stop * c]


def _lse_half(lse: Tensor, which: slice | None) -> Tensor:
    if which is None:
        return lse
    c = lse.shape[2] // 2
    return lse[:, :, which.start * c:which.stop * c]


def ring_forward_step(q: Tensor, k: Tensor, v: Tensor, rank: int, src: int, scale: float,
                      out: Tensor | None, lse: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attend local q to the K/V block of rank ``src`` and merge into (out fp32, lse); returns them."""
    causal, qh, kh = _block(rank, src)
    o, l = attention_lse(_half(q, qh), _half(k, kh), _half(v, kh), causal=causal, softmax_scale=scale)
    if out is None:  # the first step is always the diagonal block, which covers every query row
        return o.float(), l.clone()
    merge_attention_(_half(out, qh), _lse_half(lse, qh), o, l)
    return out, lse


def ring_backward_step(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rank: int, src: int,
                       scale: float, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Accumulate (in fp32) the gradients of the block of rank ``src`` into dq and the travelling dk/dv."""
    causal, qh, kh = _block(rank, src)
    # The GLOBAL out and lse of these rows make each block's backward exact without an lse gradient, so
    # any backend's backward serves (the ring-flash-attention recipe).
    gq, gk, gv = attention_lse_backward(_half(dout, qh), _half(q, qh), _half(k, kh), _half(v, kh), _half(out, qh),
                                        _lse_half(lse, qh), causal, scale)
    _half(dq, qh).add_(gq)
    _half(dk, kh).add_(gk)
    _half(dv, kh).add_(gv)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        comm = RingComm(group)
        kv = torch.stack([k, v])  # one message per step: [2, B, 2c, Hkv, D]
        out = lse = None
        for step in range(comm.world):
            nxt = comm.start(kv) if step + 1 < comm.world else None
            src = (comm.rank - step) % comm.world
            out, lse = ring_forward_step(q, kv[0], kv[1], comm.rank, src, scale, out, lse)
            if nxt is not None:
                comm.wait()
                kv = nxt[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        comm = RingComm(ctx.group)
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # travels with kv, collecting every rank's share
        dout = dout.contiguous()
        for step in range(comm.world):
            nxt = comm.start(kv) if step + 1 < comm.world else None  # K/V move while this block computes
            src = (comm.rank - step) % comm.world
            ring_backward_step(dout, q, kv[0], kv[1], out, lse, comm.rank, src, ctx.scale, dq, dkv[0], dkv[1])
            if nxt is not None:
                comm.wait()
                kv = nxt[0]
                (dkv,) = comm.start(dkv)  # the accumulator follows once this rank's share is in
                comm.wait()
        if comm.world > 1:  # the last hop brings each rank's dK/dV home
            (dkv,) = comm.start(dkv)
            comm.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, softmax_scale: float | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Causal attention of a zig-zag-sharded sequence across the ranks of ``group``.

    Args:
        q: [B, 2c, Hq, D] this rank's queries (chunk r then chunk 2P-1-r); k, v: [B, 2c, Hkv, D].
        group: the context-parallel process group (default: the world).
        softmax_scale: default 1/sqrt(D).
    Returns:
        (out [B, 2c, Hq, D] in q's dtype, lse [B, Hq, 2c] fp32): exactly the rows of single-device
        causal ``attention_lse`` over the whole sequence that this rank holds. Differentiable
        w.r.t. q, k, v (the backward runs its own ring).
    Raises:
        RuntimeError if torch.distributed is not initialised or the local length is odd.
    """
    if q.shape[1] % 2:
        raise RuntimeError(f"ring_attention: the local sequence must hold two equal chunks, got length {q.shape[1]}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k.contiguous(), v.contiguous(), scale, group)


def simulated_ring_attention(q: Tensor, k: Tensor, v: Tensor, world_size: int,
                             softmax_scale: float | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Run every rank's ring schedule in one process (same steps and merges, no communication).

    q/k/v are the P ranks' shards stacked: lists of [B, 2c, H, D]. Returns the per-rank (out, lse)
    lists. Used to test the schedule on one GPU and to benchmark per-step costs.
    """
    scale = q[0].shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    outs, lses = [], []
    for rank in range(world_size):
        out = lse = None
        for step in range(world_size):
            src = (rank - step) % world_size
            out, lse = ring_forward_step(q[rank], k[src], v[src], rank, src, scale, out, lse)
        outs.append(out.to(q[rank].dtype))
        lses.append(lse)
    return outs, lses
