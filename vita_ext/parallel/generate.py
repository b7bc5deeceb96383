"""Context-parallel generation: zig-zag prefill with ring attention, then decode over the sharded cache.

Every rank runs this with the same inputs (as under ``torchrun``). Each rank embeds only its chunks,
encodes only the tiles whose CONTEXT positions fall in them, runs the decoder with ring attention and
keeps the K/V of its positions. The rank owning the last prompt position applies the LM head and
broadcasts each new token; all ranks then run the one-token step, attending to their own cache share.
"""
from __future__ import annotations

import datetime
import os
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from vita_ext.generation import GenerateOutput, GenerationConfig, _sync, attention_phases, peak_memory, sample_next
from vita_ext.ops.attention_dispatch import BACKEND_CALLS
from vita_ext.parallel.attention import RingPrefillAttention, ShardedDecodeAttention, ShardedKVCache
from vita_ext.parallel.ring import group_info
from vita_ext.parallel.sharding import ZigZagPlan

PAD_TOKEN_ID = 0  # any valid id: padding sits after the prompt, so no real position ever sees it


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Initialise the default process group from torchrun's environment (NCCL on GPUs, gloo on CPU),
    with a timeout so a failed rank cannot hang the others forever. Returns this rank's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--context-parallel needs torchrun's environment (RANK, WORLD_SIZE): run "
                         "`torchrun --nproc-per-node P -m vita_ext generate --context-parallel ...`")
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the default process group. Measured with gloo (torch 2.11
    and 2.14): when one rank destroys its group while a peer is still tearing down, the peer
    sometimes aborts ("terminate called without an active exception", SIGABRT) -- about 1 run in 7
    of an error path in test_parallel. A failed barrier means a peer is gone: nothing to wait for."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a dead peer; destroying the group is all that is left
        pass
    dist.destroy_process_group()


def agree(group, fn: Callable, *args, **kwargs):
    """Run ``fn`` on every rank; if it raises anywhere, raise on every rank with all ranks' messages
    (instead of leaving the healthy ranks blocked in the next collective)."""
    rank, world = group_info(group)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
    errors: list = [None] * world
    dist.all_gather_object(errors, error, group=group)
    failed = [e for e in errors if e]
    if failed:
        raise RuntimeError("context parallel failed: " + " | ".join(failed))
    return result


def check_consistent(model, input_ids: Tensor, group) -> None:
    """Every rank must run the same prompt on the same kind of device with the same dtype."""
    facts = (model.device.type, str(model.dtype), tuple(input_ids.shape), int(input_ids.sum()))
    everyone: list = [None] * group_info(group)[1]
    dist.all_gather_object(everyone, facts, group=group)
    if any(f != everyone[0] for f in everyone):
        desc = ", ".join(f"rank {r}: device {f[0]}, dtype {f[1]}, input_ids {f[2]}" for r, f in enumerate(everyone))
        raise ValueError(f"context parallel: ranks disagree on device/dtype/prompt ({desc})")


def _embed_local(model, plan: ZigZagPlan, rank: int, input_ids: Tensor, pixel_values: Tensor | None,
                 context_positions: Tensor | None) -> Tensor:
    ids = plan.shard(plan.pad(input_ids, PAD_TOKEN_ID), rank).to(model.device)
    embeds = model.model.embed_tokens(ids)
    if pixel_values is None or pixel_values.shape[0] == 0:
        return embeds
    tokens = model.config.num_image_tokens
    tile_ids, feature_rows, local_rows = plan.local_vision(context_positions.cpu(), tokens, rank)
    if tile_ids.numel():
        feats = model.encode_images(pixel_values[tile_ids]).reshape(-1, embeds.shape[-1])
        flat = embeds.view(-1, embeds.shape[-1])
        flat.index_copy_(0, local_rows.to(flat.device), feats[feature_rows.to(feats.device)].to(flat.dtype))
    return embeds


@torch.no_grad()
def cp_generate(model, input_ids: Tensor, pixel_values: Tensor | None = None, context_positions: Tensor | None = None,
                group=None, generation_config: GenerationConfig | None = None, seed: int | None = None,
                streamer: Callable[[int], None] | None = None, **overrides) -> GenerateOutput:
    """Generate with the prompt sharded over the ranks of ``group``; same arguments and result as
    ``vita_ext.generation.generate`` (greedy output is token-for-token the single-device one).

    Returns the same GenerateOutput on every rank; ``extra`` holds the per-rank cache rows and the
    number of prefill passes (always 1: the prompt is never re-run). The streamer is called on every rank.
    Raises RuntimeError (on every rank) for an uninitialised group or inconsistent ranks.
    """
    cfg = (generation_config or GenerationConfig()).updated(**overrides)
    rank, world = group_info(group)
    agree(group, check_consistent, model, input_ids, group)
    device, t = model.device, model.config.text
    s = input_ids.shape[1]
    plan = ZigZagPlan(s, world)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calls = [Counter(BACKEND_CALLS)]
    t0 = _sync(device)
    embeds = agree(group, _embed_local, model, plan, rank, input_ids, pixel_values, context_positions)
    t1 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    lengths = [int((plan.positions(r) < s).sum()) for r in range(world)]
    cache = ShardedKVCache(t.num_hidden_layers, 1, lengths[rank] + cfg.max_new_tokens, t.num_key_value_heads,
                           t.head_dim, model.dtype, device, lengths, rank)
    prefill = RingPrefillAttention(plan, group, cache)
    hidden = model.decode(embeds, plan.positions(rank)[None].to(device), prefill)
    head_rank = plan.owner(s - 1)
    last_row = torch.tensor([plan.local_index(s - 1)], device=device)
    logits = model.head(hidden[0], last_row)[0] if rank == head_rank else None
    t2 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    seen = input_ids[0].to(device)
    decode = ShardedDecodeAttention(cache, group)
    new: list[int] = []
    stopped = False
    while len(new) < cfg.max_new_tokens:
        token = torch.tensor([sample_next(logits, seen, cfg, generator) if rank == head_rank else 0], device=device)
        dist.broadcast(token, src=head_rank if group is None else dist.get_global_rank(group, head_rank), group=group)
        new.append(int(token))
        if streamer is not None:
            streamer(new[-1])
        if new[-1] in cfg.eos_token_id or len(new) == cfg.max_new_tokens:
            stopped = new[-1] in cfg.eos_token_id
            break
        seen = torch.cat([seen, token])
        position = torch.tensor([[s + len(new) - 1]], device=device)
        hidden = model.decode(model.model.embed_tokens(token[None]), position, decode)
        logits = model.head(hidden[0], torch.tensor([0], device=device))[0] if rank == head_rank else None
    t3 = _sync(device)
    calls.append(Counter(BACKEND_CALLS))
    return GenerateOutput(sequences=torch.tensor([new], dtype=torch.long), prompt_tokens=s, vision_seconds=t1 - t0,
                          prefill_seconds=t2 - t1, decode_seconds=t3 - t2, peak_memory_bytes=peak_memory(device),
                          stopped_on_eos=stopped,
                          extra={"cache_rows": list(cache.lengths), "prefill_passes": prefill.calls // max(1, t.num_hidden_layers),
                                 "world_size": world, "padded_len": plan.padded_len,
                                 "attention": attention_phases(calls)})
