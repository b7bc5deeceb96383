"""Benchmark of merge_attention_ (issue 4, target 4).

One ring-attention merge: running out [1, S, 40, 128] fp32 and lse [1, 40, S] fp32 updated in place
with a block's out (bf16, as attention_lse returns it) and lse, for S = 4K, 16K, 64K tokens per rank.
Modes:
  merge       whole tensors
  merge_half  into the second half of a [1, 2S, H, D] running output (a strided view), as the ring
              steps whose block only reaches the later query chunk do
Providers:
  ours     vita_ext.merge_attention_
  eager    vita_ext.reference.merge_attention (fp32) + copy_ back into out and lse
  compile  torch.compile of eager
Metrics: time (ms), GB/s of the minimal traffic (out and lse read + written, block out and lse read),
frac_of_copy (GB/s / same-run device-to-device copy GB/s), speedup_vs_<provider>.
Target: ours frac_of_copy >= 0.8.
"""
from __future__ import annotations

import sys

import torch

import _common
from _common import Bench

import vita_ext  # noqa: E402
from vita_ext import reference

OP = "merge_attention"


def ours(out, lse, block_out, block_lse):
    vita_ext.merge_attention_(out, lse, block_out, block_lse)


def eager(out, lse, block_out, block_lse):
    new_out, new_lse = reference.merge_attention(out, lse, block_out, block_lse)
    out.copy_(new_out)
    lse.copy_(new_lse)


def make_inputs(s, h, d, dtype, device, sets, half: bool):
    def one():
        rows = 2 * s if half else s
        out = torch.randn(1, rows, h, d, device=device)
        lse = 5 + 2 * torch.randn(1, h, rows, device=device)
        if half:
            out, lse = out[:, s:], lse[:, :, s:]
        return out, lse, torch.randn(1, s, h, d, device=device).to(dtype), 5 + 2 * torch.randn(1, h, s, device=device)
    return [one() for _ in range(sets)]


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--seqlens", default=None, help="tokens per rank S (default 4096,16384,65536; quick 64,96)")
    p.add_argument("--heads", default=None, help="heads,head dim (default 40,128; quick 4,16)")
    p.add_argument("--modes", default="merge,merge_half")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    h, d = _common.ints(args.heads or ("4,16" if args.quick else "40,128"))
    seqlens = _common.ints(args.seqlens or ("64,96" if args.quick else "4096,16384,65536"))
    elt = torch.finfo(b.dtype).bits // 8
    providers = {"ours": ours, "eager": eager, "compile": b.compiled(eager) if b.compile_on else None}
    providers = {k: v for k, v in providers.items() if v is not None}
    traffic = {s: 2 * 4 * s * h * d + elt * s * h * d + 3 * 4 * h * s for s in seqlens}
    copy = b.copy_peak(max(traffic.values()) // 2)  # a copy of half the bytes moves the same traffic
    for s in seqlens:
        x = f"S={s}"
        nbytes = traffic[s]
        for mode in args.modes.split(","):
            half = mode == "merge_half"
            sets = make_inputs(s, h, d, b.dtype, b.device, _common.rotations(nbytes, b.device), half)
            first = sets[0]

            def after(fn, first=first):
                out, lse = first[0].clone(), first[1].clone()
                fn(out, lse, first[2], first[3])
                return out, lse

            ref = after(ours)
            for name, fn in providers.items():
                if name != "ours":
                    b.check(name, f"{mode} {x}", lambda: after(fn), ref, tol=1e-5)
            del ref
            for name, fn in providers.items():
                b.time(name, mode, x, fn, sets, nbytes=nbytes)
                b.memory(name, mode, x, lambda: fn(*first))
            for base in providers:
                if base != "ours":
                    b.speedup(mode, x, "ours", base)
            for name in providers:
                b.fraction(mode, x, name, "gbps", copy, "frac_of_copy")
            del sets, first
            _common.free(b.device)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
