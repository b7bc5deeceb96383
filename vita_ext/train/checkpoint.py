"""Training checkpoints: the release layout (config.json, safetensors, tokenizer, generation config)
plus optimizer, scheduler, RNG states, data position and step -- written atomically.

A checkpoint is built in a hidden temporary directory next to its destination
(``OUT/.checkpoint-N.XXXX.tmp``), every file is flushed to disk, ``trainer_state.json`` (the manifest:
each file's size) is written last, and only then is the directory renamed to ``OUT/checkpoint-N`` (a
rename within one filesystem is atomic). A crash at any point before the rename leaves only the
temporary directory, which nothing loads and the next run deletes; a directory named checkpoint-N
whose manifest is missing or does not match its files is refused by ``validate``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
OPTIMIZER_PT = "optimizer.pt"
SCHEDULER_PT = "scheduler.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FORMAT = "vita_ext.train/1"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest(path: str) -> dict[str, int]:
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    return files


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    info: dict[str, Any] | None = None, keep_last: int = 0) -> str:
    """Write ``OUT/checkpoint-{step}`` atomically and return its path.

    state: picklable trainer state (data position, report, metrics) saved with the RNG states in
    trainer_state.pt; info: JSON-able facts (config) written into trainer_state.json. The model is
    saved in its own dtype (fp32 master weights: the resume is exact). keep_last > 0 deletes older
    checkpoints beyond the newest ``keep_last``.
    """
    from vita_ext.model.checkpoint import save_pretrained

    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=out_dir)
    try:
        save_pretrained(model, tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_PT))
        torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_PT))
        torch.save({"rng": rng_state(), **state}, os.path.join(tmp, STATE_PT))
        manifest = {"format": FORMAT, "step": step, "files": _manifest(tmp), **(info or {})}
        with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:  # last: marks completeness
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            trash = tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".old", dir=out_dir)
            os.rename(final, os.path.join(trash, "c"))
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete temporary directories left by a crash during a save; returns what was removed."""
    removed = []
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if name.startswith((".checkpoint-", ".final.")) and name.endswith((".tmp", ".old")):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def validate(path: str) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises ValueError naming what is missing or wrong."""
    state_json = os.path.join(path, STATE_JSON)
    if not os.path.isfile(state_json):
        raise ValueError(f"checkpoint {path!r} is incomplete: no {STATE_JSON} (a save was interrupted?)")
    try:
        with open(state_json, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {path!r}: {STATE_JSON} is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT or "files" not in manifest:
        raise ValueError(f"checkpoint {path!r}: {STATE_JSON} is not a {FORMAT} manifest")
    bad = []
    for name, size in manifest["files"].items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            bad.append(f"{name} missing")
        elif os.path.getsize(full) != size:
            bad.append(f"{name} has {os.path.getsize(full)} bytes, expected {size}")
    if bad:
        raise ValueError(f"checkpoint {path!r} is corrupt: " + "; ".join(bad))
    return manifest


def list_checkpoints(out_dir: str) -> list[str]:
    """checkpoint-N directories of out_dir (complete or not), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), os.path.join(out_dir, name)) for name in os.listdir(out_dir)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(out_dir, name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint in out_dir (incomplete ones are skipped), or None."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            validate(path)
        except ValueError:
            continue
        return path
    return None


def load_checkpoint_state(path: str, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG states from a complete checkpoint; returns
    the trainer state dict (with ``manifest``). Raises ValueError for an incomplete checkpoint."""
    from vita_ext.model.checkpoint import load_checkpoint

    manifest = validate(path)
    loaded = load_checkpoint(path, dtype=model.dtype, device=model.device)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER_PT), map_location=model.device,
                                         weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER_PT), weights_only=False))
    state = torch.load(os.path.join(path, STATE_PT), weights_only=False)
    set_rng_state(state.pop("rng"))
    state["manifest"] = manifest
    return state
