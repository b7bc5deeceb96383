"""Context-parallel training with gloo: the loss and the all-reduced gradients of zig-zag-sharded
packed sequences (ring attention forward and backward, per-rank vision tiles, a shared trainable
projector) must equal the single-process ones, for P = 1, 2, 4."""
import json

import pytest
import torch
import torch.distributed as dist

from _utils import spawn_gloo
from vita_ext.model.long_vita import LongVITAForCausalLM
from vita_ext.model.presets import tiny
from vita_ext.train import Sample, apply_trainable, pack_samples
from vita_ext.train.step import PackedLoss, all_reduce_grads

IGNORE = -100


def _model(trainable):
    model = LongVITAForCausalLM.random(tiny(image_size=56, vocab_size=700, layers=2, hidden=32), seed=2)
    apply_trainable(model, trainable)
    return model.train()


def _sample(index, n, tile_starts, sup_from, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 700, (n,), generator=g)
    labels = torch.full((n,), IGNORE)
    labels[sup_from:] = ids[sup_from:]
    positions = torch.cat([torch.arange(s, s + 4) for s in tile_starts]) if tile_starts else torch.zeros(0, dtype=torch.long)
    return Sample(index, ids, labels, torch.randn(len(tile_starts), 3, 56, 56, generator=g), positions)


def _batches():
    # 61 tokens: padded to 64 (P = 2, 4); tiles straddle the chunk boundaries 8, 16 and 32
    first = pack_samples([_sample(0, 30, [6, 14], 20, 1), _sample(1, 25, [3], 12, 2)], 61, "no-reset", pad_token_id=0)
    second = pack_samples([_sample(2, 58, [0, 30], 40, 3)], 61, "no-reset", pad_token_id=0)
    return [first, second]


def _params(model):
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def _step(model, batches, **kw):
    loss_fn = PackedLoss(model, **kw)
    supervised = sum(b.num_supervised for b in batches)
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        local = loss_fn(b)
        (local / supervised).backward()
        total += local.detach().double()
    return total / supervised


def _cp_gradients(rank, world, out, trainable):
    batches = _batches()
    model = _model(trainable)
    loss = _step(model, batches, context_parallel=True)
    dist.all_reduce(loss)
    params = _params(model)
    all_reduce_grads(params)
    ref_model = _model(trainable)
    ref_loss = _step(ref_model, batches)
    out["loss_err"] = abs(float(loss) - float(ref_loss))
    out["grad_err"] = max((p.grad - r.grad).abs().max().item() for p, r in zip(params, _params(ref_model)))
    out["grad_scale"] = max(r.grad.abs().max().item() for r in _params(ref_model))
    out["checksum"] = float(sum(p.grad.double().sum() for p in params))
    out["vit_grads"] = all(p.grad is not None for p in model.model.vision_model.parameters())


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("trainable", ["llm+projector", "all"])
def test_context_parallel_gradients_equal_single_process(world, trainable, tmp_path):
    results = spawn_gloo(_cp_gradients, world, tmp_path, trainable)
    for r in results:
        assert "error" not in r, r["error"]
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
        assert r["grad_scale"] > 1e-4  # the gradients compared are not all zero
        assert r["vit_grads"] == (trainable == "all")
    assert len({r["checksum"] for r in results}) == 1  # every rank holds the same gradients


def test_context_parallel_refuses_reset_packing(tmp_path):
    packed = pack_samples([_sample(0, 10, [], 5, 0)], 16, "reset", pad_token_id=0)
    model = _model("llm+projector")
    loss_fn = PackedLoss(model)
    loss_fn.cp, loss_fn.world = True, 2  # no process group needed to reach the check
    with pytest.raises(ValueError, match="no-reset"):
        loss_fn(packed)


def _cp_trainer(rank, world, out, cfg_dict):
    from vita_ext.train import Trainer, resolve_config

    t = Trainer(resolve_config(cfg_dict))
    summary = t.train()
    out["losses"] = [r["loss"] for r in t.history]
    out["final"] = summary["final"]


def test_trainer_with_context_parallel_matches_single_process(tmp_path):
    from PIL import Image

    from vita_ext.model.checkpoint import write_random_checkpoint
    from vita_ext.train import Trainer, resolve_config

    cfg = tiny(image_size=56, layers=2, hidden=32)
    cfg.text.tie_word_embeddings = True
    write_random_checkpoint(tmp_path / "m", cfg, dtype=torch.float32, seed=0)
    records = []
    for i in range(6):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()).convert("RGB").resize(
            (56, 56)).save(tmp_path / f"{i}.png")
        records.append({"messages": [{"role": "user", "content": "Frame 1: <image>\nFrame 2: <image>\nRead them."},
                                     {"role": "assistant", "content": f"{i}{(i + 3) % 10}"}],
                        "images": [f"{i}.png", f"{(i + 1) % 6}.png"]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = dict(stage=3, data=str(tmp_path / "d.jsonl"), model=str(tmp_path / "m"), seq_len=90, max_steps=3,
                dtype="fp32", lr=1e-3, progress=False, grad_accum=2)
    single = Trainer(resolve_config(dict(base, out=str(tmp_path / "single"))))
    single.train()
    expected = [r["loss"] for r in single.history]
    for r in spawn_gloo(_cp_trainer, 2, tmp_path, dict(base, out=str(tmp_path / "cp"), context_parallel=True)):
        assert "error" not in r, r["error"]
        assert r["losses"] == pytest.approx(expected, abs=1e-5)
    a = LongVITAForCausalLM.from_pretrained(str(tmp_path / "single" / "final")).state_dict()
    b = LongVITAForCausalLM.from_pretrained(str(tmp_path / "cp" / "final")).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
