"""masked_linear_cross_entropy: chunked LM-head cross-entropy, against the reference in float64."""

import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, host_syncs, profiled, rand

OP = torch.ops.vita_ext.masked_linear_cross_entropy.default
OP_BWD = torch.ops.vita_ext.masked_linear_cross_entropy_backward.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
T, H, V = 37, 24, 101


def _inputs(device, dtype, t=T, h=H, v=V, ignored=0.5, ignore_index=-100):
    hidden = rand(t, h, dtype=dtype, device=device)
    weight = rand(v, h, dtype=dtype, device=device, scale=0.5)
    labels = torch.randint(0, v, (t,))
    labels[torch.rand(t) < ignored] = ignore_index
    return hidden, weight, labels.to(device)


def _cotangent(t, reduction, device):
    return torch.randn((t,) if reduction == "none" else (), dtype=torch.float64, device=device)


def _loss_and_grads(fn, hidden, weight, labels, ignore_index, reduction, cot, **kwargs):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, labels, ignore_index, reduction, **kwargs)
    (loss.double() * cot).sum().backward()
    return loss.detach(), h.grad, w.grad


def _check(hidden, weight, labels, reduction, ignore_index=-100, **kwargs):
    """Loss and both gradients vs reference autograd in float64, under the 2x rule; returns ours.
    kwargs go to our op (num_supervised, grad_in_forward)."""
    cot = _cotangent(labels.shape[0], reduction, hidden.device)
    args = (hidden, weight, labels, ignore_index, reduction, cot)
    ours = _loss_and_grads(vita_ext.masked_linear_cross_entropy, *args, **kwargs)
    plain = _loss_and_grads(R.masked_linear_cross_entropy, *args)
    ref64 = _loss_and_grads(R.masked_linear_cross_entropy, hidden.double(), weight.double(), *args[2:])
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == hidden.dtype and ours[2].dtype == weight.dtype
    for name, o, p, r in zip(("loss", "grad_hidden", "grad_weight"), ours, plain, ref64):
        assert_2x_rule(o, p, r, name)
    ignored = labels == ignore_index
    assert (ours[1][ignored] == 0).all(), "ignored rows must get exactly zero gradient"
    return ours


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_half_ignored(device, dtype, reduction):
    _check(*_inputs(device, dtype), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_vocab_and_row_chunks(device, dtype, reduction, monkeypatch):
    # V = 3 * 256 + 17: three full vocabulary chunks and a ragged one; ~35 supervised rows in 16-row
    # chunks (two full, one ragged) make the backward accumulate dW over row chunks in its fp32
    # buffer. (Much smaller row chunks would push CPU BLAS onto its tiny-matrix kernels, whose fp32
    # sums are measurably less accurate than the blocked ones the reference uses.)
    monkeypatch.setenv("VITA_EXT_CE_VOCAB_CHUNK", "256")
    monkeypatch.setenv("VITA_EXT_CE_ROW_CHUNK", "16")
    _check(*_inputs(device, dtype, t=70, v=3 * 256 + 17), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_chunks_only(device, reduction, monkeypatch):
    monkeypatch.setenv("VITA_EXT_CE_VOCAB_CHUNK", "256")
    _check(*_inputs(device, torch.bfloat16, v=1000), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_none_ignored(device, reduction):
    _check(*_inputs(device, torch.bfloat16, ignored=0.0), reduction)


@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_custom_ignore_index(device, ignore_index):
    hidden, weight, labels = _inputs(device, torch.float32, ignore_index=ignore_index)
    labels[labels == -100] = ignore_index
    if ignore_index == 7:
        assert (labels == 7).any()
    for reduction in REDUCTIONS:
        _check(hidden, weight, labels, reduction, ignore_index)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored(device, dtype):
    hidden, weight, labels = _inputs(device, dtype, ignored=1.0)
    mean = vita_ext.masked_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(R.masked_linear_cross_entropy(hidden.float(), weight.float(), labels))
    for reduction in ("sum", "none"):
        cot = _cotangent(T, reduction, device)
        loss, gh, gw = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100,
                                       reduction, cot)
        assert (loss == 0).all() and loss.shape == ((T,) if reduction == "none" else ())
        assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_hidden(device, dtype):
    _, weight, labels = _inputs(device, dtype)
    for hidden in (rand(H, T, dtype=dtype, device=device).t(), rand(2 * T, H, dtype=dtype, device=device)[::2]):
        _check(hidden, weight, labels, "mean")
    # A row slice of a wider matrix as the weight (row stride 2H, unit column stride).
    hidden = rand(T, H, dtype=dtype, device=device)
    _check(hidden, rand(V, 2 * H, dtype=dtype, device=device, scale=0.5)[:, :H], labels, "sum")


def test_lse_output(device):
    hidden, weight, labels = _inputs(device, torch.float32)
    loss, lse, gh, gw = OP(hidden, weight, labels, -100, "none")
    assert gh.shape == (0,) and gw.shape == (0,)  # no gradient formed in the forward unless asked
    ref = torch.logsumexp(hidden.double() @ weight.double().t(), dim=-1)
    sup = labels != -100
    assert lse.dtype == torch.float64 and loss.dtype == torch.float32 and lse.shape == (T,)
    torch.testing.assert_close(lse[sup].double(), ref[sup], rtol=1e-5, atol=1e-5)
    assert (lse[~sup] == 0).all() and (loss[~sup] == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batched_input_form(device, reduction):
    b, s = 3, 11
    hidden = rand(b, s, H, dtype=torch.bfloat16, device=device)
    weight = rand(V, H, dtype=torch.bfloat16, device=device, scale=0.5)
    labels = torch.randint(0, V, (b, s))
    labels[:, :4] = -100
    labels = labels.to(device)
    loss = vita_ext.masked_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    flat = vita_ext.masked_linear_cross_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1), reduction=reduction)
    assert loss.shape == ((b, s) if reduction == "none" else ())
    torch.testing.assert_close(loss.reshape(-1), flat.reshape(-1), rtol=0, atol=0)
    ref = R.masked_linear_cross_entropy(hidden.reshape(-1, H).double(), weight.double(), labels.reshape(-1),
                                        reduction=reduction)
    plain = R.masked_linear_cross_entropy(hidden.reshape(-1, H), weight, labels.reshape(-1), reduction=reduction)
    assert_2x_rule(loss.reshape(-1), plain.reshape(-1), ref.reshape(-1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpu(reduction, monkeypatch):
    monkeypatch.setenv("VITA_EXT_CE_VOCAB_CHUNK", "4")
    monkeypatch.setenv("VITA_EXT_CE_ROW_CHUNK", "2")
    hidden = rand(7, 3, dtype=torch.float64).requires_grad_()
    weight = rand(9, 3, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, -100, 8, 4, -100, 4, 5])

    def fn(h, w):
        return vita_ext.masked_linear_cross_entropy(h, w, labels, reduction=reduction)

    assert fn(hidden, weight).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, reduction):
    hidden, weight, labels = _inputs(device, dtype, t=9, h=8, v=13)
    count = int((labels != -100).sum())
    args = (hidden, weight, labels, -100, reduction)
    torch.library.opcheck(OP, args)
    torch.library.opcheck(OP, args + (count, [False, False]))
    loss, lse, _, _ = OP(*args)
    torch.library.opcheck(OP, (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, -100,
                               reduction))
    grad_loss = _cotangent(9, reduction, device).float()
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(OP_BWD, (grad_loss, hidden, weight, labels, lse, -100, reduction, None, mask))
    torch.library.opcheck(OP_BWD, (grad_loss, hidden, weight, labels, lse, -100, reduction, count, [True, True]))
    if reduction != "none":
        for flags in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(OP, args + (count, flags))
            torch.library.opcheck(OP, (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels,
                                       -100, reduction, None, flags))


def test_sparse_supervision_never_builds_full_logits(device):
    # 4096 rows, 3 supervised, V = 50000: a [T, V] path would need 800 MB and ~20 GFLOP fwd+bwd. The
    # ignored rows are NaN: none of them may leak into the loss or the gradients.
    t, h, v = 4096, 16, 50000
    hidden = rand(t, h, device=device)
    weight = rand(v, h, device=device, scale=0.5)
    rows = torch.tensor([5, 1000, 4095], device=device)
    labels = torch.full((t,), -100, dtype=torch.long, device=device)
    labels[rows] = torch.tensor([0, 49999, 123], device=device)
    hidden[labels == -100] = float("nan")
    loss, gh, gw = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100, "mean",
                                   torch.tensor(1.0, dtype=torch.float64, device=device))
    ref_loss, ref_gh, ref_gw = _loss_and_grads(R.masked_linear_cross_entropy, hidden[rows].double(), weight.double(),
                                               labels[rows], -100, "mean",
                                               torch.tensor(1.0, dtype=torch.float64, device=device))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh[rows].double(), ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-4, atol=1e-7)
    others = torch.ones(t, dtype=torch.bool, device=device)
    others[rows] = False
    assert (gh[others] == 0).all()


def test_bad_inputs(device):
    hidden, weight, labels = _inputs(device, torch.float32, ignored=0.0)
    ce = vita_ext.masked_linear_cross_entropy
    bad = labels.clone()
    bad[3] = V
    with pytest.raises(RuntimeError, match=r"'labels'.*\[0, V\) with V = 101.*got 101 at row 3"):
        ce(hidden, weight, bad)
    bad[3] = -5
    with pytest.raises(RuntimeError, match=r"'labels'.*ignore_index = -100, got -5 at row 3"):
        ce(hidden, weight, bad)
    with pytest.raises(RuntimeError, match=r"'labels' must have dtype torch.int64, got torch.float32"):
        ce(hidden, weight, labels.float())
    with pytest.raises(RuntimeError, match=r"'labels' must have shape \[37\].*got \[36\]"):
        OP(hidden, weight, labels[:-1], -100, "mean")
    with pytest.raises(RuntimeError, match=r"'hidden_states' must be \[T, H\] or \[..., H\] matching labels"):
        ce(hidden.reshape(1, T, H), weight, labels[:-1].reshape(1, T - 1))
    with pytest.raises(RuntimeError, match=r"'weight' must have size 24 in dim 1.*got shape \[101, 20\]"):
        ce(hidden, weight[:, :20], labels)
    with pytest.raises(RuntimeError, match=r"'weight' must have dtype torch.float32.*got torch.float16"):
        ce(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match=r"'reduction'.*'avg'"):
        ce(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match=r"'reduction'.*'avg'"):
        OP(hidden, weight, labels, -100, "avg")


def test_bad_backward_inputs(device):
    hidden, weight, labels = _inputs(device, torch.float32)
    loss, lse, _, _ = OP(hidden, weight, labels, -100, "none")
    with pytest.raises(RuntimeError, match=r"'grad_loss' must have shape \[37\]"):
        OP_BWD(torch.ones((), device=device), hidden, weight, labels, lse, -100, "none")
    with pytest.raises(RuntimeError, match=r"'grad_loss' must have shape \[\]"):
        OP_BWD(loss, hidden, weight, labels, lse, -100, "sum")
    with pytest.raises(RuntimeError, match=r"'lse' must have dtype torch.float64, got torch.float16"):
        OP_BWD(loss, hidden, weight, labels, lse.half(), -100, "none")


def test_device_mismatch(cuda_device):
    hidden, weight, labels = _inputs(cuda_device, torch.float32)
    with pytest.raises(RuntimeError, match=r"'labels' must be on device cuda"):
        vita_ext.masked_linear_cross_entropy(hidden, weight, labels.cpu())


# ------------------------------------------------------------------ issue 12: no wasted work, no syncs
@pytest.mark.parametrize("half_gemm", ["native", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_in_forward(device, dtype, reduction, half_gemm, monkeypatch):
    # Gradients formed in the forward pass (one row chunk, then several with the fp32 [V, H] dW
    # accumulator), under the same 2x rule as the recomputing backward. half_gemm: both CPU GEMM paths.
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", half_gemm)
    _check(*_inputs(device, dtype), reduction, grad_in_forward=True)
    monkeypatch.setenv("VITA_EXT_CE_ROW_CHUNK", "8")
    _check(*_inputs(device, dtype, t=70, v=300), reduction, grad_in_forward=True)


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_longer_than_a_sum_block(device, dtype, grad_in_forward, monkeypatch):
    # bf16/fp16 rows of 2,500 logits: the CPU sums the exps in float lanes per 1,024-element block and in
    # fp64 across blocks (the last block partial), in the forward and in the one-exp gradient pass.
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", "native")
    _check(*_inputs(device, dtype, t=19, v=2500), "mean", grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_half_gemm_fp32_path(dtype, monkeypatch):
    # The path of CPUs without native bf16/fp16 dot products (weight chunks converted to fp32).
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", "fp32")
    monkeypatch.setenv("VITA_EXT_CE_VOCAB_CHUNK", "64")
    monkeypatch.setenv("VITA_EXT_CE_ROW_CHUNK", "8")
    for reduction in REDUCTIONS:
        _check(*_inputs("cpu", dtype), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_num_supervised_equals_counted(device, reduction):
    hidden, weight, labels = _inputs(device, torch.bfloat16)
    count = int((labels != -100).sum())
    a = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100, reduction,
                        _cotangent(T, reduction, device))
    torch.manual_seed(1)
    b = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100, reduction,
                        _cotangent(T, reduction, device), num_supervised=count)
    torch.manual_seed(1)
    a = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100, reduction,
                        _cotangent(T, reduction, device))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_num_supervised_wrong_count_or_label_gives_nan(device):
    hidden, weight, labels = _inputs(device, torch.float32)
    count = int((labels != -100).sum())
    ce = vita_ext.masked_linear_cross_entropy
    for wrong in (count - 1, count + 1):
        h = hidden.clone().requires_grad_()
        loss = ce(h, weight, labels, num_supervised=wrong)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(h.grad).any()
    bad = labels.clone()
    row = int((labels != -100).nonzero()[0])
    bad[row] = V + 3  # out of range: NaN for that row only, the others exact
    per_row = ce(hidden, weight, bad, reduction="none", num_supervised=count)
    ref = ce(hidden, weight, labels, reduction="none")
    assert torch.isnan(per_row[row])
    keep = torch.ones(T, dtype=torch.bool, device=device)
    keep[row] = False
    torch.testing.assert_close(per_row[keep], ref[keep], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"'num_supervised' must be .* in \[0, T\] with T = 37, got 38"):
        ce(hidden, weight, labels, num_supervised=T + 1)
    with pytest.raises(ValueError, match=r"'grad_in_forward' needs reduction 'mean' or 'sum'"):
        ce(hidden, weight, labels, reduction="none", grad_in_forward=True)
    with pytest.raises(ValueError, match=r"'grad_in_forward' needs reduction 'mean' or 'sum'"):
        OP(hidden, weight, labels, -100, "none", None, [True, False])


def _mm_count(counts):
    return counts.get("aten::mm", 0) + counts.get("aten::addmm", 0)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_frozen_weight_gets_no_dw_work(grad_in_forward):
    # A frozen LM head (stage 1): no dW GEMM, no buffer of dW's size; dH unchanged.
    t, h, v = 32, 512, 4096  # dW would be 8 MB, every other buffer < 1 MB
    hidden, weight, labels = _inputs("cpu", torch.float32, t=t, h=h, v=v)
    kw = dict(grad_in_forward=grad_in_forward)

    def run(weight_grad):
        hl = hidden.detach().requires_grad_()
        wl = weight.detach().requires_grad_(weight_grad)
        loss = vita_ext.masked_linear_cross_entropy(hl, wl, labels, reduction="sum", **kw)
        counts, allocs = profiled(loss.backward)
        return hl.grad, wl.grad, counts, allocs, loss

    both_dh, both_dw, both_counts, _, _ = run(True)
    dh, dw, counts, allocs, _ = run(False)
    assert dw is None and both_dw is not None
    torch.testing.assert_close(dh, both_dh, rtol=0, atol=0)
    assert max(b for _, b in allocs) < v * h * 4 // 4, allocs
    if not grad_in_forward:  # recomputing backward: logits + dH GEMMs only
        assert _mm_count(counts) == _mm_count(both_counts) - 1 == 2
    # In the forward pass too (grad_in_forward): profile the forward itself.
    hl = hidden.detach().requires_grad_()
    counts, allocs = profiled(lambda: vita_ext.masked_linear_cross_entropy(hl, weight, labels, **kw))
    assert max(b for _, b in allocs) < v * h * 4 // 4, allocs
    assert _mm_count(counts) == (2 if grad_in_forward else 1)


def test_frozen_hidden_gets_no_dh_work():
    hidden, weight, labels = _inputs("cpu", torch.float32)
    for gif in (False, True):
        wl = weight.detach().requires_grad_()
        loss = vita_ext.masked_linear_cross_entropy(hidden, wl, labels, grad_in_forward=gif)
        counts, _ = profiled(loss.backward)
        ref = weight.detach().requires_grad_()
        vita_ext.masked_linear_cross_entropy(hidden.detach().requires_grad_(), ref, labels).backward()
        torch.testing.assert_close(wl.grad, ref.grad, rtol=1e-6, atol=1e-7)
        if not gif:
            assert _mm_count(counts) == 2  # logits + dW
    out = OP_BWD(torch.ones(()), hidden, weight, labels, OP(hidden, weight, labels, -100, "mean")[1], -100, "mean",
                 None, [False, True])
    assert out[0].shape == (0,) and out[1].shape == (V, H)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_no_host_sync_with_num_supervised(grad_in_forward):
    # The ops' own ATen calls, counted by the profiler inside the C++ kernels: with the count from the
    # caller, nothing is read back to the host (no .item(), no nonzero) in the forward or backward.
    hidden, weight, labels = _inputs("cpu", torch.bfloat16)
    count = int((labels != -100).sum())
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    box = {}

    def forward():
        box["loss"] = vita_ext.masked_linear_cross_entropy(h, w, labels, reduction="sum", num_supervised=count,
                                                           grad_in_forward=grad_in_forward)

    counts, _ = profiled(forward)
    assert host_syncs(counts) == {}, counts
    counts, _ = profiled(box["loss"].backward)
    assert host_syncs(counts) == {}, counts
    # Without the count, the forward reads it (one nonzero): the counter does see syncs.
    counts, _ = profiled(lambda: vita_ext.masked_linear_cross_entropy(hidden, weight, labels))
    assert host_syncs(counts)


@pytest.mark.skipif(not vita_ext.build_info()["cuda"], reason="the wrapper rejects CUDA tensors in a CPU-only build")
def test_fake_cuda_tensors_no_data_dependence():
    # The Python side (wrapper, fake kernels, autograd glue) on fake CUDA tensors: a .item(), .tolist()
    # or nonzero on these paths would raise here. Needs no GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.zeros(T, dtype=torch.long, device="cuda")
        for gif in (False, True):
            loss = vita_ext.masked_linear_cross_entropy(h, w, labels, reduction="sum", num_supervised=T,
                                                        grad_in_forward=gif)
            # The backward node called directly (the autograd engine wants a real CUDA device).
            gh, gw = loss.grad_fn.apply(torch.ones_like(loss), None, None, None)[:2]
            assert gh.shape == (T, H) and gw.shape == (V, H) and gh.device.type == "cuda"


@pytest.mark.cuda
def test_no_sync_under_cuda_sync_debug_mode(cuda_device):
    hidden, weight, labels = _inputs(cuda_device, torch.bfloat16)
    count = int((labels != -100).sum())
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gif in (False, True):
            loss = vita_ext.masked_linear_cross_entropy(h, w, labels, reduction="sum", num_supervised=count,
                                                        grad_in_forward=gif)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------- NaN / Inf (issue 11 item 3)
def _nan_pattern_matches(ours, ref, name, dtype=torch.float32):
    o, r = ours.double(), ref.double()
    assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{name}: NaN at different places"
    assert torch.equal(torch.isinf(o), torch.isinf(r)), f"{name}: Inf at different places"
    fin = torch.isfinite(r)
    # the finite values' accuracy is the 2x rule's business (test_2x_rule and friends); here a sanity bound
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=3e-2)
    torch.testing.assert_close(o[fin], r[fin], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("where", ["hidden_nan", "hidden_inf", "hidden_neginf", "weight_nan", "weight_inf",
                                   "ignored_nan"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_inf_propagate_as_pytorch(device, where, reduction, dtype, monkeypatch):
    # As F.cross_entropy(F.linear(h[supervised], W).float(), labels[supervised]): non-finite values in the
    # rows the loss reads reach the loss and the gradients; an ignored row is never read. bf16/fp16 with
    # half-precision GEMMs: the CPU's fused one-exp row pass of grad_in_forward (rows::softmax_grad_row).
    monkeypatch.setenv("VITA_EXT_CPU_HALF_GEMM", "native")
    hidden, weight, labels = _inputs(device, dtype)
    sup = (labels != -100).nonzero().view(-1)
    if where.startswith("hidden"):
        hidden[sup[1], 3] = {"hidden_nan": float("nan"), "hidden_inf": float("inf"),
                             "hidden_neginf": float("-inf")}[where]
    elif where == "ignored_nan":
        hidden[(labels == -100).nonzero()[0, 0]] = float("nan")
    else:
        weight[int(labels[sup[0]]), 2] = float("nan") if where == "weight_nan" else float("inf")
    cot = _cotangent(T, reduction, device)
    for gif in ([False, True] if reduction != "none" else [False]):
        ours = _loss_and_grads(vita_ext.masked_linear_cross_entropy, hidden, weight, labels, -100, reduction, cot,
                               grad_in_forward=gif)
        h = hidden.double()[sup].detach().requires_grad_()
        w = weight.double().detach().requires_grad_()
        loss = R.masked_linear_cross_entropy(h, w, labels[sup], reduction=reduction)
        (loss * (cot[sup] if reduction == "none" else cot)).sum().backward()
        ref_loss = torch.zeros(T, dtype=torch.float64, device=device).index_put((sup,), loss) \
            if reduction == "none" else loss
        ref_gh = torch.zeros_like(hidden, dtype=torch.float64).index_put((sup,), h.grad)
        _nan_pattern_matches(ours[0], ref_loss.detach(), f"loss ({where}, gif={gif})", dtype)
        _nan_pattern_matches(ours[1], ref_gh, f"grad_hidden ({where}, gif={gif})", dtype)
        _nan_pattern_matches(ours[2], w.grad, f"grad_weight ({where}, gif={gif})", dtype)
