"""The training loop: packed sequences -> masked cross-entropy -> AdamW with clipping and a cosine
schedule, checkpoints, metrics, and optional context parallelism.

Loss. Each micro-batch (one packed sequence) contributes the SUM of its token losses from
``masked_linear_cross_entropy`` (only supervised rows reach the vocabulary GEMM); the step's loss is
that sum over all micro-batches divided by the step's total supervised-token count. So every
supervised token weighs the same whatever sequence it was packed into, with or without accumulation
(a per-micro-batch mean would over-weight tokens of sparsely supervised sequences).

Context parallelism (stages 3-4; ``no-reset`` packing only). Every rank packs the same sequence, pads
it to a multiple of 2P and keeps its zig-zag chunks (``ZigZagPlan``): ids, global position ids and
the targets, which are shifted on the whole sequence before it is cut. Each rank encodes only the
tiles whose CONTEXT positions fall in its chunks, runs the decoder with ring attention (whose backward
sends the K/V gradients around the ring), and computes the loss sum of its rows divided by the global
supervised count. After the backward, gradients are summed over the ranks (one all-reduce of a flat
buffer), which gives exactly the single-process gradient; the logged loss is all-reduced too.

Frozen parts run under ``torch.no_grad`` (a frozen ViT also in eval mode), so they keep no
activations. ``dtype='bf16'`` runs the forward under bf16 autocast with fp32 master weights; the
attention backend receives q/k/v cast to bf16 and the projector and the cross-entropy run in bf16.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from vita_ext.model.language import LocalAttention
from vita_ext.ops import masked_linear_cross_entropy, pixel_shuffle_projector
from vita_ext.processing.prompt import IGNORE_INDEX
from vita_ext.train import checkpoint as ckpt
from vita_ext.train.config import TrainConfig
from vita_ext.train.data import JsonlDataset, scan
from vita_ext.train.packing import PAD_TOKEN_ID, PackedBatch, Packer
from vita_ext.train.stages import apply_trainable, lr_factor, param_groups

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "samples", "tokens_per_s",
                 "step_seconds", "elapsed_seconds", "epoch")


def no_autocast(device: torch.device):
    """Autocast off: the vita_ext ops get operands already cast to one dtype, and their C++ kernels'
    internal ATen calls must not be re-cast by autocast (they would mix fp32 and bf16)."""
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


def _requires_grad(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def count_steps(dataset: JsonlDataset, cfg: TrainConfig) -> int:
    """Optimizer steps of ``cfg.epochs`` epochs: one pass encodes every record (bad ones are
    reported), then the packer's next-fit is replayed on the lengths in each epoch's order."""
    good, lengths = scan(dataset, cfg.seq_len)
    if not good:
        raise ValueError(f"{dataset.path}: no usable training record ({dataset.report.summary(len(dataset))})")
    length_of = dict(zip(good, lengths))
    probe = Packer(dataset, cfg.seq_len, cfg.packing, cfg.seed, cfg.shuffle)
    full, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    sequences = 0
    for epoch in range(full + (1 if frac > 0 else 0)):
        n = 0
        used = 0
        for index in probe._make_order(epoch):
            if index not in length_of:
                continue
            if used and used + length_of[index] > cfg.seq_len:
                n, used = n + 1, 0
            used += length_of[index]
        n += 1 if used else 0
        sequences += n if epoch < full else math.ceil(frac * n)
    return max(1, math.ceil(sequences / cfg.grad_accum))


class Trainer:
    """Runs one stage. ``group``: the context-parallel process group (None = the default group when
    ``cfg.context_parallel``; ignored otherwise). ``log``: where one-line messages go (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, group=None, log: Callable[[str], None] | None = None):
        from vita_ext.model.long_vita import LongVITAForCausalLM
        from vita_ext.processing import LongVITAProcessor

        self.cfg = cfg.validate()
        self.cp = bool(cfg.context_parallel)
        if self.cp:
            if not dist.is_initialized():
                from vita_ext.parallel import init_distributed

                init_distributed()
            self.group = group
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        else:
            self.group, self.rank, self.world = None, 0, 1
            self.device = torch.device(cfg.device) if cfg.device else \
                torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.is_main = self.rank == 0
        self._log = log or (lambda msg: print(f"[vita-ext train] {msg}", file=sys.stderr, flush=True))
        self.amp_dtype = torch.bfloat16 if cfg.dtype == "bf16" else None

        self.model = LongVITAForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
        self.processor = LongVITAProcessor.from_pretrained(cfg.model)
        self.dataset = JsonlDataset(cfg.data, self.processor, cfg.max_frames, cfg.max_tiles, cfg.strict_labels)
        self.dataset.report.warn = self.is_main
        self.packer = Packer(self.dataset, cfg.seq_len, cfg.packing, cfg.seed, cfg.shuffle)

        self.trainable_counts = apply_trainable(self.model, cfg.trainable)
        self.model.train()
        self.vit_frozen = not _requires_grad(self.model.model.vision_model)
        if self.vit_frozen:
            self.model.model.vision_model.eval()
        self.model.model.gradient_checkpointing = cfg.recompute
        self.model.model.vision_model.gradient_checkpointing = cfg.recompute and not self.vit_frozen

        groups = param_groups(self.model, cfg.vit_lr_scale, cfg.vit_layer_decay)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"train: policy {cfg.trainable!r} leaves no trainable parameter")
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": cfg.lr * g["lr_scale"], "name": g["name"], "lr_scale": g["lr_scale"]}
             for g in groups], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else count_steps(self.dataset, cfg)
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg.warmup_ratio, min_ratio))
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------- forward
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _project(self, vit_hidden: Tensor) -> Tensor:
        """The projector with every operand in one dtype (the autocast dtype under bf16)."""
        proj = self.model.model.vision_projection
        ln, fc1, fc2 = proj.pre_proj_layernorm, proj.mlp[0], proj.mlp[2]
        dtype = self.amp_dtype or fc1.weight.dtype
        with no_autocast(self.device):
            return pixel_shuffle_projector(vit_hidden[:, 1:].to(dtype), ln.weight.to(dtype), ln.bias.to(dtype),
                                           fc1.weight.to(dtype), fc2.weight.to(dtype), ln.eps)

    def _vision_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [n, 3, s, s] -> [n, T, H] projector outputs (frozen parts without a graph).

        The ViT runs outside autocast (fp32): its attention calls ``attention_lse`` directly, whose
        operands autocast would leave in mixed dtypes (see ``CastAttention``)."""
        vit = self.model.model.vision_model
        pixel_values = pixel_values.to(device=self.device, dtype=torch.float32)
        if self.vit_frozen:
            with torch.no_grad(), no_autocast(self.device):
                step = self.cfg.vision_chunk_size
                hidden = torch.cat([vit(pixel_values[i:i + step]) for i in range(0, pixel_values.shape[0], step)])
        else:
            with no_autocast(self.device):
                hidden = vit(pixel_values)
        if not _requires_grad(self.model.model.vision_projection):
            with torch.no_grad():
                return self._project(hidden)
        return self._project(hidden)

    def _embed(self, ids: Tensor, pixel_values: Tensor, rows: Tensor, feature_rows: Tensor | None) -> Tensor:
        """Token embeddings [1, s, H] with the vision features written at local ``rows`` (out of place)."""
        embeds = self.model.model.embed_tokens(ids.to(self.device))
        if pixel_values.shape[0] == 0:
            return embeds
        feats = self._vision_features(pixel_values)
        flat_feats = feats.reshape(-1, embeds.shape[-1])
        if feature_rows is not None:
            flat_feats = flat_feats[feature_rows.to(self.device)]
        flat = embeds.reshape(-1, embeds.shape[-1])
        return flat.index_put((rows.to(self.device),), flat_feats.to(flat.dtype)).view_as(embeds)

    def loss_sum(self, batch: PackedBatch) -> Tensor:
        """Sum of the token losses of this rank's rows of one packed sequence (fp32 scalar)."""
        if self.cp:
            from vita_ext.parallel import RingPrefillAttention, ZigZagPlan

            plan = ZigZagPlan(batch.seq_len, self.world)
            ids = plan.shard(plan.pad(batch.input_ids, PAD_TOKEN_ID), self.rank)
            targets = plan.shard(plan.pad(batch.targets, IGNORE_INDEX), self.rank)
            positions = plan.positions(self.rank)[None]
            tokens = self.model.config.num_image_tokens
            tile_ids, feature_rows, rows = plan.local_vision(batch.context_positions, tokens, self.rank)
            pixel_values = batch.pixel_values[tile_ids]
            attention = RingPrefillAttention(plan, self.group)
        else:
            ids, targets, positions = batch.input_ids, batch.targets, batch.position_ids
            pixel_values, rows, feature_rows = batch.pixel_values, batch.context_positions, None
            cu = batch.cu_seqlens.to(self.device) if batch.cu_seqlens is not None else None
            attention = LocalAttention(cu_seqlens=cu)
        if self.amp_dtype is not None:
            attention = CastAttention(attention, self.amp_dtype)
        with self._autocast():
            embeds = self._embed(ids, pixel_values, rows, feature_rows)
            hidden = self.model.decode(embeds, positions.to(self.device), attention)[0]
            weight = self.model.lm_head.weight
            dtype = self.amp_dtype or weight.dtype
            with no_autocast(self.device):
                return masked_linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets[0].to(self.device),
                                                   IGNORE_INDEX, "sum")

    # ---------------------------------------------------------------------------------- step
    def _all_reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def train_step(self, batches: list[PackedBatch]) -> dict:
        """One optimizer step over ``batches`` (the accumulated micro-batches); returns its metrics."""
        t0 = time.perf_counter()
        supervised = sum(b.num_supervised for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            local = self.loss_sum(batch)
            (local / max(1, supervised)).backward()
            total += local.detach().double().cpu()
        if self.cp:
            dist.all_reduce(total, group=self.group)
            self._all_reduce_grads()
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        if supervised > 0:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        tokens = sum(b.num_tokens for b in batches)
        return {"step": self.step, "loss": float(total) / max(1, supervised), "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens, "supervised_tokens": supervised,
                "samples": sum(len(b.sample_indices) for b in batches), "tokens_per_s": tokens / max(seconds, 1e-9),
                "step_seconds": seconds, "elapsed_seconds": self.elapsed, "epoch": self.packer.epoch}

    # ---------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "packer": self.packer.state_dict(), "report": self.dataset.report.state_dict(),
                "elapsed": self.elapsed, "total_steps": self.total_steps}

    def save(self) -> str | None:
        path = None
        if self.is_main:
            info = {"config": self.cfg.to_dict(), "total_steps": self.total_steps,
                    "trainable_parameters": self.trainable_counts, "data": self.dataset.report.summary(len(self.dataset))}
            path = ckpt.save_checkpoint(self.cfg.out, self.step, self.model, self.optimizer, self.scheduler,
                                        self._trainer_state(), info, self.cfg.keep_last)
        if self.cp:
            dist.barrier(group=self.group)
        return path

    def resume(self, path: str) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, RNG, data position and step."""
        state = ckpt.load_checkpoint_state(path, self.model, self.optimizer, self.scheduler)
        saved = state["manifest"].get("config", {})
        changed = [k for k in ("seq_len", "grad_accum", "packing", "seed", "shuffle", "lr", "min_lr", "trainable",
                               "warmup_ratio", "data")
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        if changed and self.is_main:
            self._log(f"warning: resuming with changed setting(s) {changed}: the run will not match an "
                      "uninterrupted one")
        if state["total_steps"] != self.total_steps and self.is_main:
            self._log(f"warning: the checkpoint planned {state['total_steps']} steps, this run {self.total_steps}")
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.packer.load_state_dict(state["packer"])
        self.dataset.report.load_state_dict(state["report"])
        self._truncate_metrics()
        if self.is_main:
            self._log(f"resumed from {path} at step {self.step}")

    # -------------------------------------------------------------------------------- metrics
    def _metric_paths(self) -> tuple[str, str]:
        return os.path.join(self.cfg.out, "metrics.jsonl"), os.path.join(self.cfg.out, "metrics.csv")

    def _truncate_metrics(self) -> None:
        """Keep only the rows up to the resumed step, so the files hold one consistent curve."""
        if not self.is_main:
            return
        jsonl, csv_path = self._metric_paths()
        if not os.path.exists(jsonl):
            return
        with open(jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r["step"] <= self.step]
        self.history = rows
        with open(jsonl, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def _write_metrics(self, row: dict) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        jsonl, csv_path = self._metric_paths()
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)

    # ---------------------------------------------------------------------------------- train
    def describe(self) -> str:
        c = self.cfg
        counts = ", ".join(f"{k} {v:,}" for k, v in self.trainable_counts.items())
        return (f"stage {c.stage}: trainable {c.trainable} ({counts}); lr {c.lr:g} -> {c.min_lr:g}, "
                f"{self.total_steps} steps x {c.grad_accum} packed sequence(s) of {c.seq_len} tokens "
                f"({c.packing}), {c.dtype}, recompute {'on' if c.recompute else 'off'}"
                + (f", context parallel over {self.world} ranks" if self.cp else "") + f", device {self.device}")

    def train(self) -> dict:
        """Run to ``total_steps`` (resuming first if asked); returns a summary dict."""
        cfg = self.cfg
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            ckpt.remove_stale_temporaries(cfg.out)
        if self.cp:
            dist.barrier(group=self.group)
        if cfg.resume:
            path = ckpt.latest_checkpoint(cfg.out) if cfg.resume == "auto" else cfg.resume
            if path is None:
                if self.is_main:
                    self._log(f"--resume auto: no complete checkpoint in {cfg.out}; starting fresh")
            else:
                self.resume(path)
        elif self.is_main and os.path.exists(self._metric_paths()[0]):
            self._truncate_metrics()  # a fresh run over an old output directory: start the curve again
        if self.is_main:
            self._log(self.describe())
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                       dynamic_ncols=True)
        last_saved = None
        while self.step < self.total_steps:
            batches = [self.packer.next_batch() for _ in range(cfg.grad_accum)]
            row = self.train_step(batches)
            self._write_metrics(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                sup=row["supervised_tokens"], refresh=False)
                bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                last_saved = self.save()
        if bar is not None:
            bar.close()
        if last_saved is None or not last_saved.endswith(f"-{self.step}"):
            last_saved = self.save()
        final = self.save_final()
        summary = {"steps": self.step, "checkpoint": last_saved, "final": final,
                   "loss": self.history[-1]["loss"] if self.history else None,
                   "data": self.dataset.report.summary(len(self.dataset)),
                   "bad_records": dict(self.dataset.report.counts())}
        if self.is_main:
            self._log(summary["data"])
            self._log(f"done: {self.step} steps, final loss {summary['loss']}, model in {final}")
        return summary

    def save_final(self) -> str | None:
        """The release-layout model in ``save_dtype`` at OUT/final (written atomically too)."""
        path = os.path.join(self.cfg.out, "final")
        if self.is_main:
            from vita_ext.model.checkpoint import save_pretrained

            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.save_dtype]
            import copy
            import shutil
            import tempfile

            model = self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)
            tmp = tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=self.cfg.out)
            try:
                save_pretrained(model, tmp, generation_config=_generation_config(self.cfg.model))
                if os.path.exists(path):
                    shutil.rmtree(path)
                os.rename(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if self.cp:
            dist.barrier(group=self.group)
        return path


def _generation_config(model_dir: str) -> dict | None:
    """Carry the starting checkpoint's generation_config.json over to the trained model."""
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None
