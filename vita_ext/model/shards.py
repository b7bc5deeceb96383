"""Sharded safetensors in the Long-VITA HF release layout: shard files, the index json, and seeded
random tensors, with no knowledge of the model (``long_vita`` builds on this; ``checkpoint`` writes
whole checkpoints on top of both).

Reading names the shard file in every error (safetensors' own errors name none); writing produces one
shard at a time, so a checkpoint larger than memory can be written.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vita_ext._json import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 1024**3


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic fp32 random tensor for parameter ``name``: norm weights ~1, layer scales ~0.1,
    biases and weights ~N(0, 0.02). The same (name, seed) always gives the same values."""
    gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF)
    x = torch.randn(shape, generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "weight" and ("norm" in parent or "layernorm" in parent):
        return 1.0 + 0.1 * x
    if leaf in ("ls1", "ls2"):
        return 0.1 + 0.02 * x
    return 0.02 * x


# --------------------------------------------------------------------------------------- writing
def _groups(named: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for name, shape, dtype in named:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_shards(path: str, names_shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int,
                 produce: Callable[[str], torch.Tensor]) -> None:
    """Write tensors produced one shard at a time (``produce(name) -> tensor``, cast to ``dtype``),
    at most ``max_bytes`` per shard, plus the index json. Each shard is renamed into place whole."""
    os.makedirs(path, exist_ok=True)
    groups = _groups(((n, s, dtype) for n, s in names_shapes.items()), max_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: produce(n).to(dtype).contiguous() for n in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = os.path.join(path, file + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, file))
        weight_map.update({n: file for n in names})
        del tensors
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------- reading
def _shard_error(file: str, exc: BaseException) -> ValueError:
    text = str(exc).strip().splitlines()
    return ValueError(f"checkpoint shard {file}: cannot read it as safetensors "
                      f"({text[0] if text else type(exc).__name__}); the file is truncated or corrupt")


def _read_index(index: str) -> dict[str, str]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file name")
    for file in set(weight_map.values()):
        if os.path.isabs(file) or os.path.normpath(file).startswith(os.pardir) or os.sep in os.path.normpath(file):
            raise ValueError(f"{index}: shard {file!r} is not a file name inside the checkpoint directory")
    return weight_map


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> shard file path; raises FileNotFoundError naming what is missing and
    ValueError for an unreadable index or single-file checkpoint (naming the file)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
        weight_map = _read_index(index)
    elif os.path.exists(single):
        try:
            with safe_open(single, framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors' errors name no file
            raise _shard_error(single, exc) from exc
    else:
        raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path!r}")
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
    if missing:
        lost = sum(1 for f in weight_map.values() if f in missing)
        raise FileNotFoundError(f"checkpoint {path!r}: missing shard file(s) {missing} listed in {INDEX_FILE} "
                                f"({lost} tensors)")
    return {k: os.path.join(path, f) for k, f in weight_map.items()}


def read_tensors(files: dict[str, str], names: list[str], device: str,
                 dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of ``names``, read shard by shard straight to ``device`` and cast to
    ``dtype`` (None: as stored). files: ``checkpoint_files``' map. ValueError names the shard."""
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, group in by_file.items():
        try:
            with safe_open(file, framework="pt", device=device) as f:
                stored = set(f.keys())
                for n in group:
                    if n not in stored:
                        raise ValueError(f"checkpoint shard {file}: has no tensor {n!r} (the index says it does)")
                    t = f.get_tensor(n)
                    yield n, (t if dtype is None else t.to(dtype))
        except (ValueError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' errors (truncated file, bad header) name no file
            raise _shard_error(file, exc) from exc


def describe_names(names: list[str], limit: int = 12) -> str:
    """The first ``limit`` names, comma-separated, and how many there are in all when more."""
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")
