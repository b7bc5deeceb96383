"""attention_lse's backends: the selection rules, the override, attention_backends(), and every CUDA call
path of the flash backends checked without a GPU (FakeTensorMode makes device="cuda" tensors on a CPU
host; aten's flash ops have fake kernels), for shapes, dtypes, layouts and argument order."""
import math
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vita_ext
from vita_ext.ops import attention_dispatch as ab
from vita_ext.ops import flash_attention as fa
from _utils import rand

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _fresh_selection_cache():
    # select_backend caches its verdicts; these tests swap the facts it reads (flash-attn, GPU capability).
    ab._select.cache_clear()
    yield
    ab._select.cache_clear()


def _call(device="cpu", dtype=BF16, d=128, varlen=False, grad=False):
    return ab.AttentionCall(device, dtype, d, varlen, grad)


# --------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("call, want", [
    (_call("cpu", BF16), "flash"),
    (_call("cpu", torch.float16, grad=True), "flash"),
    (_call("cpu", F32), "flash"),             # fp32 inference: PyTorch's CPU flash forward
    (_call("cpu", F32, grad=True), "vita"),   # fp32 training: its backward misses the accuracy rule
    (_call("cpu", BF16, varlen=True, grad=True), "flash"),
    (_call("cpu", F64), "vita"),
    (_call("cuda", F32), "vita"),             # FlashAttention takes fp16/bf16 only
    (_call("cuda", BF16, d=20), "vita"),      # head_dim not a multiple of 8
    (_call("cuda", BF16, d=256), "flash"),
    (_call("cuda", F64), "vita"),
])
def test_auto_selection(call, want, monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    monkeypatch.setattr(ab, "flash_attn_module", lambda: (None, "not installed"))
    monkeypatch.setattr(ab, "_aten_flash_cuda_built", lambda: True)
    assert ab.select_backend(call) == want


def test_flash_attn_preferred_on_cuda_when_importable(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    monkeypatch.setattr(ab, "flash_attn_module", lambda: (types.SimpleNamespace(), "FlashAttention-2 (test)"))
    assert ab.select_backend(_call("cuda", BF16)) == "flash_attn"
    assert ab.select_backend(_call("cuda", F32)) == "vita"
    assert ab.select_backend(_call("cpu", BF16)) == "flash"  # flash-attn is CUDA-only


def test_sm75_gpu_is_not_given_flash(monkeypatch):
    monkeypatch.setattr(ab, "_cuda_capability", lambda index: (7, 5))
    monkeypatch.setattr(ab, "_aten_flash_cuda_built", lambda: True)
    assert "sm80" in ab.why_not("flash", _call("cuda", BF16))


def test_env_override_and_argument(monkeypatch):
    monkeypatch.setenv(ab.ENV_VAR, "vita")
    assert ab.select_backend(_call("cpu", BF16)) == "vita"
    assert ab.select_backend(_call("cpu", BF16), backend="flash") == "flash"  # the argument wins
    monkeypatch.setenv(ab.ENV_VAR, "Flash ")
    assert ab.select_backend(_call("cpu", BF16)) == "flash"
    monkeypatch.setenv(ab.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="environment variable VITA_EXT_ATTENTION_BACKEND must be one of"):
        ab.select_backend(_call("cpu", BF16))
    with pytest.raises(ValueError, match="argument 'backend' must be one of"):
        ab.select_backend(_call("cpu", BF16), backend="xformers")


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="backend 'flash' cannot serve this call .*fp64 runs on the vita kernels"):
        ab.select_backend(_call("cpu", F64), backend="flash")
    with pytest.raises(ValueError, match="backend 'flash_attn' cannot serve .*CUDA only"):
        ab.select_backend(_call("cpu", BF16), backend="flash_attn")
    q = rand(1, 4, 2, 8, dtype=F64)
    with pytest.raises(ValueError, match="fp64 runs on the vita kernels"):
        vita_ext.attention_lse(q, q, q, backend="flash")
    monkeypatch.setenv(ab.ENV_VAR, "flash")  # forced by the environment: same refusal, never a silent switch
    with pytest.raises(ValueError, match="fp64 runs on the vita kernels"):
        vita_ext.attention_lse(q, q, q)


def test_attention_backends_report(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    cpu = vita_ext.attention_backends("cpu", torch.float32)
    assert cpu["flash"] == {"available": True, "reason": ""} and cpu["vita"]["available"]
    assert not cpu["flash_attn"]["available"] and "CUDA" in cpu["flash_attn"]["reason"]
    assert cpu["selected"] == "flash"
    train = vita_ext.attention_backends("cpu", torch.float32, needs_grad=True)
    assert train["flash"]["available"] and train["flash"]["reason"].startswith("only when forced")
    assert "accuracy rule" in train["flash"]["reason"]
    assert train["selected"] == "vita"


def test_calls_are_counted():
    q = rand(1, 5, 2, 8, dtype=BF16)
    before = dict(ab.BACKEND_CALLS)
    vita_ext.attention_lse(q, q, q, causal=True)
    vita_ext.attention_lse(q.float(), q.float(), q.float(), backend="vita")
    assert ab.BACKEND_CALLS["flash"] == before.get("flash", 0) + 1
    assert ab.BACKEND_CALLS["vita"] == before.get("vita", 0) + 1


# ------------------------------------------------------------------------- CPU block decomposition
@pytest.mark.parametrize("sq, sk, causal, want", [
    (4, 4, True, [(0, 4, 0, 4, True)]),
    (1, 9, True, [(0, 1, 0, 9, False)]),                         # decode sees every key
    (3, 9, True, [(0, 3, 0, 6, False), (0, 3, 6, 9, True)]),     # cached prefix + square causal block
    (9, 3, True, [(6, 9, 0, 3, True)]),                          # the first 6 rows see no key
    (9, 3, False, [(0, 9, 0, 3, False)]),
    (0, 3, True, []),
])
def test_cpu_blocks(sq, sk, causal, want):
    assert fa.cpu_blocks(sq, sk, causal, None) == want


def test_cpu_blocks_varlen():
    assert fa.cpu_blocks(40, 40, True, [0, 5, 5, 17, 40]) == [(0, 5, 0, 5, True), (5, 17, 5, 17, True),
                                                                (17, 40, 17, 40, True)]


# --------------------------------------------------------------------- CUDA paths, without a GPU
needs_cuda_build = pytest.mark.skipif(not vita_ext.build_info()["cuda"], reason="needs a build with CUDA kernels")


def _fake_qkv(b, sq, sk, hq, hkv, d, dtype=BF16):
    return (torch.empty(b, sq, hq, d, dtype=dtype, device="cuda"), torch.empty(b, sk, hkv, d, dtype=dtype, device="cuda"),
            torch.empty(b, sk, hkv, d, dtype=dtype, device="cuda"))


@needs_cuda_build
@pytest.mark.parametrize("sq, sk, causal", [(4096, 4096, True), (7, 300, True), (300, 7, True), (33, 65, False)])
def test_fake_cuda_flash_forward_backward(sq, sk, causal):
    with FakeTensorMode():
        q, k, v = _fake_qkv(2, sq, sk, 40, 8, 128)
        out, lse = vita_ext.attention_lse(q, k, v, causal=causal, backend="flash")
        assert out.shape == q.shape and out.dtype == BF16 and out.is_contiguous() and out.device.type == "cuda"
        assert lse.shape == (2, 40, sq) and lse.dtype == F32
        # The backward the autograd function runs (autograd's engine itself needs a real GPU context):
        dq, dk, dv = vita_ext.attention_lse_backward(torch.empty_like(out), q, k, v, out, lse, causal, backend="flash")
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dk.dtype == BF16


@needs_cuda_build
def test_fake_cuda_flash_decode_against_cache_view():
    # Decode: Sq = 1 against a view of a preallocated cache [B, max_len, Hkv, D] (strided batch dim).
    # aten's flash forward (mha_fwd) runs its split-KV kernel for it (num_splits from its heuristic) and
    # swaps the GQA query groups into the sequence dim.
    with FakeTensorMode():
        cache = torch.empty(1, 8192, 8, 128, dtype=BF16, device="cuda")
        q = torch.empty(1, 1, 40, 128, dtype=BF16, device="cuda")
        out, lse = vita_ext.attention_lse(q, cache[:, :4097], cache[:, :4097], causal=True, backend="flash")
        assert out.shape == (1, 1, 40, 128) and lse.shape == (1, 40, 1)


@needs_cuda_build
def test_fake_cuda_flash_varlen_no_host_sync():
    with FakeTensorMode():
        q, k, v = _fake_qkv(1, 1000, 1000, 16, 4, 64)
        cu = torch.empty(5, dtype=torch.int64, device="cuda")  # fake: no values exist, so none can be read
        out, lse = vita_ext.attention_lse(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=600, backend="flash")
        assert out.shape == q.shape and lse.shape == (1, 16, 1000) and lse.dtype == F32
        g = vita_ext.attention_lse_backward(torch.empty_like(out), q, k, v, out, lse, True, None, cu, 600,
                                            backend="flash")
        assert [t.shape for t in g] == [q.shape, k.shape, v.shape]


@needs_cuda_build
def test_fake_cuda_ring_backward_with_fp32_out():
    with FakeTensorMode():
        q, k, v = _fake_qkv(1, 256, 256, 8, 2, 64)
        out = torch.empty(1, 256, 8, 64, dtype=F32, device="cuda")  # a ring keeps the merged out in fp32
        lse = torch.empty(1, 8, 256, dtype=F32, device="cuda")[:, :, :128]  # a half of a zig-zag shard
        go = torch.empty(1, 128, 8, 64, dtype=BF16, device="cuda")
        g = vita_ext.attention_lse_backward(go, q[:, :128], k, v, out[:, :128], lse, False, 0.125, backend="flash")
        assert [t.shape for t in g] == [(1, 128, 8, 64), (1, 256, 2, 64), (1, 256, 2, 64)]


@needs_cuda_build
def test_fake_cuda_auto_picks_flash_for_bf16_and_vita_for_fp32(monkeypatch):
    monkeypatch.delenv(ab.ENV_VAR, raising=False)
    monkeypatch.setattr(ab, "flash_attn_module", lambda: (None, "not installed"))
    with FakeTensorMode():
        q, k, v = _fake_qkv(1, 64, 64, 4, 2, 64)
        before = dict(ab.BACKEND_CALLS)
        vita_ext.attention_lse(q, k, v, causal=True)
        vita_ext.attention_lse(q.float(), k.float(), v.float(), causal=True)
        assert ab.BACKEND_CALLS["flash"] == before.get("flash", 0) + 1
        assert ab.BACKEND_CALLS["vita"] == before.get("vita", 0) + 1


def test_padded_varlen_lse_round_trip():
    # Older torch (<= 2.6) returns and takes the varlen lse padded [n, H, max_seqlen]; the gather and its
    # inverse must round-trip ([H, total] <-> padded) without host syncs.
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    lse = torch.arange(2 * 8, dtype=F32).view(2, 8)
    padded = fa._padded_lse(lse, cu, 3, 5)
    assert padded.shape == (3, 2, 5)
    assert torch.equal(padded[0, :, :3], lse[:, :3]) and torch.equal(padded[2, :, :5], lse[:, 3:8])
    assert torch.equal(fa._varlen_lse(padded, cu, 8), lse)


def test_fix_lse_conventions():
    # FlashAttention-2 writes +inf for rows with a zero (no keys) or NaN softmax sum.
    lse = torch.tensor([[[math.inf, math.inf, 1.0, math.inf]]])
    fixed = fa._fix_lse(lse.clone(), sq=4, sk=2, causal=True)
    assert torch.isneginf(fixed[..., :2]).all() and fixed[..., 2] == 1.0 and torch.isnan(fixed[..., 3])


# ------------------------------------------------------------ flash-attn: its public API's contract
class _FlashAttnStandIn:
    """Implements flash-attn's documented public functions with vita_ext's reference, to check that the
    backend calls them with the right layouts, dtypes and arguments (the package needs a GPU)."""

    calls: list

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        assert q.dim() == 4 and q.stride(-1) == 1 and return_attn_probs
        self.calls.append("func")
        out, lse = vita_ext.reference.attention_lse(q, k, v, causal, softmax_scale)
        return out.to(q.dtype), lse, None

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                               return_attn_probs=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and isinstance(max_q, int) and return_attn_probs
        self.calls.append("varlen")
        out, lse = vita_ext.reference.attention_lse(q[None], k[None], v[None], causal, softmax_scale, cu_q)
        return out[0].to(q.dtype), lse[0], None


@pytest.mark.parametrize("cu", [None, [0, 5, 9, 20]])
def test_flash_attn_forward_contract(cu, monkeypatch):
    stand_in = _FlashAttnStandIn()
    monkeypatch.setattr(fa, "flash_attn_module", lambda: (stand_in, "stand-in"))
    q, k, v = rand(1, 20, 4, 16, dtype=BF16), rand(1, 20, 2, 16, dtype=BF16), rand(1, 20, 2, 16, dtype=BF16)
    cu_t = torch.tensor(cu) if cu else None
    out, lse = fa.flash_attn_forward(q, k, v, True, 0.25, cu_t, 11 if cu else None)
    want = vita_ext.reference.attention_lse(q, k, v, True, 0.25, cu_t)
    assert stand_in.calls == ["varlen" if cu else "func"]
    assert out.shape == q.shape and lse.shape == (1, 4, 20) and lse.dtype == F32
    torch.testing.assert_close(out, want[0].to(BF16))
    torch.testing.assert_close(lse, want[1].float())


# ------------------------------------------------------------------- the model and the ring on flash
def test_greedy_text_unchanged_by_backend(monkeypatch, tmp_path):
    """The shipped digits model reading 8 held-out digits (a 2K-token prompt): the same greedy text and
    nearly the same logits whether attention runs on the vita kernels or PyTorch's CPU flash kernel."""
    pytest.importorskip("sklearn")
    from vita_ext.generation import generate
    from vita_ext.model.default import default_model
    from vita_ext.train import digits

    model, processor, _, _ = default_model()
    _, test = digits.load_split()
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.png"))
        digits.to_image(test.images[i]).save(paths[-1])
    inputs = processor("<image>" * 8 + "\nRead the digits in order.", images=paths)
    results = {}
    for name in ("vita", "flash"):
        monkeypatch.setenv(ab.ENV_VAR, name)
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[0, -1]
        out = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"],
                       max_new_tokens=12, temperature=0)
        assert out.extra["attention"] == {"vision": name, "prefill": name, "decode": name}
        results[name] = (logits, out.sequences)
    assert torch.equal(results["vita"][1], results["flash"][1])
    torch.testing.assert_close(results["flash"][0], results["vita"][0], rtol=1e-4, atol=1e-4)


def _ring_bf16(rank, world, out):
    from vita_ext import reference
    from vita_ext.parallel import ZigZagPlan, ring_attention

    g = torch.Generator().manual_seed(0)
    s, hq, hkv, d = 64, 4, 2, 32
    q, k, v = (torch.randn(1, s, h, d, generator=g, dtype=torch.float64).to(BF16) for h in (hq, hkv, hkv))
    go = torch.randn(1, s, hq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(BF16)
    plan = ZigZagPlan(s, world)
    ql, kl, vl = (plan.shard(x, rank).clone().requires_grad_() for x in (q, k, v))
    before = dict(ab.BACKEND_CALLS)
    o, _ = ring_attention(ql, kl, vl)
    o.backward(plan.shard(go, rank))
    out["flash_calls"] = ab.BACKEND_CALLS["flash"] - before.get("flash", 0)
    out["vita_calls"] = ab.BACKEND_CALLS["vita"] - before.get("vita", 0)
    errs = {}
    for prec, dt in (("plain", BF16), ("ref", torch.float64)):
        xs = [t.to(dt).detach().requires_grad_() for t in (q, k, v)]
        ro = reference.attention_lse(*xs, causal=True)[0]
        ro.backward(go.to(dt))
        errs[prec] = [ro.detach(), *(x.grad for x in xs)]
    local = [o.detach(), ql.grad, kl.grad, vl.grad]
    out["errors"] = [((a.double() - plan.shard(r, rank).double()).abs().max().item(),
                      (plan.shard(p, rank).double() - plan.shard(r, rank).double()).abs().max().item())
                     for a, p, r in zip(local, errs["plain"], errs["ref"])]


@pytest.mark.parametrize("world", [2])
def test_ring_attention_bf16_on_flash(world, tmp_path):
    from _utils import spawn_gloo

    for r in spawn_gloo(_ring_bf16, world, str(tmp_path)):
        assert "error" not in r, r.get("error")
        assert r["flash_calls"] > 0 and r["vita_calls"] == 0  # forward blocks ran on flash
        for (ours, plain), name in zip(r["errors"], ("out", "dq", "dk", "dv")):
            assert ours <= 2 * plain + 1e-2, (name, ours, plain)  # 2x PyTorch's bf16 error (+ a bf16 ulp)


def test_torch_compile_fullgraph_flash_path():
    # The flash backends are plain PyTorch ops behind an autograd.Function: dynamo traces them whole.
    q, k, v = (rand(1, 37, h, 16, dtype=BF16).requires_grad_() for h in (4, 2, 2))

    def f(q, k, v):
        return vita_ext.attention_lse(q, k, v, causal=True)[0].float().square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["vita", "flash"])
def test_cuda_varlen_training_step_has_no_host_sync(cuda_device, backend):
    # Packed training on a GPU: cu_seqlens on the device with max_seqlen from the packer -> no sync in the
    # forward or the backward, on the vita kernels as on the flash ones (issue 12).
    if ab.why_not(backend, ab.AttentionCall("cuda", BF16, 64, True, True)) is not None:
        pytest.skip(f"backend {backend} unavailable here")
    q, k, v = (rand(1, 300, h, 64, dtype=BF16, device=cuda_device).requires_grad_() for h in (8, 2, 2))
    cu = torch.tensor([0, 100, 101, 300], dtype=torch.int32, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = vita_ext.attention_lse(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=199, backend=backend)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = vita_ext.reference.attention_lse(q.detach().double(), k.detach().double(), v.detach().double(), True,
                                            None, cu)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
