"""Context parallelism on CPU with gloo: ring attention, model prefill and greedy decode over P = 1..4
spawned processes must equal the single-process results; plus the zig-zag plan and error paths."""

import pytest
import torch
import torch.distributed as dist

from _utils import spawn_gloo
from vita_ext import reference
from vita_ext.parallel import ZigZagPlan, simulated_ring_attention


def _setup_model():
    from vita_ext.model.long_vita import LongVITAForCausalLM
    from vita_ext.model.presets import tiny

    model = LongVITAForCausalLM.random(tiny(image_size=56, vocab_size=700), seed=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 700, (1, 45), generator=g)
    pixel_values = torch.randn(3, 3, 56, 56, generator=g)
    positions = torch.tensor(list(range(5, 13)) + list(range(20, 24)))  # tile 1 spans a chunk boundary for P>1
    return model, ids, pixel_values, positions


def _ring_check(rank, world, out):
    from vita_ext.parallel import ring_attention

    g = torch.Generator().manual_seed(0)
    s, hq, hkv, d = 37, 6, 2, 16  # odd length: needs padding; GQA 3:1
    q = torch.randn(2, s, hq, d, generator=g)
    k, v = torch.randn(2, s, hkv, d, generator=g), torch.randn(2, s, hkv, d, generator=g)
    plan = ZigZagPlan(s, world)
    qp, kp, vp = (plan.pad(x, 0.5) for x in (q, k, v))
    ref_o, ref_l = reference.attention_lse(qp.double(), kp.double(), vp.double(), causal=True)
    ql, kl, vl = (plan.shard(x, rank).clone().requires_grad_() for x in (qp, kp, vp))
    o, lse = ring_attention(ql, kl, vl)
    out["ring_out_err"] = (o.double() - plan.shard(ref_o, rank)).abs().max().item()
    out["ring_lse_err"] = (lse.double() - plan.shard(ref_l, rank, dim=2)).abs().max().item()
    weight = torch.randn(qp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    qr, kr, vr = (x.double().requires_grad_() for x in (qp, kp, vp))
    (reference.attention_lse(qr, kr, vr, causal=True)[0] * weight).sum().backward()
    (o.double() * plan.shard(weight, rank)).sum().backward()
    out["ring_grad_err"] = max((a.grad.double() - plan.shard(b.grad, rank)).abs().max().item()
                               for a, b in ((ql, qr), (kl, kr), (vl, vr)))


def _model_check(rank, world, out):
    from vita_ext.generation import generate
    from vita_ext.parallel import RingPrefillAttention, cp_generate

    model, ids, pixel_values, positions = _setup_model()
    with torch.no_grad():
        plan = ZigZagPlan(ids.shape[1], world)
        from vita_ext.parallel.generate import _embed_local

        embeds = _embed_local(model, plan, rank, ids, pixel_values, positions)
        hidden = model.decode(embeds, plan.positions(rank)[None], RingPrefillAttention(plan))
        last = ids.shape[1] - 1
        if plan.owner(last) == rank:
            logits = model.head(hidden[0], torch.tensor([plan.local_index(last)]))[0]
            ref = model(ids, pixel_values, positions, logits_to_keep=1).logits[0, 0]
            out["prefill_logits_err"] = (logits - ref).abs().max().item()
    cp = cp_generate(model, ids, pixel_values, positions, max_new_tokens=8, do_sample=False, eos_token_id=[-1])
    single = generate(model, ids, pixel_values, positions, max_new_tokens=8, do_sample=False, eos_token_id=[-1])
    out["cp_tokens"], out["tokens"] = cp.sequences[0].tolist(), single.sequences[0].tolist()
    out["prefill_passes"], out["cache_rows"] = cp.extra["prefill_passes"], cp.extra["cache_rows"]


def _checks(rank, world, out, names):
    for name in names:
        globals()[name](rank, world, out)


def _spawn(world, tmp_path, checks):
    return spawn_gloo(_checks, world, tmp_path, checks)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_context_parallel_equals_single_process(world, tmp_path):
    """One spawn per world size: ring attention (fwd + bwd, fp32, odd length, GQA), the model's prefill
    logits at the last position, and 8 greedy tokens decoded over the sharded KV cache."""
    results = _spawn(world, tmp_path, ["_ring_check", "_model_check"])
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors
    for r in results:
        assert r["ring_out_err"] < 1e-5 and r["ring_lse_err"] < 1e-5 and r["ring_grad_err"] < 1e-5, r
    owners = [r for r in results if "prefill_logits_err" in r]
    assert len(owners) == 1 and owners[0]["prefill_logits_err"] < 1e-4
    for r in results:
        assert r["cp_tokens"] == r["tokens"]
        assert r["prefill_passes"] == 1  # the prompt is never re-run during decode
        rows = r["cache_rows"]
        assert sum(rows) == 45 + 7 and max(rows) - min(rows) <= 1  # balanced, sharded cache


def _inconsistent(rank, world, out):
    from vita_ext.parallel import cp_generate

    model, ids, pixel_values, positions = _setup_model()
    ids = ids[:, : 40 + rank]  # ranks disagree on the prompt
    try:
        cp_generate(model, ids, max_new_tokens=2)
    except RuntimeError as exc:
        out["message"] = str(exc)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="torch 2.6's gloo can deadlock in destroy_process_group after this error path (its "
                           "ProcessGroupGloo destructor joins a worker thread that waits for the GIL)")
def test_inconsistent_ranks_fail_on_every_rank(tmp_path):
    for r in _spawn(2, tmp_path, ["_inconsistent"]):
        assert "disagree" in r.get("message", ""), r


def test_uninitialised_group_is_a_clear_error():
    from vita_ext.parallel import ring_attention

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        ring_attention(x, x, x)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_simulated_ring_equals_full_attention(world, device):
    s = 53
    plan = ZigZagPlan(s, world)
    q = plan.pad(torch.randn(1, s, 4, 32), 0.1).to(device)
    k, v = (plan.pad(torch.randn(1, s, 2, 32), 0.1).to(device) for _ in range(2))
    outs, lses = simulated_ring_attention([plan.shard(q, r) for r in range(world)],
                                          [plan.shard(k, r) for r in range(world)],
                                          [plan.shard(v, r) for r in range(world)], world)
    ref_o, ref_l = reference.attention_lse(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(plan.unshard(outs).double(), ref_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.unshard(lses, dim=2).double(), ref_l, atol=1e-5, rtol=0)


def test_zigzag_plan_layout():
    plan = ZigZagPlan(seq_len=13, world_size=2)
    assert plan.padded_len == 16 and plan.chunk == 4
    assert plan.positions(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert plan.positions(1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert [plan.owner(p) for p in (0, 4, 8, 12)] == [0, 1, 1, 0]
    assert plan.local_index(12) == 4 and plan.local_index(9) == 5
    x = torch.arange(16)[None]
    assert torch.equal(plan.unshard([plan.shard(x, 0), plan.shard(x, 1)]), x)
    tiles, feat_rows, local_rows = plan.local_vision(torch.tensor([2, 3, 4, 5, 12, 13, 14, 15]), 4, rank=0)
    assert tiles.tolist() == [0, 1] and feat_rows.tolist() == [0, 1, 4, 5, 6, 7]
    assert local_rows.tolist() == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="world_size"):
        ZigZagPlan(4, 0)
