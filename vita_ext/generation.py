"""Sampling and the decode loop: prefill (chunked, KV cache) -> masked LM head at the last position ->
sample -> one-token decode steps until an end token or max_new_tokens.

Logits processing follows HF transformers' order and semantics: repetition penalty over every id seen
(prompt included), then temperature, top-k, top-p, then multinomial sampling; temperature 0 or
do_sample=False is greedy (argmax after the repetition penalty).
Source: HF ``GenerationMixin`` (RepetitionPenalty / Temperature / TopK / TopP logits processors);
Long-VITA ``generation_config.json`` defaults.
"""
from __future__ import annotations

import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from vita_ext._json import read_json
from vita_ext.model.language import LocalAttention
from vita_ext.ops.attention_dispatch import BACKEND_CALLS, backends_between


@dataclass
class GenerationConfig:
    """Decoding settings. Defaults are Long-VITA's ``generation_config.json``."""
    max_new_tokens: int = 1024
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.05
    eos_token_id: tuple[int, ...] = (151645, 151643)
    prefill_chunk_size: int = 16384

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None) -> GenerationConfig:
        """Read ``generation_config.json`` from a checkpoint dir; fields it lacks keep their defaults."""
        cfg = cls()
        file = os.path.join(os.fspath(path), "generation_config.json") if path is not None else None
        if file and os.path.exists(file):
            data = read_json(file)
            if not isinstance(data, dict):
                raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
            try:
                cfg = cfg.updated(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{file}: {exc}") from None
        return cfg

    def updated(self, **overrides) -> GenerationConfig:
        """A copy with the non-None overrides applied (eos ids normalised to a tuple)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        eos = values["eos_token_id"]
        values["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        cfg = GenerationConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool}.get(str(f.type))
            if want is not None and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
                raise ValueError(f"generation: '{f.name}' must be {str(f.type)}, got {value!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.eos_token_id):
            raise ValueError(f"generation: 'eos_token_id' must be integers, got {self.eos_token_id!r}")
        checks = [("max_new_tokens", self.max_new_tokens >= 0, ">= 0"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("prefill_chunk_size", self.prefill_chunk_size > 0, "> 0")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"generation: '{name}' must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def process_logits(logits: Tensor, seen_ids: Tensor, cfg: GenerationConfig) -> Tensor:
    """Apply repetition penalty (and, when sampling, temperature/top-k/top-p) to fp32 logits [V]."""
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and seen_ids.numel():
        score = logits.gather(0, seen_ids)
        logits.scatter_(0, seen_ids, torch.where(score < 0, score * cfg.repetition_penalty,
                                                 score / cfg.repetition_penalty))
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - cfg.top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def sample_next(logits: Tensor, seen_ids: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token id from last-position logits [V] given every id seen so far [n]."""
    scores = process_logits(logits, seen_ids, cfg)
    if cfg.greedy:
        return int(scores.argmax())
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class GenerateOutput:
    """sequences: new token ids [1, N] (no prompt); timings in seconds; peak memory in bytes."""
    sequences: Tensor
    prompt_tokens: int = 0
    vision_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_memory_bytes: int = 0
    stopped_on_eos: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.sequences.shape[1] - 1  # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory(device: torch.device) -> int:
    """Peak allocated device memory (CUDA) or the process's peak resident set size (CPU), in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_context_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise ValueError when the prompt plus the new tokens exceed the model's max_position_embeddings
    (positions past it were never trained, and the KV cache is sized for both)."""
    limit = model.config.text.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"generate: the prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceed "
                         f"the model's max_position_embeddings ({limit})")


@torch.no_grad()
def generate(model, input_ids: Tensor, pixel_values: Tensor | None = None, context_positions: Tensor | None = None,
             generation_config: GenerationConfig | None = None, seed: int | None = None,
             streamer: Callable[[int], None] | None = None, progress: bool = False, **overrides) -> GenerateOutput:
    """Generate a continuation of one prompt with a KV cache.

    Args:
        model: a ``LongVITAForCausalLM``.
        input_ids: [1, S] int64 prompt (from ``LongVITAProcessor``).
        pixel_values, context_positions: the prompt's vision tiles and their CONTEXT positions.
        generation_config: defaults (e.g. ``GenerationConfig.from_pretrained(path)``); keyword overrides
            (max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, eos_token_id,
            prefill_chunk_size) win over it. temperature=0 means greedy.
        seed: seeds the sampler (a private generator: the global RNG is untouched).
        streamer: called with each new token id as soon as it is chosen.
        progress: show a progress bar while encoding tiles.
    Returns:
        GenerateOutput with the new ids [1, N] (the end token included when one was produced), timings
        and peak memory.
    Raises:
        ValueError for a batch other than 1, bad sampling settings, or a prompt + max_new_tokens longer
        than the model's max_position_embeddings.
    """
    cfg = (generation_config or GenerationConfig()).updated(**overrides)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate: 'input_ids' must be [1, S], got shape {tuple(input_ids.shape)}")
    check_context_length(model, input_ids.shape[1], cfg.max_new_tokens)
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    input_ids = input_ids.to(device)
    calls = [Counter(BACKEND_CALLS)]
    t0 = _sync(device)
    embeds = model.embed(input_ids, pixel_values, context_positions, progress=progress)
    t1 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    s = input_ids.shape[1]
    cache = model.new_cache(1, s + cfg.max_new_tokens)
    attention = LocalAttention(cache)
    for start in range(0, s, cfg.prefill_chunk_size):  # chunks bound the MLP activations of long prompts
        chunk = embeds[:, start:start + cfg.prefill_chunk_size]
        positions = torch.arange(start, start + chunk.shape[1], device=device)[None]
        hidden = model.decode(chunk, positions, attention)
    del embeds
    logits = model.head(hidden[0], torch.tensor([hidden.shape[1] - 1], device=device))[0]
    t2 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    seen = input_ids[0].clone()
    first_row = torch.zeros(1, dtype=torch.long, device=device)  # made once: no host-to-device copy per step
    new: list[int] = []
    stopped = False
    while len(new) < cfg.max_new_tokens:
        token = sample_next(logits, seen, cfg, generator)
        new.append(token)
        if streamer is not None:
            streamer(token)
        if token in cfg.eos_token_id:
            stopped = True
            break
        if len(new) == cfg.max_new_tokens:
            break
        token_t = torch.tensor([[token]], device=device)
        seen = torch.cat([seen, token_t[0]])
        hidden = model.decode(model.model.embed_tokens(token_t), torch.tensor([[cache.length]], device=device),
                              attention)
        logits = model.head(hidden[0], first_row)[0]
    t3 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    return GenerateOutput(sequences=torch.tensor([new], dtype=torch.long), prompt_tokens=s, vision_seconds=t1 - t0,
                          prefill_seconds=t2 - t1, decode_seconds=t3 - t2, peak_memory_bytes=peak_memory(device),
                          stopped_on_eos=stopped, extra={"attention": attention_phases(calls)})


def attention_phases(calls: list[Counter]) -> dict[str, str]:
    """{"vision", "prefill", "decode"} -> the attention backends that served each phase, from snapshots of
    BACKEND_CALLS taken at the phase boundaries."""
    return {phase: backends_between(before, after) for phase, before, after in zip(("vision", "prefill", "decode"), calls, calls[1:])}
