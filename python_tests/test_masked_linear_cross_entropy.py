"""masked_linear_cross_entropy: chunked LM-head cross-entropy, against the reference in float64."""

import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, rand

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


def _loss_and_grads(fn, hidden, weight, labels, ignore_index, reduction, cot):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, labels, ignore_index, reduction)
    (loss.double() * cot).sum().backward()
    return loss.detach(), h.grad, w.grad


def _check(hidden, weight, labels, reduction, ignore_index=-100):
    """Loss and both gradients vs reference autograd in float64, under the 2x rule; returns ours."""
    cot = _cotangent(labels.shape[0], reduction, hidden.device)
    args = (hidden, weight, labels, ignore_index, reduction, cot)
    ours = _loss_and_grads(vita_ext.masked_linear_cross_entropy, *args)
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
    loss, lse = OP(hidden, weight, labels, -100, "none")
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
    torch.testing.assert_close(loss.reshape(-1).double(), ref.reshape(-1), rtol=1e-5, atol=1e-5)


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
    args = (hidden, weight, labels, -100, reduction)
    torch.library.opcheck(OP, args)
    loss, lse = OP(*args)
    torch.library.opcheck(OP, (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), labels, -100,
                               reduction))
    grad_loss = _cotangent(9, reduction, device).float()
    torch.library.opcheck(OP_BWD, (grad_loss, hidden, weight, labels, lse, -100, reduction))


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
    loss, lse = OP(hidden, weight, labels, -100, "none")
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
