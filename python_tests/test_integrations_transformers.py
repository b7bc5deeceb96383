"""vita_ext.patch_qwen2 / patch_internvl / unpatch on tiny random Hugging Face models (fp32, CPU, no downloads).

Every numerical test compares a patched deep copy with the unpatched original: loss, kept logits, all
parameter gradients (1e-5), greedy generate (exact), image features. Weights are re-drawn with a larger
spread than HF's 0.02 init so that the comparisons are not trivially passed by near-zero activations.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vita_ext  # noqa: E402
from vita_ext.integrations import transformers as vt  # noqa: E402
from transformers import (InternVLConfig, InternVLForConditionalGeneration, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Model)
from transformers.models.internvl import modeling_internvl  # noqa: E402
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

V = 97
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _clean_state():
    vt.ATTENTION_CALLS.clear()
    vt._WARNED.clear()
    yield
    vita_ext.unpatch()  # class-level patches never leak into other tests


def _randomize(model, std=0.15):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1 and "bias" not in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def qwen2(tie=False, **kw):
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, **kw)
    return _randomize(Qwen2ForCausalLM(cfg)).eval()


def internvl(downsample_ratio=0.5, act="gelu", text=None):
    vc = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                              image_size=(32, 32), patch_size=(4, 4))
    tc = text or Qwen2Config(vocab_size=V + 4, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    tokens = int((32 // 4) ** 2 * downsample_ratio ** 2)
    cfg = InternVLConfig(vision_config=vc, text_config=tc, image_token_id=V + 3, image_seq_length=tokens,
                         downsample_ratio=downsample_ratio, projector_hidden_act=act)
    return _randomize(InternVLForConditionalGeneration(cfg)).eval()


def pair(model):
    return model, copy.deepcopy(model)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ref, pat):
    g_ref, g_pat = grads(ref), grads(pat)
    assert g_ref.keys() == g_pat.keys() and len(g_ref) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_pat[name], g_ref[name], **TOL, msg=name)


def ids_and_labels(b=2, s=13):
    ids = torch.randint(0, V, (b, s))
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


# ------------------------------------------------------------------------------------------- Qwen2: numbers

@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_loss_and_all_gradients_match(tie):
    ref, pat = pair(qwen2(tie=tie))
    assert vita_ext.patch_qwen2(pat) is pat
    ids, labels = ids_and_labels()
    out_ref, out_pat = ref(input_ids=ids, labels=labels), pat(input_ids=ids, labels=labels)
    assert out_pat.logits is None and out_pat.loss.dtype == torch.float32
    torch.testing.assert_close(out_pat.loss, out_ref.loss, **TOL)
    out_ref.loss.backward()
    out_pat.loss.backward()
    assert_same_grads(ref, pat)
    assert vt.ATTENTION_CALLS == {"vita_ext": 2}


def test_qwen2_num_items_in_batch_and_return_logits():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat, return_logits=True)
    ids, labels = ids_and_labels()
    n = torch.tensor(31)
    out_ref = ref(input_ids=ids, labels=labels, num_items_in_batch=n)
    out_pat = pat(input_ids=ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out_pat.loss, out_ref.loss, **TOL)
    torch.testing.assert_close(out_pat.logits, out_ref.logits, **TOL)
    out_ref.loss.backward()
    out_pat.loss.backward()
    assert_same_grads(ref, pat)


@pytest.mark.parametrize("keep", [0, 1, 5, 50, torch.tensor([0, 7, -1]), torch.tensor([[1, 2], [12, 0]]), "mask"])
def test_qwen2_logits_to_keep_forms(keep):
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids, _ = ids_and_labels()
    if isinstance(keep, str):
        keep = torch.rand(ids.shape) < 0.5
    out_ref, out_pat = ref(input_ids=ids, logits_to_keep=keep), pat(input_ids=ids, logits_to_keep=keep)
    assert out_pat.loss is None
    torch.testing.assert_close(out_pat.logits, out_ref.logits, **TOL)
    w = torch.randn_like(out_ref.logits)
    (out_ref.logits * w).mean().backward()
    (out_pat.logits * w).mean().backward()
    assert_same_grads(ref, pat)


def test_qwen2_kept_positions_with_shift_labels():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids, labels = ids_and_labels()
    shift = torch.randint(0, V, (2, 3))
    shift[1, 0] = -100
    kw = dict(input_ids=ids, labels=labels, shift_labels=shift, logits_to_keep=3)
    torch.testing.assert_close(pat(**kw).loss, ref(**kw).loss, **TOL)
    with pytest.raises(ValueError, match="logits_to_keep keeps 6 positions"):
        pat(input_ids=ids, labels=labels, logits_to_keep=3)


def test_qwen2_return_dict_false_gives_tuple():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids, labels = ids_and_labels()
    out = pat(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    torch.testing.assert_close(out[0], ref(input_ids=ids, labels=labels).loss, **TOL)


def test_qwen2_custom_loss_function_is_respected():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids, labels = ids_and_labels()
    for m in (ref, pat):
        m.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    torch.testing.assert_close(pat(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss, **TOL)


# ------------------------------------------------------------------------------- Qwen2: generate and padding

def test_qwen2_generate_greedy_identical_with_kv_cache():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, V, (1, 9))
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))
    assert vt.ATTENTION_CALLS == {"vita_ext": 2 * 8}  # prefill + 7 single-token decode steps, 2 layers


def test_qwen2_generate_static_cache_identical():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, V, (1, 9))
    kw = dict(max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))
    assert vt.ATTENTION_CALLS == {"vita_ext": 2 * 5}  # prefill and decode, empty cache slots sliced off


def test_left_padded_batch_is_served_and_matches():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, V, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    out_ref, out_pat = ref(input_ids=ids, attention_mask=mask), pat(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out_pat.logits, out_ref.logits, **TOL)  # padded rows too (both give 0 attention)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))
    kw["cache_implementation"] = "static"
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))
    assert set(vt.ATTENTION_CALLS) == {"vita_ext"}


def test_right_padded_training_batch_falls_back_explicitly():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids, labels = ids_and_labels(3, 11)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels[1, 8:] = -100
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.warns(RuntimeWarning, match="not served by attention_lse"):
        out_pat = pat(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_pat.loss, out_ref.loss, **TOL)
    out_ref.loss.backward()
    out_pat.loss.backward()
    assert_same_grads(ref, pat)
    assert vt.ATTENTION_CALLS == {"fallback:attention mask other than causal + left padding": 2}


def test_packed_sequences_fall_back_explicitly():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, V, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    kw = dict(input_ids=ids, position_ids=pos, use_cache=False)  # (with a cache HF itself ignores packing)
    with pytest.warns(RuntimeWarning, match="not served by attention_lse"):
        out_pat = pat(**kw)
    torch.testing.assert_close(out_pat.logits, ref(**kw).logits, **TOL)
    assert "vita_ext" not in vt.ATTENTION_CALLS


# ----------------------------------------------------------------------------------- attention function

def _ranges_mask(b, sq, sk, ranges):
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    return torch.stack([(j >= lo) & (j <= i + hi - sq) for lo, hi in ranges])[:, None]


@pytest.mark.parametrize("case", ["causal", "decode", "static_prefill", "bidirectional", "ranges", "same_ranges",
                                  "other_mask", "fewer_keys"])
def test_attention_function_matches_sdpa(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, hkv, d = 3, 4, 2, 16
    sq, sk = {"decode": (1, 9), "static_prefill": (5, 12), "fewer_keys": (6, 4)}.get(case, (7, 7))
    if case in ("ranges", "same_ranges"):
        sq, sk = 3, 10
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = case != "bidirectional", hq // hkv, False
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, d)
    mask = None
    if case == "ranges":
        mask = _ranges_mask(b, sq, sk, [(0, 10), (4, 10), (2, 8)])
    elif case == "same_ranges":
        mask = _ranges_mask(b, sq, sk, [(1, 8)] * b)
    elif case == "other_mask":
        mask = torch.rand(b, 1, sq, sk) < 0.7
        mask[..., 0] = True
    served = case not in ("other_mask", "fewer_keys")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, weights = vt.vita_ext_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert len(caught) == (0 if served else 1)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and ours.shape == (b, sq, hq, d)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert sum(vt.ATTENTION_CALLS.values()) == 1 and ("vita_ext" in vt.ATTENTION_CALLS) == served


# ----------------------------------------------------------------------------------------------- InternVL

def _images_and_ids(model, b=2, s=30):
    n_img = model.config.image_seq_length
    ids = torch.randint(0, V, (b, s))
    ids[:, 3:3 + n_img] = model.config.image_token_id
    return torch.randn(b, 3, 32, 32), ids


def test_internvl_image_features_logits_loss_and_grads_match():
    ref, pat = pair(internvl())
    vita_ext.patch_internvl(pat)
    assert (pat.config.vision_config._attn_implementation, pat.config.text_config._attn_implementation) == \
        ("vita_ext", "vita_ext")
    pixels, ids = _images_and_ids(ref)
    torch.testing.assert_close(pat.get_image_features(pixels).pooler_output,
                               ref.get_image_features(pixels).pooler_output, **TOL)
    with torch.no_grad():
        out_ref, out_pat = ref(input_ids=ids, pixel_values=pixels), pat(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(out_pat.image_hidden_states, out_ref.image_hidden_states, **TOL)
    torch.testing.assert_close(out_pat.logits, out_ref.logits, **TOL)
    labels = ids.masked_fill(ids == ref.config.image_token_id, -100)
    out_ref = ref(input_ids=ids, pixel_values=pixels, labels=labels)
    out_pat = pat(input_ids=ids, pixel_values=pixels, labels=labels)
    assert out_pat.logits is None
    torch.testing.assert_close(out_pat.loss, out_ref.loss, **TOL)
    out_ref.loss.backward()
    out_pat.loss.backward()
    assert_same_grads(ref, pat)
    assert vt.ATTENTION_CALLS["vita_ext"] > 0 and len(vt.ATTENTION_CALLS) == 1


def test_internvl_generate_greedy_identical():
    ref, pat = pair(internvl())
    vita_ext.patch_internvl(pat)
    pixels, ids = _images_and_ids(ref, b=1)
    kw = dict(pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert torch.equal(pat.generate(ids, **kw), ref.generate(ids, **kw))


def test_hf_pixel_shuffle_order_is_the_op_reference():
    model = internvl()
    x = torch.randn(2, 64, 32)
    hf = model.model.pixel_shuffle(x.reshape(2, 8, 8, 32), scale_factor=0.5).reshape(2, 16, 128)
    torch.testing.assert_close(hf, vita_ext.reference.pixel_shuffle(x), atol=0, rtol=0)


@pytest.mark.parametrize("kw, message", [
    (dict(downsample_ratio=0.25), "downsample_ratio=0.25"),
    (dict(act="gelu_pytorch_tanh"), "only exact 'gelu'"),
    (dict(text=LlamaConfig(vocab_size=V + 4, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)), "text model 'llama'"),
])
def test_internvl_unsupported_configs_are_refused(kw, message):
    model = internvl(**kw)
    with pytest.raises(ValueError, match=message):
        vita_ext.patch_internvl(model)
    assert model.config._attn_implementation == "sdpa" and "forward" not in model.__dict__
    assert "get_image_features" not in model.model.__dict__


def test_internvl_class_patch_falls_back_for_unsupported_projector():
    ref = internvl(downsample_ratio=0.25)
    pixels = torch.randn(1, 3, 32, 32)
    expected = ref.get_image_features(pixels).pooler_output
    vita_ext.patch_internvl()
    with pytest.warns(RuntimeWarning, match="downsample_ratio"):
        got = ref.get_image_features(pixels).pooler_output
    torch.testing.assert_close(got, expected, **TOL)  # (the vision tower's attention is served)


# ----------------------------------------------------------------------------------- patch / unpatch

def test_unpatch_restores_instance():
    model = qwen2()
    ids, labels = ids_and_labels()
    before = model(input_ids=ids, labels=labels)
    vita_ext.patch_qwen2(model)
    assert model.forward.__func__ is not Qwen2ForCausalLM.forward and model.config._attn_implementation == "vita_ext"
    assert vita_ext.unpatch(model) is model
    assert "forward" not in model.__dict__ and model.forward.__func__ is Qwen2ForCausalLM.forward
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, vt._STATE_ATTR)
    after = model(input_ids=ids, labels=labels)
    assert after.logits is not None and torch.equal(after.logits, before.logits)
    assert torch.equal(after.loss, before.loss)
    vita_ext.unpatch(model)  # unpatching an unpatched model does nothing


def test_unpatch_restores_internvl_instance():
    model = internvl()
    model.set_attn_implementation({"vision_config": "eager"})
    vita_ext.patch_internvl(model)
    assert model.model.get_image_features.__func__ is not modeling_internvl.InternVLModel.get_image_features
    vita_ext.unpatch(model)
    assert model.config.vision_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.model.get_image_features.__func__ is modeling_internvl.InternVLModel.get_image_features
    assert "forward" not in model.__dict__


def test_patching_twice_is_harmless():
    ref, pat = pair(qwen2())
    vita_ext.patch_qwen2(pat)
    vita_ext.patch_qwen2(pat, return_logits=True)
    ids, labels = ids_and_labels()
    out = pat(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=labels).loss, **TOL)
    assert out.logits is not None  # the second call's options win
    vita_ext.unpatch(pat)
    assert pat.config._attn_implementation == "sdpa" and "forward" not in pat.__dict__


def test_class_level_patch_and_unpatch_restore_identities():
    originals = (Qwen2ForCausalLM.forward, modeling_qwen2.ALL_ATTENTION_FUNCTIONS,
                 modeling_internvl.ALL_ATTENTION_FUNCTIONS, modeling_internvl.InternVLModel.get_image_features,
                 InternVLForConditionalGeneration.forward)
    ref = qwen2()
    ids, labels = ids_and_labels()
    expected = ref(input_ids=ids, labels=labels).loss
    assert vita_ext.patch_qwen2() is None
    vita_ext.patch_qwen2()
    vita_ext.patch_internvl()
    assert Qwen2ForCausalLM.forward is not originals[0]
    assert modeling_qwen2.ALL_ATTENTION_FUNCTIONS is not originals[1]
    out = ref(input_ids=ids, labels=labels)  # a model created before the patch is served too
    assert out.logits is None and vt.ATTENTION_CALLS == {"vita_ext": 2}
    torch.testing.assert_close(out.loss, expected, **TOL)
    vita_ext.unpatch()
    now = (Qwen2ForCausalLM.forward, modeling_qwen2.ALL_ATTENTION_FUNCTIONS,
           modeling_internvl.ALL_ATTENTION_FUNCTIONS, modeling_internvl.InternVLModel.get_image_features,
           InternVLForConditionalGeneration.forward)
    assert all(a is b for a, b in zip(now, originals))
    assert torch.equal(ref(input_ids=ids, labels=labels).loss, expected)


def test_attn_implementation_name_works_with_from_config():
    model = Qwen2ForCausalLM._from_config(qwen2().config, attn_implementation="vita_ext")
    model(input_ids=torch.randint(0, V, (1, 5)))
    assert vt.ATTENTION_CALLS == {"vita_ext": 2}


def test_qwen2_model_attention_only():
    base = _randomize(Qwen2Model(qwen2().config)).eval()
    ref, pat = pair(base)
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(pat(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state, **TOL)
    assert vt.ATTENTION_CALLS == {"vita_ext": 2}


def test_unsupported_model_class_raises():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM"):
        vita_ext.patch_qwen2(llama)
    with pytest.raises(TypeError, match="unsupported model class Qwen2ForCausalLM"):
        vita_ext.patch_internvl(qwen2())
    with pytest.raises(TypeError, match="vita_ext.patch: unsupported model class LlamaForCausalLM"):
        vita_ext.patch(llama)
    assert llama.config._attn_implementation == "sdpa" and "forward" not in llama.__dict__


def test_generic_patch_dispatches_on_the_class():
    model = qwen2()
    assert vita_ext.patch(model) is model and vt._STATE_ATTR in model.__dict__
    vita_ext.unpatch(model)
    assert vt._STATE_ATTR not in model.__dict__


def test_subclass_overriding_forward_or_biased_head_is_refused():
    class Custom(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = _randomize(Custom(qwen2().config)).eval()
    with pytest.raises(ValueError, match="overrides forward"):
        vita_ext.patch_qwen2(model)
    vita_ext.patch_qwen2(model, lm_head=False)  # attention only is fine
    assert model.config._attn_implementation == "vita_ext" and "forward" not in model.__dict__
    biased = qwen2()
    biased.lm_head = nn.Linear(64, V, bias=True)
    with pytest.raises(ValueError, match="bias-free"):
        vita_ext.patch_qwen2(biased)


def test_forward_wrapped_by_someone_else_is_not_overwritten():
    model = qwen2()
    original = Qwen2ForCausalLM.forward

    def hooked(*args, **kwargs):  # what accelerate's hooks do under device_map
        return original(model, *args, **kwargs)

    model.forward = hooked
    with pytest.raises(ValueError, match="already wrapped on this instance"):
        vita_ext.patch_qwen2(model)
    assert model.forward is hooked and model.config._attn_implementation == "sdpa"
    vita_ext.patch_qwen2(model, lm_head=False)
    vita_ext.unpatch(model)
    assert model.forward is hooked


def test_transformers_version_outside_tested_range_warns(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        vita_ext.patch_qwen2(qwen2())  # the tested version: no warning
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.warns(UserWarning, match=r"transformers 4\.57\.1 is outside the tested range"):
        vita_ext.patch_qwen2(qwen2())
    monkeypatch.setattr(transformers, "__version__", "5.30.0.dev0")
    with pytest.warns(UserWarning, match="outside the tested range"):
        vita_ext.patch_internvl()


# -------------------------------------------------------------------------------------------- memory

def _profile_step(model, ids):
    """(peak, largest): the peak of the running total of bytes that torch.profiler(profile_memory=True)
    records as allocated/freed by each op (ordered by op start), and the largest single op allocation,
    over one training step (forward with labels + backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    total = peak = largest = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak, largest = max(peak, total), max(largest, event.self_cpu_memory_usage)
    return peak, largest


def test_training_step_on_long_sequence_avoids_the_logits(monkeypatch):
    """HF's step allocates the [T, V] fp32 logits (and as large softmax / gradient buffers); the patched step
    never does. The CE kernel tiles its logits at up to 256 MB (VITA_EXT_CE_ROW_CHUNK rows), far below
    real [T, V] sizes (1M x 152K x 4 bytes = 608 GB) but above this test's 32 MB logits, so the test sets a
    256-row tile (8 MB): the same code path, scaled down."""
    monkeypatch.setenv("VITA_EXT_CE_ROW_CHUNK", "256")
    vocab, tokens = 8192, 1024
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=tokens,
                      tie_word_embeddings=False)
    ref, pat = pair(_randomize(Qwen2ForCausalLM(cfg)).train())
    vita_ext.patch_qwen2(pat)
    ids = torch.randint(0, vocab, (1, tokens))
    logits_bytes = tokens * vocab * 4
    peak_ref, largest_ref = _profile_step(ref, ids)
    peak_pat, largest_pat = _profile_step(pat, ids)
    assert largest_ref >= logits_bytes
    assert largest_pat <= logits_bytes // 4
    assert peak_pat < peak_ref - logits_bytes and 4 * peak_pat < peak_ref
