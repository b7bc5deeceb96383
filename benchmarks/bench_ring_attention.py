"""Benchmark of ring attention's per-step cost, simulated on one device (issue 3's benchmark).

Long-VITA's attention: 40 query heads, 8 KV heads, d=128, bf16, zig-zag shards of n = 4K, 16K, 64K
tokens per rank. No communication is timed (one GPU): this measures the compute schedule.
Modes (op ring_attention, provider ours unless said):
  step_attention  the attention_lse call of one ring step, per kind of step (x = "n=<n>/<kind>"):
                  diagonal (own block, causal), earlier (block of a lower rank: all queries vs its first
                  chunk), later (block of a higher rank: the second query chunk vs both its chunks);
                  each is ~n^2/2 (query, key) pairs
  step_merge      the merge_attention_ of that step into the fp32 running (out, lse); for the diagonal
                  step (the first one) it is the cast of its result to the fp32 accumulator
  step_total      vita_ext.parallel.ring.ring_forward_step as the ring runs it (attention + merge)
  schedule        the whole simulated ring at world size P (vita_ext.parallel.simulated_ring_attention over
                  all P ranks: provider ring_sim) against one attention_lse over the same sequence of
                  S = P*n tokens (provider single); cp_overhead = ring_sim / single - 1
  memory          peak device memory of one rank's ring forward (its q/k/v, the incoming K/V buffer,
                  the fp32 accumulators, step temporaries) at a fixed total length for P = 1, 2, 4, 8;
                  memory_x_P = memory(P) * P / memory(1) (1.0 = perfect 1/P scaling); kv_cache_per_rank
                  = that rank's KV cache for Long-VITA-14B's 48 layers (computed)
Targets: cp_overhead <= 0.05 at n = 16K; memory_x_P near 1.
"""
from __future__ import annotations

import sys

import torch

import _common
from _common import Bench

import vita_ext  # noqa: E402
from vita_ext.parallel import ZigZagPlan, simulated_ring_attention
from vita_ext.parallel import ring as ring_mod

OP = "ring_attention"
KINDS = {"diagonal": 1, "earlier": 0, "later": 2}  # src seen from rank 1 (world >= 3)
LAYERS_14B = 48


def shard_inputs(n, hq, hkv, d, dtype, device):
    return (torch.randn(1, n, hq, d, device=device).to(dtype), torch.randn(1, n, hkv, d, device=device).to(dtype),
            torch.randn(1, n, hkv, d, device=device).to(dtype))


def step_pairs(n: int, kind: str) -> float:
    return n * (n + 1) / 2 if kind == "diagonal" else n * n / 2


def bench_steps(b: Bench, n: int, hq: int, hkv: int, d: int) -> None:
    scale = d ** -0.5
    rank = 1
    q, k, v = shard_inputs(n, hq, hkv, d, b.dtype, b.device)
    base_out, base_lse = ring_mod.ring_forward_step(q, k, v, rank, rank, scale, None, None)
    for kind, src in KINDS.items():
        x = f"n={n}/{kind}"
        causal, qh, kh = ring_mod._block(rank, src)
        qs, ks, vs = ring_mod._half(q, qh), ring_mod._half(k, kh), ring_mod._half(v, kh)

        def attention(qs=qs, ks=ks, vs=vs, causal=causal):
            return vita_ext.attention_lse(qs, ks, vs, causal=causal, softmax_scale=scale)

        flops = 4.0 * hq * d * step_pairs(n, kind)
        b.time("ours", "step_attention", x, attention, flops=flops)
        o, l = attention()
        out, lse = base_out.clone(), base_lse.clone()
        if kind == "diagonal":
            merge = lambda: (o.float(), l.clone())  # noqa: E731 - the first step only converts
            step = lambda: ring_mod.ring_forward_step(q, k, v, rank, src, scale, None, None)  # noqa: E731
        else:
            out_h, lse_h = ring_mod._half(out, qh), ring_mod._lse_half(lse, qh)
            merge = lambda: vita_ext.merge_attention_(out_h, lse_h, o, l)  # noqa: E731
            step = lambda: ring_mod.ring_forward_step(q, k, v, rank, src, scale, out, lse)  # noqa: E731
        elt = torch.finfo(b.dtype).bits // 8
        rows = o.shape[1]
        merge_bytes = rows * hq * d * (8 + elt) + 12 * hq * rows
        b.time("ours", "step_merge", x, merge, nbytes=merge_bytes)
        b.time("ours", "step_total", x, step, flops=flops)
        m, t = b.value("ours", "step_merge", "time", x), b.value("ours", "step_total", "time", x)
        if m and t:
            b.row("ours", "step_total", "merge_share", "x", x, m / t)
        del o, l, out, lse
    del q, k, v, base_out, base_lse
    _common.free(b.device)


def bench_schedule(b: Bench, n: int, world: int, hq: int, hkv: int, d: int) -> None:
    total = n * world
    plan = ZigZagPlan(total, world)
    x = f"n={n},P={world}"
    q, k, v = shard_inputs(total, hq, hkv, d, b.dtype, b.device)
    shards = [[plan.shard(t, r).contiguous() for r in range(world)] for t in (q, k, v)]

    def single():
        return vita_ext.attention_lse(q, k, v, causal=True)

    def ring():
        return simulated_ring_attention(*shards, world)

    b.check("ring_sim", x, lambda: plan.unshard(ring()[0]), single()[0])
    flops = 4.0 * hq * d * total * (total + 1) / 2
    t_single = b.time("single", "schedule", x, single, flops=flops)
    t_ring = b.time("ring_sim", "schedule", x, ring, flops=flops)
    if t_single and t_ring:
        b.row("ours", "schedule", "cp_overhead", "x", x, t_ring / t_single - 1)
    del q, k, v, shards
    _common.free(b.device)


def rank_forward(n, world, hq, hkv, d, dtype, device):
    """One rank's ring forward (rank 0) with the real buffers: local q/k/v and one incoming K/V block."""
    scale = d ** -0.5
    q, k, v = shard_inputs(n, hq, hkv, d, dtype, device)
    out = lse = None
    kv = torch.stack([k, v])
    for step in range(world):
        src = (0 - step) % world
        nxt = torch.empty_like(kv) if step + 1 < world else None  # the receive buffer the ring posts
        out, lse = ring_mod.ring_forward_step(q, kv[0], kv[1], 0, src, scale, out, lse)
        if nxt is not None:
            kv = nxt.normal_()
    return out.to(dtype), lse


def bench_memory(b: Bench, total: int, worlds: list[int], hq: int, hkv: int, d: int) -> None:
    elt = torch.finfo(b.dtype).bits // 8
    base = None
    for world in worlds:
        plan = ZigZagPlan(total, world)
        n = 2 * plan.chunk
        x = f"S={total},P={world}"
        b.row("ours", "memory", "kv_cache_per_rank", "bytes", x, LAYERS_14B * 2 * n * hkv * d * elt)
        peak = b.memory("ours", "memory", x, lambda: rank_forward(n, world, hq, hkv, d, b.dtype, b.device))
        if peak:
            base = base or (peak if world == 1 else None)
            if base:
                b.row("ours", "memory", "memory_x_P", "x", x, peak * world / base)
        _common.free(b.device)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--per-rank", default=None, help="tokens per rank n (default 4096,16384,65536; quick 32,64)")
    p.add_argument("--world", type=int, default=4, help="simulated world size P for the schedule (default 4)")
    p.add_argument("--mem-total", type=int, default=None, help="total length for the memory rows (default 131072; "
                                                                  "quick 256)")
    p.add_argument("--mem-worlds", default="1,2,4,8")
    p.add_argument("--heads", default=None, help="q heads,kv heads,head dim (default 40,8,128; quick 4,2,16)")
    p.add_argument("--modes", default="step,schedule,memory")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    hq, hkv, d = _common.ints(args.heads or ("4,2,16" if args.quick else "40,8,128"))
    per_rank = _common.ints(args.per_rank or ("32,64" if args.quick else "4096,16384,65536"))
    modes = args.modes.split(",")
    for n in per_rank:
        if n % 2:
            raise SystemExit(f"--per-rank: n must be even (two chunks per rank), got {n}")
        if "step" in modes:
            bench_steps(b, n, hq, hkv, d)
        if "schedule" in modes:
            bench_schedule(b, n, args.world, hq, hkv, d)
    if "memory" in modes:
        if b.device.type != "cuda":
            b.note("memory rows are measured on CUDA only; writing the computed kv_cache_per_rank rows")
        bench_memory(b, args.mem_total or (256 if args.quick else 131072), _common.ints(args.mem_worlds), hq, hkv, d)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
