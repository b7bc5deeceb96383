"""merge_attention_ against vita_ext.reference.merge_attention and against attention over all keys."""
import pytest
import torch

import vita_ext
from vita_ext import reference as R
from _utils import assert_2x_rule, max_err, rand

NEG_INF = float("-inf")


def _r64(*shape, device="cpu"):
    return rand(*shape, dtype=torch.float64, device=device)


def _partials(b, s, h, d, device, lse_scale=3.0):
    """Two random partial results (out [B,S,H,D], lse [B,H,S]) in float64."""
    return (_r64(b, s, h, d, device=device), _r64(b, h, s, device=device) * lse_scale,
            _r64(b, s, h, d, device=device), _r64(b, h, s, device=device) * lse_scale)


def _check(out64, lse64, bout64, blse64, out_dtype, bout_dtype=None):
    """Runs the op on dtype copies and checks it with the 2x rule against R.merge_attention."""
    bout_dtype = bout_dtype or out_dtype
    out, lse = out64.to(out_dtype), lse64.float()
    bout, blse = bout64.to(bout_dtype), blse64.float()
    plain = R.merge_attention(out.clone(), lse.clone(), bout, blse)
    ref = R.merge_attention(out.double(), lse.double(), bout.double(), blse.double())
    vita_ext.merge_attention_(out, lse, bout, blse)
    assert_2x_rule(out, plain[0], ref[0], "out")
    assert_2x_rule(lse, plain[1], ref[1], "lse")
    return out, lse


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bout_dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(device, out_dtype, bout_dtype):
    _check(*_partials(2, 33, 3, 40, device), out_dtype, bout_dtype)


@pytest.mark.parametrize("d", [1, 7, 8, 64, 128])
def test_head_dims(device, d):
    # d = 1 and 7 take the scalar path on CUDA, multiples of 4 the vector path.
    _check(*_partials(1, 9, 2, d, device), torch.float32)
    _check(*_partials(1, 9, 2, d, device), torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
def test_two_key_halves_equal_full_attention(device, causal):
    # Bottom-right causal with m <= Sk - Sq + 1: every query sees all of the first m keys, and the causal
    # mask of the last Sk - m keys on their own has the same alignment as in the whole attention.
    b, sq, sk, hq, hkv, d, m = 2, 20, 50, 4, 2, 32, 23
    q, k, v = _r64(b, sq, hq, d, device=device), _r64(b, sk, hkv, d, device=device), _r64(b, sk, hkv, d, device=device)
    ref = R.attention_lse(q, k, v, causal)
    qf, kf, vf = q.float(), k.float(), v.float()
    out, lse = vita_ext.attention_lse(qf, kf[:, :m], vf[:, :m], causal=False)
    bo, bl = vita_ext.attention_lse(qf, kf[:, m:], vf[:, m:], causal=causal)
    vita_ext.merge_attention_(out, lse, bo, bl)
    assert max_err(out, ref[0]) < 2e-6 and max_err(lse, ref[1]) < 2e-6


def test_bf16_halves_2x_rule(device):
    b, s, h, d = 1, 24, 2, 64
    q, k, v = _r64(b, s, h, d, device=device), _r64(b, s, h, d, device=device), _r64(b, s, h, d, device=device)
    m = 11
    ref = R.attention_lse(q, k, v)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, lse = vita_ext.attention_lse(qb, kb[:, :m], vb[:, :m])
    bo, bl = vita_ext.attention_lse(qb, kb[:, m:], vb[:, m:])
    pa, pb = R.attention_lse(qb, kb[:, :m], vb[:, :m]), R.attention_lse(qb, kb[:, m:], vb[:, m:])
    plain = R.merge_attention(pa[0], pa[1], pb[0], pb[1])
    vita_ext.merge_attention_(out, lse, bo, bl)
    assert out.dtype == torch.bfloat16
    assert_2x_rule(out, plain[0], ref[0], "out")
    assert_2x_rule(lse, plain[1], ref[1], "lse")


def test_large_lse_differences(device):
    out, lse, bout, blse = _partials(2, 16, 3, 8, device, lse_scale=1e4)
    lse[0, 0, 0], blse[0, 0, 0] = 1e4, -1e4
    lse[0, 0, 1], blse[0, 0, 1] = -1e4, 1e4
    o, l = _check(out, lse, bout, blse, torch.float32)
    assert torch.isfinite(o).all() and torch.isfinite(l).all()
    assert torch.allclose(o[0, 1, 0], bout[0, 1, 0].float()) and l[0, 0, 1].item() == 1e4


def test_neg_inf_rows(device):
    out, lse, bout, blse = _partials(1, 6, 2, 16, device)
    lse[0, :, 0] = NEG_INF                       # running side saw no key: take the block
    blse[0, :, 1] = NEG_INF                      # block saw no key: keep the running result
    lse[0, :, 2] = NEG_INF
    blse[0, :, 2] = NEG_INF                      # neither: out 0, lse -inf
    out[:, 2] = 0.0  # an empty running row holds 0 (as attention_lse leaves it)
    o, l = _check(out, lse, bout, blse, torch.float32)
    assert torch.equal(o[:, 0], bout[:, 0].float()) and torch.equal(l[0, :, 0], blse[0, :, 0].float())
    assert torch.equal(o[:, 1], out[:, 1].float()) and torch.equal(l[0, :, 1], lse[0, :, 1].float())
    assert (o[:, 2] == 0).all() and torch.isneginf(l[0, :, 2]).all()


@pytest.mark.parametrize("side", ["running", "block"])
def test_non_finite_lse_propagates(device, side):
    """As torch.logaddexp: a NaN lse (even against an empty -inf side) gives NaN; +inf gives lse +inf and
    out NaN (attention_lse's +inf-score row); both -inf stays empty; finite rows are untouched by them."""
    out, lse, bout, blse = _partials(1, 5, 2, 8, device)
    poisoned, other = (lse, blse) if side == "running" else (blse, lse)
    poisoned[0, :, 0] = float("nan")
    poisoned[0, :, 1], other[0, :, 1] = float("nan"), NEG_INF   # used to come out as -inf: hidden
    poisoned[0, :, 2] = float("inf")
    poisoned[0, :, 3], other[0, :, 3] = float("inf"), float("inf")
    want = R.merge_attention(out.double(), lse.double(), bout.double(), blse.double())
    o, l = out.float(), lse.float()
    vita_ext.merge_attention_(o, l, bout.float(), blse.float())
    assert torch.isnan(l[0, :, :2]).all() and torch.isnan(o[:, :2]).all()
    assert torch.isposinf(l[0, :, 2:4]).all() and torch.isnan(o[:, 2:4]).all()
    for ours, ref in ((o, want[0]), (l, want[1])):
        for test in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(test(ours), test(ref))
    assert max_err(o[:, 4:], want[0][:, 4:]) < 1e-6 and max_err(l[..., 4:], want[1][..., 4:]) < 1e-6


def test_self_overlapping_out_is_refused(device):
    """An expanded out (or lse) would be written several times with different values (issue 11)."""
    out, lse, bout, blse = (t.float() for t in _partials(1, 5, 2, 8, device))
    with pytest.raises(RuntimeError, match="argument 'out' is updated in place and must not have elements that share"):
        vita_ext.merge_attention_(out[:, :1].expand(1, 5, 2, 8), lse, bout, blse)
    with pytest.raises(RuntimeError, match="argument 'lse' is updated in place"):
        vita_ext.merge_attention_(out, lse[..., :1].expand(1, 2, 5), bout, blse)
    vita_ext.merge_attention_(out, lse, bout[:, :1].expand(1, 5, 2, 8), blse)  # read-only sides may be expanded


def test_strided_views(device):
    b, s, h, d = 2, 10, 3, 16
    big_out = rand(b, s + 5, h, d, device=device)
    big_lse = rand(b, h, s + 5, device=device)
    keep_out, keep_lse = big_out.clone(), big_lse.clone()
    out, lse = big_out[:, 3:3 + s], big_lse[:, :, 3:3 + s]
    bout = rand(b, s, h, 2 * d, device=device)[..., ::2]      # last dim stride 2
    blse = rand(b, s, h, device=device).transpose(1, 2)       # [B, H, S] view of [B, S, H]
    assert not (out.is_contiguous() or lse.is_contiguous() or bout.is_contiguous() or blse.is_contiguous())
    want = R.merge_attention(out.double(), lse.double(), bout.double(), blse.double())
    vita_ext.merge_attention_(out, lse, bout, blse)
    assert max_err(out, want[0]) < 1e-6 and max_err(lse, want[1]) < 1e-6
    assert torch.equal(big_out[:, :3], keep_out[:, :3]) and torch.equal(big_out[:, 3 + s:], keep_out[:, 3 + s:])
    assert torch.equal(big_lse[..., :3], keep_lse[..., :3]) and torch.equal(big_lse[..., 3 + s:], keep_lse[..., 3 + s:])


def test_strided_head_view(device):
    # Merging into a subset of heads (a [B, S, H, D] view with a head stride of 2 * D).
    b, s, h, d = 1, 7, 2, 8
    big = rand(b, s, 2 * h, d, device=device)
    out = big[:, :, ::2]
    lse = rand(b, 2 * h, s, device=device)[:, ::2]
    bout, blse = rand(b, s, h, d, device=device), rand(b, h, s, device=device)
    want = R.merge_attention(out.double(), lse.double(), bout.double(), blse.double())
    untouched = big[:, :, 1::2].clone()
    vita_ext.merge_attention_(out, lse, bout, blse)
    assert max_err(out, want[0]) < 1e-6 and max_err(lse, want[1]) < 1e-6
    assert torch.equal(big[:, :, 1::2], untouched)


def test_empty(device):
    out, lse = torch.empty(2, 0, 3, 8, device=device), torch.empty(2, 3, 0, device=device)
    vita_ext.merge_attention_(out, lse, out.clone(), lse.clone())


def test_opcheck(device):
    out, lse, bout, blse = (t.float() for t in _partials(1, 5, 2, 8, device))
    torch.library.opcheck(torch.ops.vita_ext.merge_attention_.default, (out, lse, bout, blse))


def test_bad_inputs(device):
    out, lse, bout, blse = (t.float() for t in _partials(1, 5, 2, 8, device))
    op = torch.ops.vita_ext.merge_attention_
    cases = [
        ((out, lse.half(), bout, blse), "argument 'lse' must have dtype torch.float32"),
        ((out, lse, bout, blse.double()), "argument 'block_lse' must have dtype torch.float32"),
        ((out.long(), lse, bout, blse), "argument 'out' must have dtype"),
        ((out, lse, bout.int(), blse), "argument 'block_out' must have dtype"),
        ((out, lse, bout[:, :4], blse), "argument 'block_out' must have shape"),
        ((out, lse[:, :, :4], bout, blse), "argument 'lse' must have shape"),
        ((out, lse, bout, blse.transpose(1, 2)), "argument 'block_lse' must have shape"),
        ((out[0], lse, bout, blse), "argument 'out' must be 4-D"),
        ((out.transpose(2, 3), lse.new_zeros(1, 8, 5), bout.transpose(2, 3), lse.new_zeros(1, 8, 5)),
         "argument 'out' must have a contiguous last dimension"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)


def test_wrong_device():
    if not torch.cuda.is_available() or not vita_ext.build_info()["cuda"]:
        pytest.skip("needs a CUDA GPU and a build with CUDA kernels")
    out, lse, bout, blse = (t.float().cuda() for t in _partials(1, 5, 2, 8, "cpu"))
    with pytest.raises(RuntimeError, match="argument 'block_lse' must be on device cuda"):
        torch.ops.vita_ext.merge_attention_(out, lse, bout, blse.cpu())
    with pytest.raises(RuntimeError, match="argument 'out' must have dtype .* on CUDA"):
        torch.ops.vita_ext.merge_attention_(out.double(), lse, bout, blse)
