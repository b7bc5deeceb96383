"""Sampling and the decode loop: HF-equivalent logits processing, greedy equality, stopping, seeding."""
import pytest
import torch

from vita_ext.generation import GenerationConfig, generate, process_logits
from vita_ext.model.long_vita import LongVITAForCausalLM
from vita_ext.model.presets import tiny


@pytest.fixture(scope="module")
def model():
    return LongVITAForCausalLM.random(tiny(image_size=56, vocab_size=500), seed=2)


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [(0.7, 20, 0.8, 1.05), (1.3, 0, 0.5, 1.0),
                                                                (0.5, 3, 1.0, 1.2), (1.0, 50, 0.95, 0.9)])
def test_logits_processing_matches_hf(temperature, top_k, top_p, penalty):
    transformers = pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp

    logits = torch.randn(500) * 3
    seen = torch.randint(0, 500, (40,))
    cfg = GenerationConfig().updated(temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=penalty, do_sample=True)
    ours = process_logits(logits, seen, cfg)
    procs = [lp.RepetitionPenaltyLogitsProcessor(penalty), lp.TemperatureLogitsWarper(temperature)]
    if top_k:
        procs.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(lp.TopPLogitsWarper(top_p))
    theirs = logits[None].clone()
    for p in procs:
        theirs = p(seen[None], theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0]))
    finite = torch.isfinite(ours)
    torch.testing.assert_close(ours[finite], theirs[0][finite])


def test_greedy_matches_manual_argmax_loop(model):
    ids = torch.randint(0, 500, (1, 13))
    out = generate(model, ids, max_new_tokens=6, do_sample=False, repetition_penalty=1.0, eos_token_id=[-1])
    seq = ids
    manual = []
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[0, -1].argmax()
            manual.append(int(nxt))
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert out.sequences[0].tolist() == manual
    assert out.prompt_tokens == 13 and not out.stopped_on_eos


def test_greedy_matches_hf_generate_with_repetition_penalty(model):
    transformers = pytest.importorskip("transformers")
    t = model.config.text
    hf_cfg = transformers.Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                      intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                      num_attention_heads=t.num_attention_heads,
                                      num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                                      rope_theta=t.rope_theta, tie_word_embeddings=False)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("model.vision")},
                       strict=False)
    ids = torch.randint(0, 500, (1, 9))
    ours = generate(model, ids, max_new_tokens=8, do_sample=False, repetition_penalty=1.05, eos_token_id=[-1])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         repetition_penalty=1.05, eos_token_id=None, pad_token_id=0)
    assert ours.sequences[0].tolist() == theirs[0, 9:].tolist()


def test_stops_on_eos_and_respects_max_new_tokens(model):
    ids = torch.randint(0, 500, (1, 7))
    first = generate(model, ids, max_new_tokens=5, do_sample=False, eos_token_id=[-1]).sequences[0].tolist()
    stopped = generate(model, ids, max_new_tokens=5, do_sample=False, eos_token_id=[first[2]])
    assert stopped.sequences[0].tolist() == first[:first.index(first[2]) + 1] and stopped.stopped_on_eos
    assert generate(model, ids, max_new_tokens=0).sequences.shape == (1, 0)


def test_sampling_is_seeded_and_chunked_prefill_is_exact(model):
    ids = torch.randint(0, 500, (1, 23))
    a = generate(model, ids, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=11, eos_token_id=[-1])
    b = generate(model, ids, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=11, eos_token_id=[-1],
                 prefill_chunk_size=5)
    assert a.sequences.tolist() == b.sequences.tolist()


def test_bad_settings_raise():
    for bad in [dict(top_p=0.0), dict(temperature=-1.0), dict(top_k=-2), dict(max_new_tokens=-1)]:
        with pytest.raises(ValueError, match=list(bad)[0]):
            GenerationConfig().updated(**bad)
    with pytest.raises(ValueError, match="input_ids"):
        generate(None, torch.zeros(2, 3, dtype=torch.long) + 1)
