"""masked_lm_head: logits of selected rows only, against reference.masked_lm_head in float64."""
import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, rand

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


def test_bad_inputs(device):
    hidden, weight = _inputs(device, torch.float32)
    pos = torch.tensor([0, 1], device=device)
    with pytest.raises(RuntimeError, match=r"'positions'.*\[-T, T\) with T = 37.*got 37"):
        vita_ext.masked_lm_head(hidden, weight, torch.tensor([0, 37], device=device))
    with pytest.raises(RuntimeError, match=r"'positions'.*T = 37.*got -38"):
        vita_ext.masked_lm_head(hidden, weight, torch.tensor([-38, 2], device=device))
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
    with pytest.raises(RuntimeError, match=r"'positions'.*T = 0"):
        vita_ext.masked_lm_head(hidden[:0], weight, pos)


def test_device_mismatch(cuda_device):
    hidden, weight = _inputs(cuda_device, torch.float32)
    with pytest.raises(RuntimeError, match=r"'positions' must be on device cuda"):
        vita_ext.masked_lm_head(hidden, weight, torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"'weight' must be on device cuda"):
        vita_ext.masked_lm_head(hidden, weight.cpu(), torch.tensor([0], device=cuda_device))
