"""The Long-VITA model: HF Qwen2 parity, KV-cache decode, vision scatter, config and checkpoint handling."""
import json
import os

import pytest
import torch

from vita_ext.model.checkpoint import INDEX_FILE, write_random_checkpoint
from vita_ext.model.config import LongVITAConfig
from vita_ext.model.long_vita import LongVITAForCausalLM, parameter_shapes
from vita_ext.model.presets import long_vita_14b, tiny

SHARED_14B = {  # the real release config's fields (shared/reference/long_vita_14b_config.json)
    "visual": {"architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0,
               "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1024, "image_size": 448,
               "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
               "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b", "norm_type": "layer_norm",
               "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
               "qk_normalization": False, "qkv_bias": True, "torch_dtype": "bfloat16",
               "transformers_version": "4.37.2", "use_flash_attn": True},
    "architectures": ["LongVITAForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 13824, "max_position_embeddings": 1310720, "max_window_layers": 70,
    "model_type": "long_vita", "num_attention_heads": 40, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 1310720, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064}


def small_config(vocab=1000):
    return tiny(image_size=56, vocab_size=vocab)


@pytest.fixture(scope="module")
def model():
    return LongVITAForCausalLM.random(small_config(), seed=1)


def test_release_config_parses_to_the_14b_shapes():
    cfg = LongVITAConfig.from_dict(SHARED_14B)
    assert cfg == long_vita_14b()
    assert cfg.num_image_tokens == 256 and cfg.text.head_dim == 128
    shapes = parameter_shapes(cfg)
    assert shapes["model.vision_projection.mlp.0.weight"] == (1024, 4096)
    assert shapes["model.vision_projection.mlp.2.weight"] == (5120, 1024)
    assert shapes["model.layers.47.self_attn.k_proj.weight"] == (1024, 5120)
    assert shapes["model.vision_model.embeddings.position_embedding"] == (1, 1025, 1024)
    llm = sum(torch.Size(s).numel() for n, s in shapes.items() if not n.startswith("model.vision"))
    vit = sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.vision_model"))
    proj = sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.vision_projection"))
    assert 14.6e9 < llm < 14.8e9 and 0.28e9 < vit < 0.32e9 and 9.3e6 < proj < 9.5e6


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(foo=1), "unknown field"),
    (lambda d: d["visual"].update(bar=2), "visual: unknown field"),
    (lambda d: d.pop("hidden_size"), "missing required field"),
    (lambda d: d.pop("visual"), "'visual'"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d.update(num_key_value_heads=7), "num_attention_heads"),
    (lambda d: d.update(rope_scaling={"type": "yarn"}), "rope_scaling"),
])
def test_bad_config_raises_clearly(edit, message):
    data = json.loads(json.dumps(SHARED_14B))
    edit(data)
    with pytest.raises(ValueError, match=message):
        LongVITAConfig.from_dict(data)


def test_llm_matches_hf_qwen2(model):
    transformers = pytest.importorskip("transformers")
    t = model.config.text
    hf_cfg = transformers.Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                      num_attention_heads=t.num_attention_heads,
                                      num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                                      rope_theta=t.rope_theta, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, t.vocab_size, (2, 37))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_kv_cache_decode_equals_full_forward(model):
    ids = torch.randint(0, 1000, (1, 29))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1, 29)
        first = model(ids[:, :20], past_key_values=cache, logits_to_keep=1).logits
        steps = [model(ids[:, i:i + 1], past_key_values=cache, logits_to_keep=1).logits for i in range(20, 29)]
    torch.testing.assert_close(first[0, 0], full[0, 19], atol=1e-5, rtol=0)
    for i, step in zip(range(20, 29), steps):
        torch.testing.assert_close(step[0, 0], full[0, i], atol=1e-5, rtol=0)
    assert cache.length == 29


def test_logits_to_keep_forms(model):
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=3).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 5])).logits
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(picked, full[:, [0, 5]], atol=1e-6, rtol=0)


def test_vision_features_land_on_context_positions(model):
    ids = torch.randint(0, 1000, (1, 24))
    pixel_values = torch.randn(2, 3, 56, 56)
    positions = torch.tensor([3, 4, 5, 6, 15, 16, 17, 18])
    with torch.no_grad():
        embeds = model.embed(ids, pixel_values, positions)
        feats = model.encode_images(pixel_values)
        plain = model.model.embed_tokens(ids)
        vit = model.model.vision_model(pixel_values)
        proj = model.model.vision_projection(vit)
    assert feats.shape == (2, 4, model.config.text.hidden_size)
    torch.testing.assert_close(feats, proj)
    torch.testing.assert_close(embeds[0, positions], feats.reshape(8, -1))
    others = torch.ones(24, dtype=torch.bool)
    others[positions] = False
    torch.testing.assert_close(embeds[0, others], plain[0, others])
    with pytest.raises(ValueError, match="context_positions"):
        model.embed(ids, pixel_values, positions[:5])


def test_vision_chunking_does_not_change_results(model):
    pixel_values = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(pixel_values, chunk_size=2),
                                   model.encode_images(pixel_values, chunk_size=64))


def test_loss_matches_full_logits_cross_entropy(model):
    ids = torch.randint(0, 1000, (1, 19))
    labels = ids.clone()
    labels[0, :7] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    with torch.no_grad():
        logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    model.zero_grad(set_to_none=True)


def test_checkpoint_roundtrip_sharded(tmp_path):
    cfg = small_config(vocab=152064)
    path = write_random_checkpoint(tmp_path / "ckpt", cfg, dtype=torch.float32, seed=7, max_shard_bytes=20 * 2**20)
    files = sorted(os.listdir(path))
    assert INDEX_FILE in files and "config.json" in files and "generation_config.json" in files
    assert "vocab.json" in files and "merges.txt" in files and "tokenizer_config.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    loaded = LongVITAForCausalLM.from_pretrained(path)
    fresh = LongVITAForCausalLM.random(cfg, seed=7)
    for (n1, p1), (n2, p2) in zip(loaded.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)
    bf16 = LongVITAForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def _small_ckpt(tmp_path):
    return write_random_checkpoint(tmp_path / "c", small_config(vocab=152064), dtype=torch.bfloat16,
                                   max_shard_bytes=20 * 2**20)


def test_missing_shard_is_named(tmp_path):
    path = _small_ckpt(tmp_path)
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        LongVITAForCausalLM.from_pretrained(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = _small_ckpt(tmp_path)
    index_file = os.path.join(path, INDEX_FILE)
    index = json.load(open(index_file))
    shard = index["weight_map"].pop("model.norm.weight")
    index["weight_map"]["model.extra.weight"] = shard
    json.dump(index, open(index_file, "w"))
    with pytest.raises(ValueError, match=r"missing keys: model\.norm\.weight.*unexpected keys: model\.extra\.weight"):
        LongVITAForCausalLM.from_pretrained(path)


def test_shape_mismatch_is_listed(tmp_path):
    path = _small_ckpt(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"shape mismatch.*mlp\.gate_proj\.weight"):
        LongVITAForCausalLM.from_pretrained(path)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LongVITAForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LongVITAForCausalLM.from_pretrained(tmp_path / "empty")
