"""One scenario of planted.py, run in a fresh process with $VITA_EXT_CUDA_EMU naming the library under
test: the op under forward, reverse and random order against the CPU twin. Prints one JSON line
{order: {"status": "ok" | "mismatch" | "nan" | "error", "detail": ...}}."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_emu  # noqa: E402


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def merge_attention():
    import vita_ext

    out0, big = rand(2, 7, 3, 64), rand(2 * 7 * 3 * 64 + 1)
    makers = [lambda: out0.clone(), lambda: big.clone()[1:].view(2, 7, 3, 64)]  # aligned; misaligned by 4 bytes
    rest = [(rand(2, 3, 7), rand(2, 7, 3, 64), rand(2, 3, 7)) for _ in makers]

    def run():
        outs = []
        for make, (lse, bo, bl) in zip(makers, rest):
            o, l = make(), lse.clone()
            vita_ext.merge_attention_(o, l, bo, bl)
            outs += [o, l]
        return outs

    return run


def attention_forward():
    import vita_ext

    q, k, v = rand(1, 70, 2, 40), rand(1, 70, 1, 40), rand(1, 70, 1, 40)
    return lambda: list(vita_ext.attention_lse(q, k, v, causal=True, backend="vita"))  # the CUDA kernel, not PyTorch's


def projector_forward():
    import vita_ext

    x = rand(2, 16, 8)
    lw, lb, w1, w2 = 1 + 0.1 * rand(32), 0.1 * rand(32), rand(12, 32) / 6, rand(10, 12) / 4
    return lambda: [vita_ext.pixel_shuffle_projector(x, lw, lb, w1, w2)]


def masked_lm_head():
    import vita_ext

    h, w = rand(13, 24), rand(40, 24)
    pos = torch.tensor([5, 0, 9, 2, 7])
    return lambda: [vita_ext.masked_lm_head(h, w, pos)]


def main() -> None:
    torch.manual_seed(0)
    cuda_emu.load()
    fn = globals()[sys.argv[1]]()
    want = fn()  # the CPU twin
    results = {}
    for order in cuda_emu.ORDERS:
        try:
            with cuda_emu.serving(order=order, seed=5):
                got = fn()
        except RuntimeError as exc:
            results[order] = {"status": "error", "detail": str(exc).splitlines()[0]}
            continue
        status, detail = "ok", ""
        for i, (a, b) in enumerate(zip(want, got)):
            if torch.isnan(b).any() and not torch.isnan(a).any():
                status, detail = "nan", f"output {i} has NaN"
                break
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True):
                status, detail = "mismatch", f"output {i}: max diff {(a - b).abs().nan_to_num(1e30).max().item():.3g}"
                break
        results[order] = {"status": status, "detail": detail}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
