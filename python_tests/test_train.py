"""Training: data and labels, packing (both modes), stage policies and lrs, the schedule, the loss
under accumulation, recompute, resume equality, atomic checkpoints, bad records, config layering,
real optimizer steps, and the CLI (train, plot-train). Context parallelism: test_train_cp.py."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from vita_ext import reference
from vita_ext.model.checkpoint import write_random_checkpoint
from vita_ext.model.language import LocalAttention
from vita_ext.model.long_vita import LongVITAForCausalLM
from vita_ext.model.presets import tiny
from vita_ext.ops import attention_lse
from vita_ext.processing import LongVITAProcessor, LongVITATokenizer
from vita_ext.train import (STAGES, BadRecordWarning, JsonlDataset, Packer, Sample, Trainer, apply_trainable,
                            count_steps, latest_checkpoint, lr_factor, pack_samples, param_groups,
                            read_config_file, resolve_config, stage_defaults, validate)
from vita_ext.train import checkpoint as ckpt
from vita_ext.train.step import PackedLoss

IGNORE = -100


# ------------------------------------------------------------------------------------- fixtures
def _config():
    cfg = tiny(image_size=56, layers=2, hidden=32)
    cfg.text.tie_word_embeddings = True
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_random_checkpoint(path, _config(), dtype=torch.float32, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return LongVITATokenizer.default()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return LongVITAProcessor(tokenizer, image_size=56, patch_size=14)


def _png(path, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).convert("RGB").resize((56, 56), Image.NEAREST).save(path)


def _qa(image, answer, question="Which digit is this?"):
    return {"messages": [{"role": "user", "content": f"<image>\n{question}"},
                         {"role": "assistant", "content": answer}], "images": [image]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    for i in range(10):
        _png(root / "img" / f"{i}.png", i)
    records = [_qa(f"img/{i}.png", str(i)) for i in range(10)]
    records.append({"messages": [{"role": "user", "content": "<image> and <image>: which is larger?"},
                                 {"role": "assistant", "content": "the second"}], "images": ["img/3.png", "img/8.png"]})
    records.append({"messages": [{"role": "user", "content": "Count to three."},
                                 {"role": "assistant", "content": "1 2 3"}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _sample(index, n, sup, tiles=0, tokens=4, vocab=700, seed=0):
    """A synthetic sample: n tokens, the last `sup` supervised, `tiles` tiles of `tokens` rows at the start."""
    g = torch.Generator().manual_seed(seed + index)
    ids = torch.randint(0, vocab, (n,), generator=g)
    labels = torch.full((n,), IGNORE)
    labels[n - sup:] = ids[n - sup:]
    return Sample(index, ids, labels, torch.randn(tiles, 3, 56, 56, generator=g),
                  torch.arange(1, 1 + tiles * tokens))


def _train_cfg(checkpoint, data, out, **kw):
    base = dict(stage=2, data=data, model=checkpoint, out=str(out), seq_len=128, max_steps=4, dtype="fp32",
                lr=1e-3, progress=False, keep_last=0)
    base.update(kw)
    return resolve_config(base)


# ------------------------------------------------------------------------------ data and labels
def test_labels_supervise_assistant_content_and_im_end_only(tmp_path, processor, tokenizer):
    _png(tmp_path / "a.png", 1)
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "<image>\nWhich digit is this?"},
                        {"role": "assistant", "content": "7"},
                        {"role": "user", "content": "Sure?"},
                        {"role": "assistant", "content": "yes"}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    s = JsonlDataset(tmp_path / "d.jsonl", processor).encode(0)
    supervised = s.labels[s.labels != IGNORE]
    assert tokenizer.decode(supervised.tolist()) == "7<|im_end|>\nyes<|im_end|>\n"
    assert torch.equal(s.labels[s.labels != IGNORE], s.input_ids[s.labels != IGNORE])
    assert (s.labels[s.context_positions] == IGNORE).all()  # vision tokens never supervised
    # the tokens before the first answer are exactly the inference prompt
    prompt = processor("<image>\nWhich digit is this?", images=[str(tmp_path / "a.png")])["input_ids"][0]
    system = tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n")
    first = int((s.labels != IGNORE).nonzero()[0])
    assert s.input_ids[:first].tolist() == system + prompt.tolist()


def test_bad_records_are_skipped_counted_and_reported(tmp_path, processor, checkpoint):
    _png(tmp_path / "ok.png", 0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not an image")
    good = _qa("ok.png", "4")
    lines = [json.dumps(good),
             json.dumps(_qa("absent.png", "1")),                                              # missing media
             json.dumps({"messages": [{"role": "user", "content": "<image><image>"},
                                      {"role": "assistant", "content": "x"}], "images": ["ok.png"]}),  # tags
             json.dumps({"messages": []}),                                                    # empty
             json.dumps({"messages": [{"role": "user", "content": "  "}]}),                  # empty
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),                  # nothing supervised
             "{not json",                                                                     # invalid JSON
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),                  # invalid record
             json.dumps(_qa("broken.png", "2")),                                              # unreadable
             json.dumps({"messages": [{"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "\nstarts with a newline"}]}),  # strict
             json.dumps({"messages": [{"role": "user", "content": "long " * 300},
                                      {"role": "assistant", "content": "ok"}]}),             # too long
             json.dumps(good)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = JsonlDataset(path, processor)
    packer = Packer(ds, seq_len=256, mode="reset", shuffle=False)
    with pytest.warns(BadRecordWarning) as caught:
        batch = packer.next_batch()
    assert batch.sample_indices == [0, 11]
    counts = ds.report.counts()
    assert dict(counts) == {"missing_media": 1, "tag_mismatch": 1, "empty_conversation": 2, "no_supervised_token": 1,
                            "invalid_json": 1, "invalid_record": 1, "unreadable_media": 1, "label_mismatch": 1,
                            "too_long": 1}
    assert len(caught) == 10
    assert ds.report.summary(len(ds)).startswith("data: 10 of 12 record(s) skipped")
    packer.next_batch()  # a second epoch counts nothing twice
    assert ds.report.num_bad == 10
    # and a whole training run goes through, reporting the count at the end
    cfg = _train_cfg(checkpoint, str(path), tmp_path / "out", seq_len=256, max_steps=1, stage=1)
    with pytest.warns(BadRecordWarning):
        summary = Trainer(cfg).train()
    assert summary["data"].startswith("data: 10 of 12") and sum(summary["bad_records"].values()) == 10


def test_dataset_without_usable_record_is_an_error(tmp_path, processor):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    packer = Packer(JsonlDataset(tmp_path / "d.jsonl", processor), 64)
    with pytest.warns(BadRecordWarning), pytest.raises(ValueError, match="no usable training record"):
        packer.next_batch()


# ------------------------------------------------------------------------------------- packing
def test_pack_reset_positions_cu_seqlens_targets_and_vision():
    a, b, c = _sample(0, 5, 2, tiles=1), _sample(1, 7, 3), _sample(2, 9, 1, tiles=2)
    p = pack_samples([a, b, c], 26, "reset")
    assert p.input_ids.shape == (1, 26) and p.num_tokens == 21
    assert p.position_ids[0].tolist() == list(range(5)) + list(range(7)) + list(range(9)) + list(range(5))
    assert p.cu_seqlens.tolist() == [0, 5, 12, 21, 26] and p.cu_seqlens.dtype == torch.int32
    assert torch.equal(p.input_ids[0, :21], torch.cat([a.input_ids, b.input_ids, c.input_ids]))
    assert (p.input_ids[0, 21:] == 151643).all() and (p.labels[0, 21:] == IGNORE).all()
    # targets: shifted inside each sample; a sample's last token never predicts the next sample
    expected = []
    for s in (a, b, c):
        expected += s.labels[1:].tolist() + [IGNORE]
    assert p.targets[0].tolist() == expected + [IGNORE] * 5
    assert p.num_supervised == 2 + 3 + 1 - 3 + 3  # each sample's last label moves to its previous token
    # vision: tiles concatenated in order, positions moved to the packed row
    assert torch.equal(p.pixel_values, torch.cat([a.pixel_values, c.pixel_values]))
    assert p.context_positions.tolist() == [1, 2, 3, 4] + [13 + k for k in range(8)]


def test_pack_no_reset_global_positions():
    p = pack_samples([_sample(0, 5, 2), _sample(1, 7, 3)], 16, "no-reset")
    assert p.position_ids[0].tolist() == list(range(16)) and p.cu_seqlens is None
    assert p.targets[0, 4].item() == IGNORE and p.targets[0, 11].item() == IGNORE
    with pytest.raises(ValueError, match="do not fit"):
        pack_samples([_sample(0, 10, 1), _sample(1, 10, 1)], 16)
    with pytest.raises(ValueError, match="packing mode"):
        pack_samples([], 16, "sideways")


def _loop_mask(lengths, total):
    """Allowed (query, key) pairs built by hand: same sample and key <= query."""
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        for i in range(n):
            mask[start + i, start:start + i + 1] = True
        start += n
    return mask


def test_block_diagonal_attention_equals_reference_mask():
    p = pack_samples([_sample(0, 7, 2), _sample(1, 13, 3), _sample(2, 4, 1)], 29, "reset")
    lengths = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()
    mask = _loop_mask(lengths, 29)
    assert torch.equal(reference.attention_mask(29, 29, True, p.cu_seqlens), mask)
    q, k, v = torch.randn(1, 29, 4, 16), torch.randn(1, 29, 2, 16), torch.randn(1, 29, 2, 16)
    out, lse = attention_lse(q, k, v, causal=True, cu_seqlens=p.cu_seqlens)
    kk, vv = k.double().repeat_interleave(2, 2), v.double().repeat_interleave(2, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) / 4.0
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-5, rtol=0)


def test_packed_reset_decoder_equals_each_sample_alone():
    model = LongVITAForCausalLM.random(tiny(image_size=56, vocab_size=700, layers=2, hidden=32), seed=1)
    samples = [_sample(0, 6, 2), _sample(1, 11, 3), _sample(2, 5, 2)]
    p = pack_samples(samples, 25, "reset", pad_token_id=0)
    with torch.no_grad():
        packed = model.decode(model.model.embed_tokens(p.input_ids), p.position_ids, LocalAttention(cu_seqlens=p.cu_seqlens))
        start = 0
        for s in samples:
            alone = model.decode(model.model.embed_tokens(s.input_ids[None]), torch.arange(s.length)[None],
                                 LocalAttention())
            torch.testing.assert_close(packed[:, start:start + s.length], alone, atol=1e-5, rtol=1e-5)
            start += s.length


def test_packer_streams_next_fit_and_restores_position(data, processor):
    ds = JsonlDataset(data, processor)
    packer = Packer(ds, 128, "reset", seed=3)
    first = [packer.next_batch() for _ in range(3)]
    for b in first:
        assert b.num_tokens <= 128 and b.input_ids.shape == (1, 128)
    state = packer.state_dict()
    more = [packer.next_batch().sample_indices for _ in range(4)]
    again = Packer(ds, 128, "reset", seed=3)
    again.load_state_dict(state)
    assert [again.next_batch().sample_indices for _ in range(4)] == more
    # one epoch visits every record exactly once
    p = Packer(ds, 128, "reset", seed=5)
    seen = []
    while p.epoch == 0:
        seen += p.next_batch().sample_indices
    assert sorted(seen) == list(range(len(ds)))


def test_count_steps_matches_the_packer(data, processor, checkpoint, tmp_path):
    cfg = _train_cfg(checkpoint, data, tmp_path, max_steps=None, epochs=2, grad_accum=2, seq_len=100)
    ds = JsonlDataset(data, processor)
    packer = Packer(ds, 100, cfg.packing, cfg.seed)
    n = 0
    while packer.epoch < 2:
        packer.next_batch()
        n += 1
    assert count_steps(ds, cfg) == -(-n // 2)


# ------------------------------------------------------------------------- stages and schedule
def test_stage_presets_follow_the_paper():
    assert [STAGES[s].trainable for s in (1, 2, 3, 4)] == ["projector", "all", "llm+projector", "llm+projector"]
    assert [(STAGES[s].lr, STAGES[s].min_lr) for s in (1, 2, 3, 4)] == [(1e-3, 1e-5), (1e-5, 1e-7), (5e-6, 1e-7),
                                                                       (5e-6, 1e-7)]
    assert [STAGES[s].packing for s in (1, 2, 3, 4)] == ["reset", "reset", "no-reset", "no-reset"]
    assert [STAGES[s].seq_len for s in (1, 2, 3, 4)] == [32768, 16384, 131072, 1048576]
    d = stage_defaults(4)
    assert (d["adam_beta1"], d["adam_beta2"], d["weight_decay"], d["grad_clip"], d["warmup_ratio"], d["dtype"],
            d["recompute"]) == (0.9, 0.999, 0.0, 1.0, 0.03, "bf16", True)
    with pytest.raises(ValueError, match="stage"):
        stage_defaults(5)


def _count(module):
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_policy_trainable_parameter_counts(stage):
    model = LongVITAForCausalLM.random(_config(), seed=0)
    counts = apply_trainable(model, STAGES[stage].trainable)
    vit, proj = _count(model.model.vision_model), _count(model.model.vision_projection)
    llm = _count(model) - vit - proj
    expected = {1: dict(vit=0, projector=proj, llm=0), 2: dict(vit=vit, projector=proj, llm=llm),
                3: dict(vit=0, projector=proj, llm=llm), 4: dict(vit=0, projector=proj, llm=llm)}[stage]
    assert counts == expected
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    assert trainable == sum(expected.values())
    assert model.lm_head.weight.requires_grad == (stage != 1)  # tied to embed_tokens: the LLM's


def test_stage2_vit_layerwise_learning_rates():
    model = LongVITAForCausalLM.random(_config(), seed=0)
    apply_trainable(model, "all")
    groups = param_groups(model, 0.1, 0.9)
    L = len(model.model.vision_model.encoder.layers)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales == pytest.approx({"llm+projector": 1.0, **{f"vit.layer{k}": 0.1 * 0.9 ** (L + 1 - k)
                                                            for k in range(L + 1)}})
    vit = model.model.vision_model
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in groups}
    assert id(vit.embeddings.patch_embedding.weight) in by_name["vit.layer0"]
    assert id(vit.encoder.layers[L - 1].mlp.fc2.weight) in by_name[f"vit.layer{L}"]
    assert id(model.model.vision_projection.mlp[0].weight) in by_name["llm+projector"]
    n = sum(len(g["params"]) for g in groups)
    assert n == len({id(p) for p in model.parameters()})  # every parameter once, tied weights once


def test_lr_schedule_warmup_cosine_and_min_lr():
    total, ratio = 100, 0.01
    f = [lr_factor(s, total, 0.03, ratio) for s in range(total)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # ceil(3% of 100) = 3 warmup steps
    assert f[3] == pytest.approx(1.0) and f[-1] == pytest.approx(ratio)
    mid = 3 + (total - 1 - 3) / 2
    assert lr_factor(int(mid), total, 0.03, ratio) == pytest.approx(ratio + (1 - ratio) * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * (int(mid) - 3) / (total - 4))).item()))
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # monotone after warmup
    assert lr_factor(0, 10, 0.0, 0.0) == 1.0


def test_trainer_optimizer_groups_and_logged_lrs(checkpoint, data, tmp_path):
    t = Trainer(_train_cfg(checkpoint, data, tmp_path, max_steps=5, lr=2e-3, min_lr=2e-5, warmup_ratio=0.4))
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    L = 2
    assert groups["vit.layer0"]["initial_lr"] == pytest.approx(2e-3 * 0.1 * 0.9 ** (L + 1))
    assert groups["llm+projector"]["initial_lr"] == pytest.approx(2e-3)
    opt = t.optimizer
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["weight_decay"] == 0.0
    t.train()
    logged = [r["lr"] for r in t.history]
    assert logged == pytest.approx([2e-3 * lr_factor(s, 5, 0.4, 0.01) for s in range(5)])


# ------------------------------------------------------------------------------ config layering
def test_config_layers_preset_file_cli(tmp_path):
    (tmp_path / "c.yaml").write_text("stage: 3\nlr: 0.01\nseq-len: 4096\nrecompute: true\n")
    cfg = resolve_config({"data": "d", "model": "m", "out": "o", "seq_len": 512}, str(tmp_path / "c.yaml"))
    assert (cfg.stage, cfg.lr, cfg.seq_len, cfg.min_lr, cfg.packing, cfg.recompute) == (3, 0.01, 512, 1e-7,
                                                                                        "no-reset", True)
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.5, "trainable": "all"}))
    cfg = resolve_config({"stage": 1, "data": "d", "model": "m", "out": "o"}, str(tmp_path / "c.json"))
    assert (cfg.lr, cfg.trainable, cfg.packing, cfg.min_lr) == (0.5, "all", "reset", 1e-5)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        read_config_file(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="packing"):
        resolve_config({"data": "d", "model": "m", "out": "o", "packing": "zigzag"})
    with pytest.raises(ValueError, match="context_parallel"):
        resolve_config({"stage": 2, "data": "d", "model": "m", "out": "o", "context_parallel": True})
    with pytest.raises(ValueError, match="--data"):
        resolve_config({"model": "m", "out": "o"})


# ----------------------------------------------------------------------- loss, accumulation, recompute
def _two_batches(processor, data):
    packer = Packer(JsonlDataset(data, processor), 96, "reset", seed=1)
    return [packer.next_batch(), packer.next_batch()]


def test_accumulated_loss_is_sum_over_all_supervised_tokens(checkpoint, data, tmp_path, processor):
    t = Trainer(_train_cfg(checkpoint, data, tmp_path, grad_accum=2))
    b1, b2 = _two_batches(processor, data)
    loss, n = t.accumulate([b1, b2])
    got = {name: p.grad.clone() for name, p in t.model.named_parameters() if p.grad is not None}
    assert n == b1.num_supervised + b2.num_supervised
    t.optimizer.zero_grad(set_to_none=True)
    s1, s2 = t.loss_sum(b1), t.loss_sum(b2)
    ((s1 + s2) / n).backward()
    assert loss == pytest.approx(float(s1.detach() + s2.detach()) / n, rel=1e-6)
    for name, p in t.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-7, rtol=1e-5)
    # the per-token average differs from the mean of the micro-batch means whenever counts differ
    if b1.num_supervised != b2.num_supervised:
        mean_of_means = 0.5 * (s1.item() / b1.num_supervised + s2.item() / b2.num_supervised)
        assert loss != pytest.approx(mean_of_means, rel=1e-9)


def test_recompute_gives_the_same_gradients(checkpoint, data, processor):
    model = LongVITAForCausalLM.from_pretrained(checkpoint)
    apply_trainable(model, "all")
    batch = _two_batches(processor, data)[0]
    grads = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        model.model.gradient_checkpointing = recompute
        model.model.vision_model.gradient_checkpointing = recompute
        PackedLoss(model)(batch).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_frozen_vit_keeps_no_graph_and_gets_no_gradient(checkpoint, data, processor):
    model = LongVITAForCausalLM.from_pretrained(checkpoint)
    apply_trainable(model, "llm+projector")
    model.train()
    outputs = []
    model.model.vision_model.register_forward_hook(lambda m, i, o: outputs.append((o.requires_grad, m.training)))
    batch = _two_batches(processor, data)[0]
    assert batch.pixel_values.shape[0] > 0
    PackedLoss(model)(batch).backward()
    assert outputs and all(not rg and not training for rg, training in outputs)
    assert all(p.grad is None for p in model.model.vision_model.parameters())
    assert all(p.grad is not None for p in model.model.vision_projection.parameters())


class _VitaOpCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every vita_ext op call (name, args, outputs), forward and backward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "vita_ext":
            self.calls.append((func._schema.name.split("::")[1], args, out))
        return out

    def named(self, name):
        return [(args, out) for n, args, out in self.calls if n == name]


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_stage1_step_computes_no_lm_head_dw_and_no_vit_dx(checkpoint, data, tmp_path, amp):
    # Stage 1 trains the projector only: the trainer's step must not compute the LM head's dW (the
    # cross-entropy forms dH only) nor dx for the frozen ViT (the projector's backward is not asked).
    t = Trainer(_train_cfg(checkpoint, data, tmp_path, stage=1, dtype=amp, seq_len=128))
    assert t.trainable_counts["vit"] == 0 and t.trainable_counts["llm"] == 0
    batches = [t.packer.next_batch()]
    assert batches[0].pixel_values.shape[0] > 0 and batches[0].num_supervised > 0
    rec = _VitaOpCalls()
    with rec:
        t.train_step(batches)
    [(ce_args, ce_out)] = rec.named("masked_linear_cross_entropy")
    hidden, weight = ce_args[0], ce_args[1]
    assert ce_args[5] == batches[0].num_supervised  # the host count: no device read
    assert list(ce_args[6]) == [True, False]  # grad_in_forward: dH only
    assert ce_out[2].shape == hidden.shape and ce_out[3].numel() == 0  # no dW, not even a buffer
    assert rec.named("masked_linear_cross_entropy_backward") == []  # nothing recomputed
    [(bwd_args, bwd_out)] = rec.named("pixel_shuffle_projector_backward")
    assert list(bwd_args[-1]) == [False, True, True, True, False, True, False]  # no dx; no biases here
    assert bwd_out[0].numel() == 0  # no dx buffer
    assert all(p.grad is None for p in t.model.model.vision_model.parameters())
    assert t.model.lm_head.weight.grad is None
    assert all(p.grad is None for p in t.model.model.layers.parameters())
    assert all(p.grad is not None for p in t.model.model.vision_projection.parameters())


def test_bf16_autocast_loss_is_close_to_fp32(checkpoint, data, processor):
    model = LongVITAForCausalLM.from_pretrained(checkpoint)
    apply_trainable(model, "all")
    batch = _two_batches(processor, data)[0]
    fp32 = PackedLoss(model)(batch)
    bf16 = PackedLoss(model, amp_dtype=torch.bfloat16)(batch)
    assert torch.isfinite(bf16) and bf16.dtype == torch.float32
    assert abs(bf16.detach().item() - fp32.detach().item()) / fp32.detach().item() < 0.02
    bf16.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in model.parameters())


def test_optimizer_steps_lower_the_loss(checkpoint, data, tmp_path):
    t = Trainer(_train_cfg(checkpoint, data, tmp_path, max_steps=8, seq_len=96, warmup_ratio=0.0, lr=3e-3,
                           shuffle=False))
    t.train()
    losses = [r["loss"] for r in t.history]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["supervised_tokens"] > 0 and r["tokens"] > 0 for r in t.history)


# ---------------------------------------------------------------------------- resume and atomicity
class _Crash(Exception):
    pass


def test_resume_continues_bit_for_bit(checkpoint, data, tmp_path, monkeypatch):
    kw = dict(max_steps=6, save_every=2, seq_len=96, lr=3e-3, grad_accum=2, warmup_ratio=0.2)
    full = Trainer(_train_cfg(checkpoint, data, tmp_path / "full", **kw))
    full.train()
    reference_losses = [r["loss"] for r in full.history]

    out = tmp_path / "interrupted"
    crashing = Trainer(_train_cfg(checkpoint, data, out, **kw))
    original = Trainer.train_step

    def crash_at_5(self, batches):
        if self.step == 4:
            raise _Crash
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    with pytest.raises(_Crash):
        crashing.train()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert latest_checkpoint(str(out)).endswith("checkpoint-4")
    resumed = Trainer(_train_cfg(checkpoint, data, out, resume="auto", **kw))
    resumed.train()
    with open(out / "metrics.jsonl") as f:
        curve = [json.loads(line)["loss"] for line in f]
    assert curve == reference_losses  # exact equality, not approximate
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.packer.state_dict() == full.packer.state_dict()


def test_checkpoint_layout_and_atomic_save(checkpoint, data, tmp_path, monkeypatch):
    t = Trainer(_train_cfg(checkpoint, data, tmp_path, max_steps=1))
    t.train()
    good = tmp_path / "checkpoint-1"
    names = set(os.listdir(good))
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.pt",
            "trainer_state.json"} <= names
    assert validate(str(good))["step"] == 1
    assert LongVITAForCausalLM.from_pretrained(str(good)) is not None  # loads as a release checkpoint
    assert os.path.isfile(tmp_path / "final" / "model.safetensors")

    # a crash in the middle of a save leaves no checkpoint-2, and nothing half-written behind
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            real_save(obj, path, *a, **k)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise _Crash("killed while writing optimizer.pt")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    t.step = 2
    with pytest.raises(_Crash):
        t.save()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert not (tmp_path / "checkpoint-2").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")

    # a hard kill leaves the temporary directory: it never counts and the next run removes it
    (tmp_path / ".checkpoint-3.abc.tmp").mkdir()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")
    assert ckpt.remove_stale_temporaries(str(tmp_path)) == [".checkpoint-3.abc.tmp"]

    # a directory named like a checkpoint but incomplete or corrupt is refused
    shutil.copytree(good, tmp_path / "checkpoint-5")
    os.remove(tmp_path / "checkpoint-5" / "trainer_state.json")
    with pytest.raises(ValueError, match="incomplete"):
        validate(str(tmp_path / "checkpoint-5"))
    shutil.copytree(good, tmp_path / "checkpoint-6")
    with open(tmp_path / "checkpoint-6" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="corrupt"):
        validate(str(tmp_path / "checkpoint-6"))
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")
    resumed = Trainer(_train_cfg(checkpoint, data, tmp_path, max_steps=1, resume=str(tmp_path / "checkpoint-6")))
    with pytest.raises(ValueError, match="corrupt"):
        resumed.train()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_train_and_plot(checkpoint, data, tmp_path, capsys):
    from vita_ext.cli import main

    (tmp_path / "cfg.yaml").write_text("seq_len: 128\nlr: 0.002\n")
    out = tmp_path / "run"
    assert main(["train", "--stage", "2", "--data", data, "--model", checkpoint, "--out", str(out), "--max-steps",
                 "3", "--dtype", "fp32", "--config", str(tmp_path / "cfg.yaml"), "--seq-len", "100",
                 "--no-progress", "--recompute"]) == 0
    err = capsys.readouterr().err
    assert "stage 2: trainable all" in err and "of 100 tokens" in err and "recompute on" in err
    assert "data: no record skipped" in err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["lr"] == pytest.approx(0.002 * lr_factor(0, 3))
    assert open(out / "metrics.csv").readline().startswith("step,loss,lr")
    assert validate(str(out / "checkpoint-3"))["config"]["seq_len"] == 100
    png = tmp_path / "loss.png"
    assert main(["plot-train", str(out), str(out / "metrics.csv"), "--out", str(png), "--smooth", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "--stage", "2", "--data", str(tmp_path / "none.jsonl"), "--model", checkpoint,
                 "--out", str(out), "--max-steps", "1"]) == 2
    assert "not found" in capsys.readouterr().err
