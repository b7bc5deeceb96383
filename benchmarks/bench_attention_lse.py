"""Benchmark of attention_lse (issue 4, target 3).

Long-VITA's LLM attention: B=1, 40 query heads, 8 KV heads, d=128, bf16. Modes:
  fwd      causal prefill at S = 4K, 16K, 64K (Sq = Sk = S)
  decode   Sq = 1 against a KV cache of 128K keys (sees every key)
  fwd_bwd  causal prefill forward + backward (only when asked: --modes fwd,decode,fwd_bwd)
Providers:
  ours        vita_ext.attention_lse (returns out and the log-sum-exp), its automatic backend choice
  ours_flash, ours_vita, ours_flash_attn  the same forced to one backend (a backend that cannot serve a
              case, e.g. flash for fp32 CPU training, is noted and skipped)
  sdpa        torch.nn.functional.scaled_dot_product_attention with enable_gqa=True; on CUDA pinned to
              the flash backend (SDPBackend.FLASH_ATTENTION), the target's yardstick
  sdpa_cudnn  the same pinned to the cuDNN backend (CUDA only; skipped with a note if unsupported)
  eager       vita_ext.reference.attention_lse (materialises the [S, S] scores; skipped where it cannot fit)
  compile     torch.compile of the reference (likewise)
Metrics: time (ms), TFLOP/s (4*Hq*D per allowed (query, key) pair: causal counts S(S+1)/2 pairs;
fwd_bwd counts 3.5x the forward), speedup_vs_<provider>, frac_of_peak (vs an 8192^3 GEMM in the same
run); decode: GB/s of the K/V read and time_vs_floor = time / (bytes / same-run copy bandwidth).
Targets: fwd speedup_vs_sdpa >= 0.9 (aim > 1); decode time_vs_floor <= 1.2. On the CPU (issue 10):
fwd and fwd_bwd speedup_vs_sdpa >= 0.95 at B=1, 8/2 heads, D=64 and 128, S=2K and 8K, fp32 and bf16
(the CPU defaults: ``run_all.sh --device cpu``); there the providers are timed in alternation
(``Bench.time_group``: paired ratios within one run) so the shared machine's load swings hit all alike.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

import _common
from _common import Bench, grad_fn, leaf

import vita_ext  # noqa: E402
from vita_ext import reference

OP = "attention_lse"


def ours(q, k, v, causal=True):
    return vita_ext.attention_lse(q, k, v, causal=causal)


def forced(backend: str):
    def run(q, k, v, causal=True):
        return vita_ext.attention_lse(q, k, v, causal=causal, backend=backend)

    return run


def eager(q, k, v, causal=True):
    return reference.attention_lse(q, k, v, causal=causal)


def sdpa_provider(b: Bench, backend_name: str | None):
    """SDPA on [B, S, H, D] tensors (transposed views, no copies), optionally pinned to one backend."""
    pin = contextlib.nullcontext
    if b.device.type == "cuda" and backend_name is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        pin = lambda: sdpa_kernel(backend)  # noqa: E731

    def run(q, k, v, causal=True):
        # SDPA's is_causal is top-left aligned; it equals ours (bottom-right) when Sq == Sk. Sq = 1 sees all keys.
        is_causal = causal and q.shape[1] == k.shape[1]
        with pin():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=is_causal, enable_gqa=True)
        return out.transpose(1, 2)

    return run


def make_inputs(sq, sk, hq, hkv, d, dtype, device, sets):
    return [(torch.randn(1, sq, hq, d, device=device).to(dtype), torch.randn(1, sk, hkv, d, device=device).to(dtype),
             torch.randn(1, sk, hkv, d, device=device).to(dtype)) for _ in range(sets)]


def fits_materialised(b: Bench, sq: int, sk: int, hq: int) -> bool:
    """Whether the reference's [B, Hq, Sq, Sk] scores (a few copies, fp32 among them) can fit at all."""
    if b.device.type != "cuda":
        return True
    need = hq * sq * sk * (3 * (torch.finfo(b.dtype).bits // 8) + 8)
    return need < torch.cuda.get_device_properties(b.device).total_memory


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--seqlens", default=None,
                   help="causal prefill S (default 4096,16384,65536; CPU 2048,8192; quick 64,96)")
    p.add_argument("--decode-len", type=int, default=None,
                   help="KV length for decode (default 131072; CPU 8192; quick 256)")
    p.add_argument("--heads", default=None, help="q heads,kv heads,head dim, several separated by ';' "
                   "(default 40,8,128; CPU 8,2,64;8,2,128; quick 4,2,16)")
    p.add_argument("--modes", default=None, help="default fwd,decode (CPU: fwd,fwd_bwd,decode)")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    cpu = b.device.type == "cpu" and not args.quick
    configs = [_common.ints(h) for h in (args.heads or ("4,2,16" if args.quick else "8,2,64;8,2,128" if cpu
                                                         else "40,8,128")).split(";")]
    seqlens = _common.ints(args.seqlens or ("64,96" if args.quick else "2048,8192" if cpu else "4096,16384,65536"))
    decode_len = args.decode_len or (256 if args.quick else 8192 if cpu else 131072)
    modes = (args.modes or ("fwd,fwd_bwd,decode" if cpu else "fwd,decode")).split(",")
    peak = b.device_peak()
    for hq, hkv, d in configs:
        run_config(b, args, hq, hkv, d, seqlens, decode_len, modes, peak, len(configs) > 1 or cpu)
    return b.finish()


def run_config(b: Bench, args, hq, hkv, d, seqlens, decode_len, modes, peak, name_d: bool) -> None:
    """Every mode at one head configuration; rows' x names d when several configurations run (and the dtype
    on the CPU, whose runs cover several dtypes in one CSV)."""
    elt = torch.finfo(b.dtype).bits // 8
    cpu = b.device.type == "cpu"
    providers = {"ours": ours, **{f"ours_{n}": forced(n) for n in ("flash", "vita", "flash_attn")},
                 "sdpa": sdpa_provider(b, "FLASH_ATTENTION"), "eager": eager,
                 "compile": b.compiled(eager) if b.compile_on else None}
    if args.providers is None:  # by default: the backends this device has; on the CPU, ours vs SDPA
        keep = ("ours", "sdpa", "ours_vita") if cpu and not args.quick else None
        providers = {k: v for k, v in providers.items()
                     if (keep is None or k in keep)
                     and (k not in ("ours_flash", "ours_vita", "ours_flash_attn")
                          or vita_ext.attention_backends(b.device, b.dtype, d)[k[5:]]["available"])}
    if b.device.type == "cuda":
        providers["sdpa_cudnn"] = sdpa_provider(b, "CUDNN_ATTENTION")
        b.note("sdpa is pinned to the flash backend; sdpa_cudnn to cuDNN")
    providers = {k: v for k, v in providers.items() if v is not None}
    materialising = ("eager", "compile")

    def usable(name, sq, sk, x):
        if name in materialising and not fits_materialised(b, sq, sk, hq):
            if b.wants(name):
                b.note(f"{name} skipped at {x}: the [Hq, Sq, Sk] scores cannot fit in device memory")
            return False
        # the old kernel is shown beside ours at the small size only (on the CPU it runs fp32 training anyway)
        return not (cpu and not args.quick and args.providers is None and name == "ours_vita" and sq > 2048)

    def label(x):
        return b.label(f"{x} d={d}" if name_d else x)

    def run_mode(mode, sq, sk, x, flops, nbytes, backward=False):
        sets = make_inputs(sq, sk, hq, hkv, d, b.dtype, b.device,
                           _common.rotations(elt * (sq * hq + 2 * sk * hkv) * d, b.device))
        first = sets[0]
        ref_out, ref_lse = ours(*first)
        for name, fn in providers.items():
            if name != "ours" and usable(name, sq, sk, x):
                b.check(name, x, lambda: fn(*first)[0] if name in materialising else fn(*first), ref_out)
        if "eager" in providers and usable("eager", sq, sk, x):
            b.check("eager", f"{x} (lse)", lambda: eager(*first)[1], ref_lse, tol=1e-3)
        del ref_out, ref_lse
        if backward:
            sets = [tuple(leaf(t) for t in s) + (torch.randn_like(s[0]),) for s in sets]
        runs = {name: grad_fn(fn, (0, 1, 2)) if backward else fn for name, fn in providers.items()
                if usable(name, sq, sk, x)}
        # CPU: interleaved rounds and paired ratios (Bench.time_group); CUDA: events per provider
        b.time_group(mode, x, runs, sets, ours=("ours", "ours_vita"), flops=flops, nbytes=nbytes)
        if b.device.type == "cuda":
            for name, run in runs.items():
                b.memory(name, mode, x, lambda: run(*sets[0]))
        if mode != "decode":
            b.fraction(mode, x, "ours", "tflops", peak, "frac_of_peak")
        del sets, first
        _common.free(b.device)

    for s in seqlens:
        pairs = s * (s + 1) / 2
        if "fwd" in modes:
            run_mode("fwd", s, s, label(f"S={s}"), 4.0 * hq * d * pairs, None)
        if "fwd_bwd" in modes:
            run_mode("fwd_bwd", s, s, label(f"S={s}"), 3.5 * 4.0 * hq * d * pairs, None, backward=True)
    if "decode" in modes:
        x = label(f"KV={decode_len}")
        kv_bytes = 2 * decode_len * hkv * d * elt + 2 * hq * d * elt
        copy = b.copy_peak(max(kv_bytes, 2**20))
        run_mode("decode", 1, decode_len, x, 4.0 * hq * d * decode_len, kv_bytes)
        t = b.value("ours", "decode", "time", x)
        if t and copy:
            floor_ms = kv_bytes / (copy * 1e9) * 1e3
            b.row("ours", "decode", "time_vs_floor", "x", x, t / floor_ms)
        b.fraction("decode", x, "ours", "gbps", copy, "frac_of_copy")


if __name__ == "__main__":
    sys.exit(main())
