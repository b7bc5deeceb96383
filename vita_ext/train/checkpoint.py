"""Training checkpoints: the release layout (config.json, safetensors, tokenizer, generation config)
plus optimizer, scheduler, RNG states, data position and step -- written atomically, loaded safely.

Saving: a checkpoint is built in a hidden temporary directory next to its destination
(``OUT/.checkpoint-N.XXXX.tmp``), every file is flushed to disk, ``trainer_state.json`` (the manifest:
each file's size) is written last, and only then is the directory renamed to ``OUT/checkpoint-N`` (a
rename within one filesystem is atomic). Saving step N again (resuming from an older checkpoint)
first renames the existing ``checkpoint-N`` to ``OUT/.checkpoint-N.XXXX.old/c``, then renames the
new one in, then deletes the old. Pruning (``keep_last``) renames a checkpoint to a ``.del`` name
before deleting it, so a half-deleted directory never looks like a checkpoint.

Recovery (``recover``, run when training starts): a process killed at any point leaves at least one
complete copy of every checkpoint it had -- under its name, or in a ``.tmp`` (complete once its
manifest exists) or ``.old`` directory. Where ``checkpoint-N`` is missing, the newest complete copy
is renamed back into place (the ``.tmp``, else the ``.old``); what is left is deleted. A directory
named checkpoint-N whose manifest is missing or does not match its files is refused by ``validate``.

Loading never unpickles: ``optimizer.pt``, ``scheduler.pt`` and ``trainer_state.pt`` hold only tensors
and plain Python values and are read with ``torch.load(weights_only=True)`` (the RNG states are
stored as tensors and tuples of ints), so a crafted checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
OPTIMIZER_PT = "optimizer.pt"
SCHEDULER_PT = "scheduler.pt"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# hidden directories of the save protocol: .checkpoint-N.XXXX.{tmp,old,del} and .final.XXXX.{tmp,old}
_TEMP_RE = re.compile(r"^\.(checkpoint-(\d+)|final)\.[^.]+\.(tmp|old|del)$")
FORMAT = "vita_ext.train/2"  # /2: no pickled objects (the numpy RNG state is a tensor); /1 needed unpickling


class CheckpointWarning(UserWarning):
    """A checkpoint directory was skipped or recovered (the message says which and why)."""


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, Python, numpy (and CUDA) as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
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


def _aside(path: str, kind: str) -> str:
    """Rename ``path`` (OUT/name) to a fresh hidden ``OUT/.name.XXXX.<kind>/c`` and return the holder."""
    parent, name = os.path.split(path)
    holder = tempfile.mkdtemp(prefix=f".{name}.", suffix=f".{kind}", dir=parent)
    os.rename(path, os.path.join(holder, "c"))
    return holder


def install(tmp: str, final: str) -> None:
    """Put the finished directory ``tmp`` at ``final``, keeping a complete copy at every instant: an
    existing ``final`` is first renamed aside (``.old``), and deleted only once ``tmp`` is in place."""
    parent = os.path.dirname(final)
    if os.path.exists(final):
        holder = _aside(final, "old")
        os.rename(tmp, final)
        _fsync_dir(parent)
        shutil.rmtree(holder, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(parent)


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    info: dict[str, Any] | None = None, keep_last: int = 0) -> str:
    """Write ``OUT/checkpoint-{step}`` atomically (see the module docstring) and return its path.

    state: trainer state (data position, report, ...) of tensors and plain values, saved with the RNG
    states in trainer_state.pt; info: JSON-able facts (config) written into trainer_state.json. The
    model is saved in its own dtype (fp32 master weights: the resume is exact). keep_last > 0 deletes
    older checkpoints beyond the newest ``keep_last``.
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
        install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(_aside(old, "del"), ignore_errors=True)
    return final


def _complete_copy(holder: str) -> str | None:
    """The checkpoint inside a .tmp (the directory itself) or .old/.del (its ``c``), if it is complete."""
    for path in (os.path.join(holder, "c"), holder):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_JSON)):
            try:
                validate(path)
            except ValueError:
                return None
            return path
    return None


def recover(out_dir: str) -> tuple[list[str], list[str]]:
    """Finish or undo what a killed save left in ``out_dir``: where ``checkpoint-N`` (or ``final``) is
    missing, move the newest complete copy of it back into place (a complete ``.tmp`` -- newer -- before
    an ``.old``; for ``final`` only its ``.old``, as a ``.tmp`` final cannot be checked); then delete
    every leftover temporary. Returns (restored names, removed names); warns for each restore."""
    restored, removed = [], []
    if not os.path.isdir(out_dir):
        return restored, removed
    groups: dict[str, list[tuple[int, str]]] = {}
    rank = {"tmp": 0, "old": 1, "del": 2}
    for name in sorted(os.listdir(out_dir)):
        m = _TEMP_RE.match(name)
        if m and os.path.isdir(os.path.join(out_dir, name)):
            groups.setdefault(m.group(1), []).append((rank[m.group(3)], name))
    for target, entries in groups.items():
        dest = os.path.join(out_dir, target)
        if not os.path.exists(dest):
            for kind, name in sorted(entries):
                holder = os.path.join(out_dir, name)
                if target == "final":
                    copy = os.path.join(holder, "c") if kind == 1 and os.path.isdir(os.path.join(holder, "c")) else None
                else:
                    copy = _complete_copy(holder) if kind < 2 else None
                if copy is not None:
                    os.rename(copy, dest)
                    _fsync_dir(out_dir)
                    restored.append(target)
                    warnings.warn(f"{dest}: restored from {name} (a save of it was interrupted)", CheckpointWarning,
                                  stacklevel=2)
                    break
        for _, name in entries:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
            removed.append(name)
    return restored, removed


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """``recover`` and return the names of the temporary directories it removed."""
    return recover(out_dir)[1]


def validate(path: str) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises ValueError naming what is missing or wrong."""
    state_json = os.path.join(path, STATE_JSON)
    if not os.path.isfile(state_json):
        raise ValueError(f"checkpoint {path!r} is incomplete: no {STATE_JSON} (a save was interrupted?)")
    try:
        with open(state_json, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint {path!r}: {STATE_JSON} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"checkpoint {path!r}: {STATE_JSON} is not a vita_ext training manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {manifest.get('format')!r}; this version reads {FORMAT!r} "
                         "(format vita_ext.train/1 stored pickled objects, which are never loaded; its weights "
                         "still load as a model with --model)")
    bad = []
    for name, size in manifest["files"].items():
        full = os.path.join(path, name)
        if os.path.isabs(name) or os.path.normpath(name).startswith(os.pardir):
            raise ValueError(f"checkpoint {path!r}: {STATE_JSON} lists a file outside the checkpoint: {name!r}")
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


def latest_checkpoint(out_dir: str, warn: bool = True) -> str | None:
    """The newest complete checkpoint in out_dir, or None. Newer directories that are incomplete or
    corrupt are skipped, each with a ``CheckpointWarning`` saying why (when ``warn``)."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            validate(path)
        except ValueError as exc:
            if warn:
                warnings.warn(f"--resume auto: skipping {path}: {exc}", CheckpointWarning, stacklevel=2)
            continue
        return path
    return None


def _load_plain(path: str, what: str, **kwargs) -> Any:
    """torch.load of a file that must hold only tensors and plain values (never unpickles objects)."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint file {path} holds more than tensors and plain values; refused, because "
                         f"loading it could run code ({str(exc).splitlines()[0] if str(exc) else 'unpickling error'})"
                         ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"checkpoint file {path}: cannot read the {what} ({str(exc).splitlines()[0]})") from exc


def load_checkpoint_state(path: str, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG states from a complete checkpoint; returns
    the trainer state dict (with ``manifest``). Raises ValueError for an incomplete checkpoint or a
    file that holds anything but tensors and plain values (nothing is unpickled: see the module)."""
    from vita_ext.model.long_vita import LongVITAForCausalLM

    manifest = validate(path)
    loaded = LongVITAForCausalLM.from_pretrained(path, dtype=model.dtype, device=model.device)
    optimizer_state = _load_plain(os.path.join(path, OPTIMIZER_PT), "optimizer state", map_location=model.device)
    scheduler_state = _load_plain(os.path.join(path, SCHEDULER_PT), "scheduler state")
    state = _load_plain(os.path.join(path, STATE_PT), "trainer state")
    if not isinstance(state, dict) or "rng" not in state:
        raise ValueError(f"checkpoint {path!r}: {STATE_PT} is not a trainer state")
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        set_rng_state(state.pop("rng"))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {path!r} does not match this run's model/optimizer "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    del loaded
    state["manifest"] = manifest
    return state
