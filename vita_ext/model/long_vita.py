"""Long-VITA: InternViT tiles -> pixel-shuffle projector -> embeddings scattered over CONTEXT tokens -> Qwen2.

Shapes (Long-VITA-14B): pixel_values [tiles, 3, 448, 448] -> ViT [tiles, 1025, 1024] -> projector
[tiles, 256, 5120] -> written over the rows of ``embed_tokens(input_ids)`` [1, S, 5120] at
``context_positions`` -> 48 decoder layers -> final norm -> ``masked_lm_head`` on the rows that need
logits only. Parameter names match the HF-format release (``model.*``, ``lm_head.weight``).
Source: Long-VITA (arXiv 2502.05177).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vita_ext.generation import generate
from vita_ext.model.config import LongVITAConfig
from vita_ext.model.language import AttentionBackend, DecoderLayer, KVCache, LocalAttention, RMSNorm, RotaryEmbedding
from vita_ext.model.shards import checkpoint_files, describe_names, random_tensor, read_tensors
from vita_ext.model.vision import InternVisionModel, VisionProjection
from vita_ext.ops import masked_linear_cross_entropy, masked_lm_head

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """loss: fp32 scalar (when labels are given); logits: [B, K, V] for the kept positions (or None);
    past_key_values: the KV cache (when one was used)."""
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: KVCache | None = None


class LongVITAModel(nn.Module):
    def __init__(self, cfg: LongVITAConfig):
        super().__init__()
        t = cfg.text
        self.vision_model = InternVisionModel(cfg.vision)
        self.vision_projection = VisionProjection(cfg)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(t.head_dim, t.rope_theta)
        self.gradient_checkpointing = False


class LongVITAForCausalLM(nn.Module):
    """The Long-VITA model with a Hugging-Face-like interface (``from_pretrained``, ``forward``, ``generate``)."""

    def __init__(self, config: LongVITAConfig):
        super().__init__()
        self.config = config
        self.model = LongVITAModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> LongVITAForCausalLM:
        """Load a release-layout checkpoint (config.json + safetensors shards + index json).

        Each tensor is read straight to ``device`` and cast to ``dtype`` (default: as stored); the
        model is built on the meta device first, so no second full copy exists.
        Raises FileNotFoundError (missing config/shard) and ValueError (missing/unexpected keys,
        shape mismatches), each listing what is wrong.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        config = LongVITAConfig.from_pretrained(path)
        files = checkpoint_files(path)
        with torch.device("meta"):
            model = cls(config)
        expected = _stored_shapes(model)
        missing, unexpected = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
        if missing or unexpected:
            parts = ([f"missing keys: {describe_names(missing)}"] if missing else []) + \
                    ([f"unexpected keys: {describe_names(unexpected)}"] if unexpected else [])
            raise ValueError(f"checkpoint {path!r} does not match its config.json: " + "; ".join(parts))
        device = torch.device(device)
        bad = []
        for name, tensor in read_tensors(files, list(expected), str(device), dtype):
            if tuple(tensor.shape) != expected[name]:
                bad.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {expected[name]}")
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))
        if bad:
            raise ValueError(f"checkpoint {path!r}: shape mismatch for {len(bad)} tensor(s): " + "; ".join(bad[:12]))
        model.reset_buffers(device)
        return model.eval()

    @classmethod
    def random(cls, config: LongVITAConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LongVITAForCausalLM:
        """A model with seeded random weights (the same values ``write_random_checkpoint`` writes)."""
        with torch.device("meta"):
            model = cls(config)
        state = {name: random_tensor(name, tuple(p.shape), seed).to(device=device, dtype=dtype)
                 for name, p in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        model.reset_buffers(device)
        return model.eval()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (RoPE frequencies) and re-tie weights after meta init."""
        self.model.rotary_emb.reset_parameters(device if device is not None else self.device)
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.config.text
        return KVCache(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------------------------- vision
    def encode_images(self, pixel_values: Tensor, chunk_size: int = 32, progress: bool = False) -> Tensor:
        """pixel_values [tiles, 3, s, s] (any device) -> projector outputs [tiles, T, H] on the model's device.

        Tiles go through the ViT ``chunk_size`` at a time, so thousands of frames never hold ViT
        activations at once.
        """
        chunks = [self._encode_chunk(pixel_values[i:i + chunk_size]) for i in
                  _progress(range(0, pixel_values.shape[0], chunk_size), progress, "encoding tiles", chunk_size,
                            pixel_values.shape[0])]
        if not chunks:
            return pixel_values.new_empty((0, self.config.num_image_tokens, self.config.text.hidden_size),
                                          dtype=self.dtype, device=self.device)
        return torch.cat(chunks)

    def _encode_chunk(self, pixel_values: Tensor) -> Tensor:
        vit = self.model.vision_model(pixel_values.to(device=self.device, dtype=self.dtype))
        return self.model.vision_projection(vit)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, context_positions: Tensor | None = None,
              vision_chunk_size: int = 32, progress: bool = False) -> Tensor:
        """input_ids [B, S] -> inputs_embeds [B, S, H] with vision features written over the CONTEXT tokens.

        context_positions [tiles * T] index the flattened [B * S] sequence (B = 1 for a prompt); tile k
        of pixel_values fills context_positions[k*T:(k+1)*T]. Without grad, features are written chunk by
        chunk in place (no [tiles, T, H] buffer for long videos).
        """
        embeds = self.model.embed_tokens(input_ids)
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        n_pos = 0 if context_positions is None else context_positions.numel()
        tokens = self.config.num_image_tokens
        if n_pos != n_tiles * tokens:
            raise ValueError(f"LongVITAForCausalLM: 'context_positions' must hold {tokens} positions per tile "
                             f"({n_tiles} tiles -> {n_tiles * tokens}), got {n_pos}")
        if n_tiles == 0:
            return embeds
        flat = embeds.view(-1, embeds.shape[-1])
        positions = context_positions.to(device=flat.device, dtype=torch.long)
        if torch.is_grad_enabled():  # autograd-friendly: one out-of-place scatter
            feats = self.encode_images(pixel_values, vision_chunk_size, progress)
            return flat.index_put((positions,), feats.reshape(-1, flat.shape[-1]).to(flat.dtype)).view_as(embeds)
        for start in _progress(range(0, n_tiles, vision_chunk_size), progress, "encoding tiles", vision_chunk_size,
                               n_tiles):
            feats = self._encode_chunk(pixel_values[start:start + vision_chunk_size])
            rows = positions[start * tokens:(start + feats.shape[0]) * tokens]
            flat.index_copy_(0, rows, feats.reshape(-1, flat.shape[-1]).to(flat.dtype))
        return embeds

    # ---------------------------------------------------------------------------------- language
    def decode(self, inputs_embeds: Tensor, position_ids: Tensor, attention: AttentionBackend) -> Tensor:
        """Decoder layers + final norm: [B, S, H] at ``position_ids`` [B, S] -> normed hidden states [B, S, H]."""
        cos, sin = self.model.rotary_emb(position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.model.layers:
            if self.model.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, attention, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attention)
        attention.advance(inputs_embeds.shape[1])
        return self.model.norm(h)

    def head(self, hidden_states: Tensor, positions: Tensor) -> Tensor:
        """Logits of selected rows of the flattened hidden states [T, H] -> [K, V] (``masked_lm_head``)."""
        return masked_lm_head(hidden_states, self.lm_head.weight, positions)

    def loss(self, hidden_states: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token cross-entropy: hidden [B, S, H], labels [B, S] (unshifted, -100 = unsupervised)."""
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        return masked_linear_cross_entropy(hidden_states.reshape(-1, hidden_states.shape[-1]), self.lm_head.weight,
                                           shifted.reshape(-1), IGNORE_INDEX, reduction)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                context_positions: Tensor | None = None, position_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: Tensor | None = None, logits_to_keep: int | Tensor = 0, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, attention: AttentionBackend | None = None) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: [B, S] int64 (or give inputs_embeds [B, S, H]).
            pixel_values, context_positions: vision tiles and where their features go (see ``embed``).
            position_ids: [B, S] RoPE positions (default: continuing after the cache).
            past_key_values / use_cache: a ``KVCache`` to extend (one is made when use_cache and none is given).
            labels: [B, S] int64, unshifted (HF convention), -100 where unsupervised -> ``loss`` via
                ``masked_linear_cross_entropy`` (mean over supervised tokens); logits are then skipped unless
                logits_to_keep asks for them.
            logits_to_keep: 0 = every position, k > 0 = the last k, or a 1-D tensor of positions (HF convention).
            cu_seqlens: packed-sequence boundaries (B = 1) -> block-diagonal causal attention; max_seqlen: the
                longest packed sequence (lets the boundaries stay on the device, see ``LocalAttention``).
            attention: an attention backend (default ``LocalAttention``); ring attention plugs in here.
        Returns:
            CausalLMOutput(loss, logits [B, K, V] in the model dtype, past_key_values).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, context_positions)
        b, s, _ = inputs_embeds.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = self.new_cache(b, s)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, s)
        attention = attention if attention is not None else LocalAttention(cache, cu_seqlens, max_seqlen)
        hidden = self.decode(inputs_embeds, position_ids, attention)
        loss = self.loss(hidden, labels) if labels is not None else None
        logits = None
        keep_given = not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        if labels is None or keep_given:
            if isinstance(logits_to_keep, int):
                keep = torch.arange(s - logits_to_keep if logits_to_keep else 0, s, device=hidden.device)
            else:
                keep = logits_to_keep.to(device=hidden.device, dtype=torch.long)
            rows = (torch.arange(b, device=hidden.device)[:, None] * s + keep[None, :]).reshape(-1)
            logits = self.head(hidden.reshape(b * s, -1), rows).view(b, keep.numel(), -1)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=cache)

    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None, context_positions: Tensor | None = None,
                 **kwargs) -> Tensor:
        """Generate continuations; see ``vita_ext.generation.generate`` for the arguments. Returns
        the new token ids [1, N] (without the prompt)."""
        return generate(self, input_ids, pixel_values=pixel_values, context_positions=context_positions,
                        **kwargs).sequences


def parameter_shapes(config: LongVITAConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the release layout with its shape, from the config alone (meta device;
    a tied lm_head.weight is not stored)."""
    with torch.device("meta"):
        return _stored_shapes(LongVITAForCausalLM(config))


def _stored_shapes(model: LongVITAForCausalLM) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _progress(iterable, enabled: bool, desc: str, step: int, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tile", leave=False)

    def gen():
        for x in iterable:
            yield x
            bar.update(min(step, total - bar.n))
        bar.close()

    return gen()
