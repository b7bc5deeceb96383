"""masked_lm_head: logits of selected rows only, against reference.masked_lm_head in float64."""
import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, host_syncs, profiled, rand

OP = torch.ops.vita_ext.masked_lm_head.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
T, H, V = 37, 24, 101


def _inputs(device, dtype, t=T, h=H, v=V):
    return rand(t, h, dtype=dtype, device=device), rand(v, h, dtype=dtype, device=device, scale=0.5)


def _check_forward(hidden, weight, positions):
    out = vita_ext.masked_lm_head(hidden, weight, positions)
    assert out.dtype == hidden.dtype and out.device == hidden.device
    assert out.shape == (positions.shape[0], weight.shape[0])
    ref64 = R.masked_lm_head(hidden.double(), weight.double(), positions)
    plain = R.masked_lm_head(hidden, weight, positions)
    assert_2x_rule(out, plain, ref64, "logits")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_repeats_and_negative_positions(device, dtype):
    hidden, weight = _inputs(device, dtype)
    positions = torch.tensor([0, 36, -1, 5, 5, -37, 17, 5], device=device)
    out = _check_forward(hidden, weight, positions)
    torch.testing.assert_close(out[3], out[4], rtol=0, atol=0)
    torch.testing.assert_close(out[1], out[2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_equals_t_and_k_zero(device, dtype):
    hidden, weight = _inputs(device, dtype)
    _check_forward(hidden, weight, torch.randperm(T, device=device))
    empty = vita_ext.masked_lm_head(hidden, weight, torch.empty(0, dtype=torch.long, device=device))
    assert empty.shape == (0, V) and empty.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_hidden(device, dtype):
    positions = torch.tensor([3, -2, 0, 3], device=device)
    weight = rand(V, H, dtype=dtype, device=device, scale=0.5)
    transposed = rand(H, T, dtype=dtype, device=device).t()  # strides (1, T)
    every_other_row = rand(2 * T, H, dtype=dtype, device=device)[::2]
    strided_cols = rand(T, 2 * H, dtype=dtype, device=device)[:, ::2]
    batch_rows = rand(3, T, H, dtype=dtype, device=device)[1]  # a [B, S, H] tensor's rows
    for hidden in (transposed, every_other_row, strided_cols, batch_rows):
        _check_forward(hidden, weight, positions)


def test_vocab_larger_than_cpu_chunk(device):
    # The CPU half-precision path converts the weight 4096 rows at a time.
    hidden, weight = _inputs(device, torch.bfloat16, t=9, h=8, v=4096 + 37)
    _check_forward(hidden, weight, torch.tensor([8, 0, -3], device=device))


def test_fp64(device):
    hidden, weight = _inputs(device, torch.float64)
    positions = torch.tensor([1, -1, 1], device=device)
    out = vita_ext.masked_lm_head(hidden, weight, positions)
    torch.testing.assert_close(out, R.masked_lm_head(hidden, weight, positions))


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_reference(device, dtype):
    hidden, weight = _inputs(device, dtype)
    positions = torch.tensor([2, -1, 2, 30], device=device)
    cot = rand(4, V, dtype=torch.float64, device=device)

    def grads(h, w, fn):
        h = h.detach().requires_grad_()
        w = w.detach().requires_grad_()
        (fn(h, w, positions).to(torch.float64) * cot).sum().backward()
        return h.grad, w.grad

    ours = grads(hidden, weight, vita_ext.masked_lm_head)
    plain = grads(hidden, weight, R.masked_lm_head)
    ref64 = grads(hidden.double(), weight.double(), R.masked_lm_head)
    for name, o, p, r in zip(("grad_hidden", "grad_weight"), ours, plain, ref64):
        assert o.dtype == dtype
        assert_2x_rule(o, p, r, name)
    unselected = torch.ones(T, dtype=torch.bool, device=device)
    unselected[positions] = False
    assert (ours[0][unselected] == 0).all()


def test_gradcheck_cpu():
    hidden = rand(5, 3, dtype=torch.float64).requires_grad_()
    weight = rand(7, 3, dtype=torch.float64).requires_grad_()
    positions = torch.tensor([1, -1, 1, 0])
    assert torch.autograd.gradcheck(lambda h, w: vita_ext.masked_lm_head(h, w, positions), (hidden, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    hidden, weight = _inputs(device, dtype, t=6, h=8, v=11)
    positions = torch.tensor([0, -1, 3], device=device)
    torch.library.opcheck(OP, (hidden, weight, positions))
    torch.library.opcheck(OP, (hidden.requires_grad_(), weight.requires_grad_(), positions))


def test_bad_positions(device):
    # CPU: a clear error (the positions are on the host anyway). CUDA: checked on the device with no host
    # sync, so a row of NaN logits instead (the other rows exact).
    hidden, weight = _inputs(device, torch.float32)
    for bad, shown in (([0, 37], "got 37 at index 1"), ([-38, 2], "got -38 at index 0")):
        positions = torch.tensor(bad, device=device)
        if device.type == "cpu":
            with pytest.raises(RuntimeError, match=r"'positions'.*\[-T, T\) with T = 37.*" + shown):
                vita_ext.masked_lm_head(hidden, weight, positions)
        else:
            out = vita_ext.masked_lm_head(hidden, weight, positions)
            good = 0 if bad[0] == 0 else 1
            assert torch.isnan(out[1 - good]).all()
            torch.testing.assert_close(out[good], R.masked_lm_head(hidden, weight, positions[good:good + 1])[0])


def test_bad_inputs(device):
    hidden, weight = _inputs(device, torch.float32)
    pos = torch.tensor([0, 1], device=device)
    with pytest.raises(RuntimeError, match=r"'positions'.*torch.int64.*got torch.float32"):
        vita_ext.masked_lm_head(hidden, weight, pos.float())
    with pytest.raises(RuntimeError, match=r"'positions' must be 1-D"):
        vita_ext.masked_lm_head(hidden, weight, pos[None])
    with pytest.raises(RuntimeError, match=r"'weight' must have dtype torch.float32.*got torch.bfloat16"):
        vita_ext.masked_lm_head(hidden, weight.bfloat16(), pos)
    with pytest.raises(RuntimeError, match=r"'weight' must have size 24 in dim 1.*got shape \[101, 23\]"):
        vita_ext.masked_lm_head(hidden, weight[:, :23], pos)
    with pytest.raises(RuntimeError, match=r"'hidden_states' must be 2-D"):
        vita_ext.masked_lm_head(hidden[None], weight, pos)
    with pytest.raises(RuntimeError, match=r"'hidden_states' must have dtype"):
        vita_ext.masked_lm_head(hidden.int(), weight.int(), pos)
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match=r"'positions'.*T = 0"):
            vita_ext.masked_lm_head(hidden[:0], weight, pos)


def test_device_mismatch(cuda_device):
    hidden, weight = _inputs(cuda_device, torch.float32)
    with pytest.raises(RuntimeError, match=r"'positions' must be on device cuda"):
        vita_ext.masked_lm_head(hidden, weight, torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"'weight' must be on device cuda"):
        vita_ext.masked_lm_head(hidden, weight.cpu(), torch.tensor([0], device=cuda_device))


# ------------------------------------------------------------------ issue 12: decode path, no syncs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_decode_rows(device, dtype, k):
    # K <= 4 takes the CPU's weight-streaming dot-product path, K = 5 a GEMM; both under the 2x rule.
    hidden, weight = _inputs(device, dtype, v=1003)
    _check_forward(hidden, weight, torch.arange(-k, 0, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_gemm_fp32_path(dtype, monkeypatch):
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", "fp32")
    hidden, weight = _inputs("cpu", dtype, v=4096 + 37)
    _check_forward(hidden, weight, torch.tensor([8, 0, -3, 5, 5, 1, 2, 30]))


def test_no_host_sync():
    hidden, weight = _inputs("cpu", torch.bfloat16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    box = {}
    counts, _ = profiled(lambda: box.setdefault("out", vita_ext.masked_lm_head(h, w, torch.tensor([-1, 3]))))
    assert host_syncs(counts) == {}
    counts, _ = profiled(lambda: box["out"].float().sum().backward())
    assert host_syncs(counts) == {}


@pytest.mark.skipif(not vita_ext.build_info()["cuda"], reason="the wrapper rejects CUDA tensors in a CPU-only build")
def test_fake_cuda_tensors_no_data_dependence():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = vita_ext.masked_lm_head(h, w, torch.zeros(1, dtype=torch.long, device="cuda"))
        gh, gw = out.grad_fn.apply(torch.ones_like(out))[:2]  # the engine wants a real CUDA device
        assert out.shape == (1, V) and gh.shape == (T, H) and gw.shape == (V, H)


@pytest.mark.cuda
def test_no_sync_under_cuda_sync_debug_mode(cuda_device):
    hidden, weight = _inputs(cuda_device, torch.bfloat16)
    last = torch.full((1,), -1, dtype=torch.long, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # decode steps
            vita_ext.masked_lm_head(hidden, weight, last)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("k", [1, 6])
@pytest.mark.parametrize("where", ["hidden_nan", "hidden_inf", "weight_nan", "weight_neginf"])
def test_nan_inf_propagate_as_pytorch(device, where, k):
    hidden, weight = _inputs(device, torch.float32)
    value = float("nan") if where.endswith("nan") else float("-inf") if "neg" in where else float("inf")
    positions = torch.arange(k, device=device)
    if where.startswith("hidden"):
        hidden[0, 3] = value
    else:
        weight[7, 2] = value
    ours, ref = vita_ext.masked_lm_head(hidden, weight, positions), R.masked_lm_head(hidden.double(), weight.double(),
                                                                                      positions)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin].double(), ref[fin], rtol=1e-5, atol=1e-5)
