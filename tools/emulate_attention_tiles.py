"""Host-side emulation (float64, no GPU) of csrc/cuda/attention_lse.cu's tile schedule, written for the
desk-check review of the never-run CUDA kernels. It mirrors the kernels' loop nests -- forward blocks
of R query rows walking key tiles [kbeg, kend), backward blocks of KB keys walking the row tiles
[first, end) of every q head of their GQA group, D padded with zeros to DMAX, per-element masks,
the online softmax with its `continue`, rows past `end` staged as zeros -- and checks:
  1. coverage: the (query, key) pairs each schedule visits equal reference.attention_mask exactly
     (random Sq/Sk/causal/cu_seqlens incl. empty segments, R/KB in {16, 32});
  2. values: out, lse, dq, dk, dv equal reference.attention_lse (+ autograd) to ~1e-15 on shapes with
     partial tiles, D = 80 / 200 / 33 padding, Sq > Sk (rows without keys), GQA, cu_seqlens, Sk = 0;
  3. non-finite inputs (NaN/Inf in q, a visible or a masked k, v, dO): out, lse, dq, dk, dv are NaN/Inf
     exactly where the pairwise reference (and its autograd) says -- the contract of attention_lse.h --
     and equal it elsewhere.
Keep it in step with the kernel's tile constants (Tile<DMAX>) when they change.
Run: python tools/emulate_attention_tiles.py   (about a minute; needs only torch)
"""
import importlib.util
import math
import os
import random

import torch

_ref_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vita_ext", "reference.py")
_spec = importlib.util.spec_from_file_location("vita_reference", _ref_path)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
attention_mask = ref.attention_mask


# attn::row_range / attn::rows_seeing of csrc/attention_lse.h
def row_range(sq, sk, causal, cu, i):
    lo, hi = 0, sk
    if cu is not None:
        a, b = 0, len(cu) - 2
        while a < b:
            mid = (a + b + 1) // 2
            if cu[mid] <= i: a = mid
            else: b = mid - 1
        lo, hi = cu[a], cu[a + 1]
    if causal:
        hi = min(hi, i + sk - sq + 1)
    if hi < lo: hi = lo
    return lo, hi

def rows_seeing(sq, sk, causal, cu, j0, j1):
    a, b = 0, sq
    while a < b:
        mid = (a + b) // 2
        lo, hi = row_range(sq, sk, causal, cu, mid)
        if hi > j0: b = mid
        else: a = mid + 1
    first = a; a = first; b = sq
    while a < b:
        mid = (a + b) // 2
        lo, hi = row_range(sq, sk, causal, cu, mid)
        if lo >= j1: b = mid
        else: a = mid + 1
    return first, a


def check_coverage(trials=3000):
    random.seed(0)
    bad = 0
    for trial in range(trials):
        causal = random.random() < 0.5
        if random.random() < 0.4:
            s = random.randint(1, 70); sq = sk = s
            n = random.randint(1, 5)
            cuts = sorted(random.randint(0, s) for _ in range(n - 1))
            cu = [0] + cuts + [s]
        else:
            sq, sk = random.randint(1, 70), random.randint(0, 70); cu = None
        R = random.choice([16, 32]); KT = random.choice([16, 32]); KB = random.choice([16, 32])
        mask = attention_mask(sq, sk, causal, torch.tensor(cu) if cu else None)
        # per-row ranges equal the mask
        for i in range(sq):
            lo, hi = row_range(sq, sk, causal, cu, i)
            row = torch.zeros(sk, dtype=torch.bool); row[lo:hi] = True
            if not torch.equal(row, mask[i]): bad += 1; print("row", sq, sk, causal, cu, i)
        fwd = torch.zeros(sq, sk, dtype=torch.bool)
        for i0 in range(0, sq, R):
            il = min(i0 + R, sq) - 1
            kbeg = row_range(sq, sk, causal, cu, i0)[0]; kend = row_range(sq, sk, causal, cu, il)[1]
            for i in range(i0, il + 1):
                lo, hi = row_range(sq, sk, causal, cu, i)
                for j in range(kbeg, kend):
                    if lo <= j < hi: fwd[i, j] = True
        bwd = torch.zeros(sq, sk, dtype=torch.bool)
        for j0 in range(0, sk, KB):
            j1 = min(j0 + KB, sk)
            first, end = rows_seeing(sq, sk, causal, cu, j0, j1)
            for i0 in range(first, end, R):
                for i in range(i0, min(i0 + R, end)):
                    lo, hi = row_range(sq, sk, causal, cu, i)
                    for j in range(j0, j1):
                        if lo <= j < hi: bwd[i, j] = True
        if not torch.equal(fwd, mask) or not torch.equal(bwd, mask):
            bad += 1; print("cover", sq, sk, causal, cu, R, KT, KB)
    print("coverage mismatches:", bad)
    assert bad == 0


def dmax_of(d): return 32 if d <= 32 else 64 if d <= 64 else 128 if d <= 128 else 256

FAST = {"fwd": 0, "bwd": 0}  # how often the kernels' unmasked paths were taken (they must be exercised)


def nan_max(a, b): return b if (b > a or b != b) else a  # the kernel's nan_max (max/fmax drop NaN)

def exp_(x):  # CUDA's exp: inf for large x, NaN for NaN (Python's math.exp raises on overflow)
    return math.inf if x > 709 else math.exp(x)

def fwd(q, k, v, causal, scale, cu):
    B, Sq, Hq, D = q.shape; Sk, Hkv = k.shape[1], k.shape[2]
    DM = dmax_of(D); R = 32 if DM <= 128 else 16; KT = R
    out = torch.full((B, Sq, Hq, D), float("nan"), dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("nan"), dtype=torch.float64)
    pad = lambda t: torch.nn.functional.pad(t, (0, DM - D))
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for bx in range((Sq + R - 1) // R):
                i0 = bx * R; il = min(i0 + R, Sq) - 1
                kbeg, hi_first = row_range(Sq, Sk, causal, cu, i0); lo_last, kend = row_range(Sq, Sk, causal, cu, il)
                for t in range(R):
                    i = i0 + t; valid = i < Sq
                    lo, hi = row_range(Sq, Sk, causal, cu, i) if valid else (0, 0)
                    qr = pad(q[b, i, h]) if valid else torch.zeros(DM, dtype=torch.float64)
                    o = torch.zeros(DM, dtype=torch.float64); m = -math.inf; l = 0.0
                    for j0 in range(kbeg, kend, KT):
                        ks = torch.zeros(KT, DM, dtype=torch.float64); vs = torch.zeros(KT, DM, dtype=torch.float64)
                        for jj in range(KT):
                            if j0 + jj < kend: ks[jj] = pad(k[b, j0 + jj, hk]); vs[jj] = pad(v[b, j0 + jj, hk])
                        s = [(float(qr @ ks[jj]) * scale if lo <= j0 + jj < hi else -math.inf) for jj in range(KT)]
                        mn = m
                        for x in s: mn = nan_max(mn, x)
                        if mn == -math.inf: continue
                        alpha = 0.0 if m == -math.inf else exp_(m - mn)
                        l *= alpha; o *= alpha
                        full_tile = lo_last <= j0 and hi_first >= j0 + KT  # the kernel's unmasked path
                        if full_tile:
                            assert all(lo <= j0 + jj < hi for jj in range(KT)) or not valid
                            FAST["fwd"] += 1
                        for jj in range(KT):
                            pj = exp_(s[jj] - mn); l += pj
                            if full_tile or lo <= j0 + jj < hi: o += pj * vs[jj]  # else a select, not 0 * v
                        m = mn
                    if not valid: continue
                    seen = l != 0  # NaN counts as seen
                    out[b, i, h] = (o / l)[:D] if seen else 0.0
                    lse[b, h, i] = -math.inf if not seen else (math.inf if m == math.inf else m + math.log(l))
    return out, lse

def bwd(go, gl, q, k, v, out, lse, causal, scale, cu):
    B, Sq, Hq, D = q.shape; Sk, Hkv = k.shape[1], k.shape[2]
    DM = dmax_of(D); G = 4 if DM <= 128 else 8; KB = 128 // G; R = 32 if DM <= 128 else 16
    delta = (go * out).sum(-1).transpose(1, 2) - (gl if gl is not None else 0)
    dq = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    dk = torch.full((B, Sk, Hkv, D), float("nan"), dtype=torch.float64); dv = dk.clone()
    pad = lambda t: torch.nn.functional.pad(t, (0, DM - D))
    group = Hq // Hkv
    for b in range(B):
        for hk in range(Hkv):
            for bx in range((Sk + KB - 1) // KB):
                j0 = bx * KB; j1 = min(j0 + KB, Sk)
                ks = torch.zeros(KB, DM, dtype=torch.float64); vs = ks.clone()
                for jj in range(KB):
                    if j0 + jj < Sk: ks[jj] = pad(k[b, j0 + jj, hk]); vs[jj] = pad(v[b, j0 + jj, hk])
                dkr = torch.zeros(KB, DM, dtype=torch.float64); dvr = dkr.clone()
                first, end = rows_seeing(Sq, Sk, causal, cu, j0, j1)
                for h in range(hk * group, (hk + 1) * group):
                    for i0 in range(first, end, R):
                        qs = torch.zeros(R, DM, dtype=torch.float64); dos = qs.clone()
                        lo_s, hi_s, lse_s, dl_s = [0] * R, [0] * R, [-math.inf] * R, [0.0] * R
                        for r in range(R):
                            i = i0 + r
                            if i < end:
                                qs[r] = pad(q[b, i, h]); dos[r] = pad(go[b, i, h])
                                lo_s[r], hi_s[r] = row_range(Sq, Sk, causal, cu, i)
                                lse_s[r] = float(lse[b, h, i]); dl_s[r] = float(delta[b, h, i])
                        ds = torch.zeros(R, KB, dtype=torch.float64)
                        all_vis = (j0 + KB <= Sk and lo_s[R - 1] <= j0 and hi_s[R - 1] >= j0 + KB and hi_s[0] >= j0 + KB
                                   and all(x != -math.inf for x in lse_s))
                        FAST["bwd"] += all_vis
                        for r in range(R):
                            for jl in range(KB):
                                j = j0 + jl
                                sp = float(ks[jl] @ qs[r]); dp = float(vs[jl] @ dos[r])
                                vis = j < Sk and lo_s[r] <= j < hi_s[r] and lse_s[r] != -math.inf
                                assert vis or not all_vis  # the kernel's unmasked path only where all is seen
                                vis = vis or all_vis
                                pr = (math.nan if lse_s[r] == math.inf else exp_(sp * scale - lse_s[r])) if vis else 0.0
                                d_ = pr * (dp - dl_s[r]) if vis else 0.0
                                if vis: dvr[jl] += pr * dos[r]; dkr[jl] += d_ * qs[r]
                                ds[r, jl] = d_
                        for r in range(R):  # add_dq: only the keys row r sees, then one atomicAdd if nonzero
                            i = i0 + r
                            if i >= end: continue
                            acc = torch.zeros(DM, dtype=torch.float64)
                            for jl in range(KB):
                                if j0 + jl < Sk and lo_s[r] <= j0 + jl < hi_s[r] and lse_s[r] != -math.inf:
                                    acc += ds[r, jl] * ks[jl]
                            dq[b, i, h] += (acc * scale)[:D]
                for jl in range(KB):
                    j = j0 + jl
                    if j < Sk: dk[b, j, hk] = (dkr[jl] * scale)[:D]; dv[b, j, hk] = dvr[jl][:D]
    return dq, dk, dv

def check_values():
    random.seed(1)
    torch.manual_seed(1)
    cases = [((1, 5, 37, 2, 1, 80), True, None), ((1, 40, 9, 2, 2, 16), True, None), ((1, 35, 35, 4, 2, 8), True, [0, 5, 5, 17, 35]),
             ((2, 3, 3, 2, 1, 200), False, None), ((1, 35, 35, 2, 1, 33), False, [0, 20, 35]), ((1, 3, 0, 2, 1, 8), True, None),
             ((1, 64, 70, 2, 1, 16), False, None), ((1, 96, 96, 2, 1, 16), True, None)]
    for (B, Sq, Sk, Hq, Hkv, D), causal, cu in cases:
        q = torch.randn(B, Sq, Hq, D, dtype=torch.float64); k = torch.randn(B, Sk, Hkv, D, dtype=torch.float64); v = torch.randn_like(k)
        scale = D ** -0.5
        cut = torch.tensor(cu) if cu else None
        o, l = fwd(q, k, v, causal, scale, cu)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        ro, rl = ref.attention_lse(qq, kk, vv, causal, scale, cut)
        go = torch.randn_like(ro); gl = torch.randn_like(rl)
        e1 = (o - ro).abs().max().item() if o.numel() else 0
        fin = torch.isfinite(rl)
        e2 = (l[fin] - rl[fin]).abs().max().item() if fin.any() else 0
        assert torch.equal(torch.isneginf(l), torch.isneginf(rl))
        if Sk == 0:
            print("fwd", (B, Sq, Sk, D), e1, e2)
            assert e1 < 1e-12 and e2 < 1e-12
            continue
        # dead rows: gradient wrt lse is masked out where lse is -inf
        glm = torch.where(fin, gl, torch.zeros_like(gl))
        gdq, gdk, gdv = torch.autograd.grad((ro, rl), (qq, kk, vv), (go, glm), allow_unused=True)
        dq, dk, dv = bwd(go, glm, q, k, v, o, l, causal, scale, cu)
        errs = [e1, e2] + [(a - b).abs().max().item() for a, b in ((dq, gdq), (dk, gdk), (dv, gdv))]
        print((B, Sq, Sk, Hq, Hkv, D), causal, cu, "out lse dq dk dv errors:", *("%.1e" % e for e in errs))
        assert all(e < 1e-12 for e in errs)  # NaN-initialised outputs also prove every element is written


def check_non_finite():
    """The kernel's NaN/Inf rules against the pairwise reference: same non-finite pattern, same values."""
    torch.manual_seed(2)
    nan, inf = float("nan"), float("inf")
    poisons = {"q nan": lambda q, k, v, g: q.__setitem__((0, 20, 1, 0), nan),
               "k nan (seen by some rows)": lambda q, k, v, g: k.__setitem__((0, 30, 0, 2), nan),
               "v nan": lambda q, k, v, g: v.__setitem__((0, 30, 0, 2), nan),
               "k +inf": lambda q, k, v, g: k.__setitem__((0, 30, 0, 2), inf),
               "v -inf": lambda q, k, v, g: v.__setitem__((0, 7, 0, 1), -inf),
               "dO nan": lambda q, k, v, g: g.__setitem__((0, 20, 1, 3), nan)}
    for name, poison in poisons.items():
        for causal, cu in ((True, None), (False, [0, 25, 40]), (True, [0, 25, 40]), (False, None)):
            q = torch.randn(1, 40, 2, 8, dtype=torch.float64); k = torch.randn(1, 40, 1, 8, dtype=torch.float64)
            v = torch.randn_like(k); go = torch.randn_like(q)
            poison(q, k, v, go)
            scale = 8 ** -0.5
            o, l = fwd(q, k, v, causal, scale, cu)
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            ro, rl = ref.attention_lse(qq, kk, vv, causal, scale, torch.tensor(cu) if cu else None, pairwise=True)
            gdq, gdk, gdv = torch.autograd.grad(ro, (qq, kk, vv), go)
            dq, dk, dv = bwd(go, None, q, k, v, o, l, causal, scale, cu)
            for what, ours, want in (("out", o, ro), ("lse", l, rl), ("dq", dq, gdq), ("dk", dk, gdk), ("dv", dv, gdv)):
                for test in (torch.isnan, torch.isposinf, torch.isneginf):
                    assert torch.equal(test(ours), test(want.detach())), (name, causal, cu, what, test.__name__)
                ok = torch.isfinite(want)
                assert not ok.any() or (ours[ok] - want.detach()[ok]).abs().max().item() < 1e-12, (name, what)
            print("non-finite:", name, "causal" if causal else "full", cu, "patterns and values agree")


if __name__ == "__main__":
    check_coverage()
    check_values()
    check_non_finite()
    print("unmasked fast paths taken (forward key tiles, backward row tiles):", FAST)
    assert FAST["fwd"] > 0 and FAST["bwd"] > 0
