"""The loss of one packed sequence, on one device or zig-zag-sharded over a context-parallel group.

Loss. ``PackedLoss(batch)`` returns the SUM of the token losses of the rows this rank holds, from
``masked_linear_cross_entropy`` (only supervised rows reach the vocabulary GEMM). The trainer divides
by the step's total supervised-token count (all accumulated micro-batches, all ranks), so every
supervised token weighs the same whatever sequence it was packed into (a per-micro-batch mean would
over-weight the tokens of sparsely supervised sequences).

Context parallelism (``no-reset`` packing). Every rank holds the same packed sequence, pads it to a
multiple of 2P and keeps its zig-zag chunks (``ZigZagPlan``): ids, global position ids and the
targets, which were shifted on the whole sequence before it is cut (``PackedBatch.targets``). Each
rank encodes only the tiles whose CONTEXT positions fall in its chunks, runs the decoder with ring
attention (its backward sends the K/V gradients around the ring) and returns the loss sum of its
rows. ``all_reduce_grads`` then sums the gradients over the ranks (one flat all-reduce; parameters a
rank did not touch, e.g. the projector on a rank without tiles, contribute zeros), which gives the
single-process gradient exactly, up to summation order.

Frozen parts run under ``torch.no_grad`` (a frozen ViT in eval mode too), so they keep no
activations, and their frozen-ness reaches the ops through ``requires_grad``: a frozen ViT's output
does not require grad, so the projector's backward computes no dx; a frozen LM head gets no dW from
the cross-entropy (stage 1). The cross-entropy takes the supervised-token count from the host (the
packed targets live there), so it reads nothing back from the device, and it forms its gradients in
the forward pass (``grad_in_forward``: the trainer backpropagates each loss once), which saves the
recomputation of the logits. With ``amp_dtype`` (bf16) the decoder runs under autocast with fp32 master weights; the
vita_ext ops the trainer calls itself (projector, attention, cross-entropy) get operands cast to
bf16 explicitly and run with autocast off: the CPU projector kernel's own ATen calls must not be
re-cast by autocast (it fails with mixed fp32/bf16 operands otherwise).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

from vita_ext.model.language import LocalAttention
from vita_ext.ops import masked_linear_cross_entropy, pixel_shuffle_projector
from vita_ext.processing.prompt import IGNORE_INDEX
from vita_ext.train.packing import PAD_TOKEN_ID, PackedBatch


def no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class CastAttention:
    """Wraps an attention backend so that q, k, v reach it in one dtype (autocast leaves the rotated
    q/k in the residual dtype and v in the autocast dtype), with autocast off inside."""

    def __init__(self, inner, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with no_autocast(q.device):
            return self.inner(layer_idx, q.to(self.dtype), k.to(self.dtype), v.to(self.dtype))

    def advance(self, n: int) -> None:
        self.inner.advance(n)


def requires_grad(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class PackedLoss:
    """Callable: PackedBatch -> fp32 scalar, the sum of this rank's token losses (see the module doc).

    model: a LongVITAForCausalLM whose trainable parameters are already chosen; amp_dtype: None (fp32)
    or torch.bfloat16; context_parallel: shard over ``group`` (torch.distributed must be initialised);
    vision_chunk_size: tiles per forward of a frozen ViT; grad_in_forward: the cross-entropy forms its
    gradients in the forward pass, the right choice when each loss is backpropagated once, as the
    trainer does (False: it recomputes the logits in the backward instead).
    """

    def __init__(self, model, amp_dtype: torch.dtype | None = None, context_parallel: bool = False, group=None,
                 vision_chunk_size: int = 32, grad_in_forward: bool = True):
        self.model, self.amp_dtype, self.cp, self.group = model, amp_dtype, context_parallel, group
        self.vision_chunk_size, self.grad_in_forward = vision_chunk_size, grad_in_forward
        self.rank, self.world = (dist.get_rank(group), dist.get_world_size(group)) if context_parallel else (0, 1)
        # the zig-zag padding sits after every real token (never seen by one): any valid id will do
        self.pad_id = PAD_TOKEN_ID if PAD_TOKEN_ID < model.config.text.vocab_size else 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _project(self, vit_hidden: Tensor) -> Tensor:
        proj = self.model.model.vision_projection
        ln, fc1, fc2 = proj.pre_proj_layernorm, proj.mlp[0], proj.mlp[2]
        dtype = self.amp_dtype or fc1.weight.dtype
        with no_autocast(self.device):
            return pixel_shuffle_projector(vit_hidden[:, 1:].to(dtype), ln.weight.to(dtype), ln.bias.to(dtype),
                                           fc1.weight.to(dtype), fc2.weight.to(dtype), ln.eps)

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [n, 3, s, s] -> [n, T, H] projector outputs (frozen parts keep no graph)."""
        vit = self.model.model.vision_model
        pixel_values = pixel_values.to(device=self.device, dtype=torch.float32)
        if not requires_grad(vit):
            vit.eval()
            with torch.no_grad():
                step = self.vision_chunk_size
                hidden = torch.cat([vit(pixel_values[i:i + step]) for i in range(0, pixel_values.shape[0], step)])
        else:
            hidden = vit(pixel_values)
        if not requires_grad(self.model.model.vision_projection):
            with torch.no_grad():
                return self._project(hidden)
        return self._project(hidden)

    def embed(self, ids: Tensor, pixel_values: Tensor, rows: Tensor, feature_rows: Tensor | None = None) -> Tensor:
        """Token embeddings [1, s, H] with the vision features written at ``rows`` (out of place);
        feature_rows selects which rows of the flattened features go there (CP: the local ones)."""
        embeds = self.model.model.embed_tokens(ids.to(self.device))
        if pixel_values.shape[0] == 0:
            return embeds
        flat_feats = self.vision_features(pixel_values).reshape(-1, embeds.shape[-1])
        if feature_rows is not None:
            flat_feats = flat_feats[feature_rows.to(self.device)]
        flat = embeds.reshape(-1, embeds.shape[-1])
        return flat.index_put((rows.to(self.device),), flat_feats.to(flat.dtype)).view_as(embeds)

    def local_inputs(self, batch: PackedBatch):
        """(ids, targets, position_ids, pixel_values, rows, feature_rows, attention) of this rank."""
        if not self.cp:
            cu = batch.cu_seqlens.to(self.device) if batch.cu_seqlens is not None else None
            return (batch.input_ids, batch.targets, batch.position_ids, batch.pixel_values, batch.context_positions,
                    None, LocalAttention(cu_seqlens=cu, max_seqlen=batch.max_seqlen))
        from vita_ext.parallel import RingPrefillAttention, ZigZagPlan

        if batch.cu_seqlens is not None:
            raise ValueError("context parallelism needs no-reset packing (ring attention has no cu_seqlens)")
        plan = ZigZagPlan(batch.seq_len, self.world)
        ids = plan.shard(plan.pad(batch.input_ids, self.pad_id), self.rank)
        targets = plan.shard(plan.pad(batch.targets, IGNORE_INDEX), self.rank)
        positions = plan.positions(self.rank)[None]
        tile_ids, feature_rows, rows = plan.local_vision(batch.context_positions, self.model.config.num_image_tokens,
                                                         self.rank)
        return (ids, targets, positions, batch.pixel_values[tile_ids], rows, feature_rows,
                RingPrefillAttention(plan, self.group))

    def __call__(self, batch: PackedBatch) -> Tensor:
        ids, targets, positions, pixel_values, rows, feature_rows, attention = self.local_inputs(batch)
        if self.amp_dtype is not None:
            attention = CastAttention(attention, self.amp_dtype)
        with self._autocast():
            embeds = self.embed(ids, pixel_values, rows, feature_rows)
            hidden = self.model.decode(embeds, positions.to(self.device), attention)[0]
        weight = self.model.lm_head.weight
        dtype = self.amp_dtype or weight.dtype
        labels = targets[0]
        # Counted on the host, where the packer built the targets (no device read in the op).
        count = int((labels != IGNORE_INDEX).sum()) if labels.device.type == "cpu" else None
        with no_autocast(self.device):
            return masked_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), labels.to(self.device),
                                               IGNORE_INDEX, "sum", num_supervised=count,
                                               grad_in_forward=self.grad_in_forward)


def all_reduce_grads(params: list[torch.nn.Parameter], group=None) -> None:
    """Sum the gradients of ``params`` over ``group`` with one flat fp32 all-reduce (None -> zeros)."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
