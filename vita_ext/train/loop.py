"""The training loop: packed sequences -> loss (``step.PackedLoss``) -> AdamW with clipping and a
cosine schedule; checkpoints, metrics, a progress bar, and optional context parallelism.

One optimizer step takes ``grad_accum`` packed sequences. Each contributes the sum of its token
losses; the step's loss is the total over all of them (and over the context-parallel ranks) divided
by the step's supervised-token count, the right average under both accumulation and packing. With
context parallelism the gradients are summed over the ranks before clipping.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from vita_ext.train import checkpoint as ckpt
from vita_ext.train.config import TrainConfig
from vita_ext.train.data import JsonlDataset, scan
from vita_ext.train.packing import PackedBatch, Packer
from vita_ext.train.plot import read_metrics
from vita_ext.train.stages import apply_trainable, lr_factor, param_groups
from vita_ext.train.step import PackedLoss, all_reduce_grads, requires_grad

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "samples", "tokens_per_s",
                 "step_seconds", "elapsed_seconds", "epoch")


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
        from vita_ext.model.config import LongVITAConfig
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

        max_positions = LongVITAConfig.from_pretrained(cfg.model).text.max_position_embeddings
        if cfg.seq_len > max_positions:  # checked before the weights are read
            raise ValueError(f"train: 'seq_len' {cfg.seq_len} exceeds the model's max_position_embeddings "
                             f"{max_positions} ({cfg.model}/config.json)")
        self.model = LongVITAForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
        self.processor = LongVITAProcessor.from_pretrained(cfg.model)
        self.dataset = JsonlDataset(cfg.data, self.processor, cfg.max_frames, cfg.max_tiles, cfg.strict_labels)
        self.dataset.report.warn = self.is_main
        self.packer = Packer(self.dataset, cfg.seq_len, cfg.packing, cfg.seed, cfg.shuffle)

        self.trainable_counts = apply_trainable(self.model, cfg.trainable)
        self.model.train()
        self.vit_frozen = not requires_grad(self.model.model.vision_model)
        if self.vit_frozen:
            self.model.model.vision_model.eval()
        self.model.model.gradient_checkpointing = cfg.recompute
        self.model.model.vision_model.gradient_checkpointing = cfg.recompute and not self.vit_frozen

        groups = param_groups(self.model, cfg.vit_lr_scale, cfg.vit_layer_decay)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"train: policy {cfg.trainable!r} leaves no trainable parameter")
        # fused: one pass over each parameter per step instead of ~10 elementwise ops (the digits model's
        # 152K-token tied embedding is 9.7M of its 10M parameters: 64 -> 18 ms a step on one CPU thread, profiled)
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": cfg.lr * g["lr_scale"], "name": g["name"], "lr_scale": g["lr_scale"]}
             for g in groups], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay, fused=self.device.type in ("cpu", "cuda"))
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else count_steps(self.dataset, cfg)
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, cfg.warmup_ratio, min_ratio))
        self.loss_sum = PackedLoss(self.model, self.amp_dtype, self.cp, self.group, cfg.vision_chunk_size)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------- forward
    def accumulate(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Forward + backward of the micro-batches of one step, leaving the summed (and, with CP,
        all-reduced) gradients of (sum of token losses) / (supervised tokens of the step) in .grad.
        Returns (loss per supervised token, supervised tokens)."""
        supervised = sum(b.num_supervised for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        # Summed on the model's device and read once per step (not once per micro-batch: each read is a
        # host sync); NCCL reduces CUDA tensors only, so the CP all-reduce happens there too.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in batches:
            local = self.loss_sum(batch)
            if local.requires_grad:  # not when nothing trainable is in its graph (text only, projector stage)
                (local / max(1, supervised)).backward()
            total += local.detach().double()
        if self.cp:
            dist.all_reduce(total, group=self.group)
            all_reduce_grads(self.params, self.group)
        return float(total) / max(1, supervised), supervised

    def train_step(self, batches: list[PackedBatch]) -> dict:
        """One optimizer step over ``batches`` (the accumulated micro-batches); returns its metrics."""
        t0 = time.perf_counter()
        loss, supervised = self.accumulate(batches)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        if supervised > 0:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        tokens = sum(b.num_tokens for b in batches)
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "supervised_tokens": supervised, "samples": sum(len(b.sample_indices) for b in batches),
                "tokens_per_s": tokens / max(seconds, 1e-9), "step_seconds": seconds,
                "elapsed_seconds": self.elapsed, "epoch": self.packer.epoch}

    # ---------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "packer": self.packer.state_dict(), "report": self.dataset.report.state_dict(),
                "elapsed": self.elapsed, "total_steps": self.total_steps}

    def save(self) -> str | None:
        path = None
        if self.is_main:
            self._sync_metrics()
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
        """Keep only the rows up to the current step (0 for a fresh run), so the files hold one
        consistent curve; rewritten atomically. A torn last line (a kill during the append) is dropped."""
        if not self.is_main:
            return
        jsonl, csv_path = self._metric_paths()
        rows = read_metrics(jsonl) if os.path.exists(jsonl) else []
        self.history = [r for r in rows if r["step"] <= self.step]
        for path, write in ((jsonl, self._write_jsonl), (csv_path, self._write_csv)):
            if not os.path.exists(path) and not self.history:
                continue
            tmp = path + ".tmp"
            with open(tmp, "w", newline="" if path == csv_path else None, encoding="utf-8") as f:
                write(f, self.history)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    @staticmethod
    def _write_jsonl(f, rows) -> None:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    @staticmethod
    def _write_csv(f, rows) -> None:
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

    def _sync_metrics(self) -> None:
        """Flush the metric files to disk before a checkpoint records that their rows exist."""
        if self.is_main:
            for path in self._metric_paths():
                if os.path.exists(path):
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())

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
            ckpt.recover(cfg.out)
        if self.cp:
            dist.barrier(group=self.group)
        resumed = None
        if cfg.resume:
            resumed = ckpt.latest_checkpoint(cfg.out, warn=self.is_main) if cfg.resume == "auto" else cfg.resume
            if resumed is None:
                if self.is_main:
                    self._log(f"--resume auto: no complete checkpoint in {cfg.out}; starting fresh")
            else:
                self.resume(resumed)
        if resumed is None:
            self._truncate_metrics()  # a fresh run over an old output directory: start the curve again
        if self.is_main:
            self._log(self.describe())
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"stage {cfg.stage}", unit="step",
                       dynamic_ncols=True)
        # a run resumed at its end keeps the checkpoint it resumed from (saving it again gains nothing)
        here = os.path.join(cfg.out, f"checkpoint-{self.step}")
        last_saved = resumed if resumed is not None and self.step >= self.total_steps and \
            os.path.abspath(resumed) == os.path.abspath(here) else None
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
                save_pretrained(model, tmp, generation_config=_generation_config(self.cfg.model),
                                processor_config=_side_json(self.cfg.model, "processor_config.json"))
                ckpt._fsync_tree(tmp)
                ckpt.install(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if self.cp:
            dist.barrier(group=self.group)
        return path


def _generation_config(model_dir: str) -> dict | None:
    """Carry the starting checkpoint's generation_config.json over to the trained model."""
    return _side_json(model_dir, "generation_config.json")


def _side_json(model_dir: str, name: str) -> dict | None:
    """A JSON side file of the starting checkpoint (generation / processor config), carried over."""
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None
