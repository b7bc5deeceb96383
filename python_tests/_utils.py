"""Accuracy helpers: the project's rule is that a kernel's error against a float64 reference is at
most twice the error of plain PyTorch doing the same computation at the kernel's dtype."""
from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    diff = (x.double() - ref.double()).abs()
    both_inf = torch.isinf(x.double()) & torch.isinf(ref.double()) & (torch.sign(x.double()) == torch.sign(ref.double()))
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    return diff.max().item()


def assert_2x_rule(ours: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, name: str = "output",
                   factor: float = 2.0) -> None:
    """err(ours) <= factor * err(plain) + one ulp of the reference's magnitude at ours' dtype.

    ours: the op's result at its dtype; plain: the reference computed by PyTorch at that dtype;
    ref64: the reference computed in float64. NaN never passes.
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN in result"
    e_ours, e_plain = max_err(ours, ref64), max_err(plain, ref64)
    finite = ref64[torch.isfinite(ref64)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    dt = ours.dtype if ours.dtype.is_floating_point else torch.float32
    floor = torch.finfo(dt).eps * scale
    assert e_ours <= factor * e_plain + floor, (
        f"{name}: error {e_ours:.3e} exceeds {factor}x PyTorch's {e_plain:.3e} (+ floor {floor:.1e}) at {dt}")


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh standard-normal data (never zeros), made in float64 then cast, so every dtype sees the same values."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ------------------------------------------------------------------ checkpoints
def two_shard_checkpoint(path, max_positions: int):
    """A tiny random checkpoint (56-px tiles, 1 layer, hidden 32, the real vocabulary) written in bf16 as
    two safetensors shards plus the index, with ``max_positions`` positions; returns ``path``."""
    from vita_ext.model.checkpoint import write_random_checkpoint
    from vita_ext.model.presets import tiny

    cfg = tiny(image_size=56, layers=1, hidden=32)
    cfg.text.max_position_embeddings = max_positions
    write_random_checkpoint(path, cfg, dtype=torch.bfloat16, seed=0, max_shard_bytes=6 * 2**20)
    return path


# ------------------------------------------------------------------ multi-process (gloo) tests
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, result_dir, fn, args):
    import json
    import os
    import traceback

    import torch.distributed as dist

    from vita_ext.parallel import shutdown_distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {}
    try:
        fn(rank, world, out, *args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent instead of hanging it
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
            json.dump(out, f)
        shutdown_distributed()


def spawn_gloo(fn, world: int, result_dir, *args) -> list[dict]:
    """Run ``fn(rank, world, out, *args)`` on ``world`` spawned gloo ranks (one thread each) and return
    each rank's ``out`` dict; an exception on a rank becomes ``out["error"]`` (message + traceback).
    ``fn`` must be a module-level function (it is pickled to the children)."""
    import json
    import os

    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, free_port(), str(result_dir), fn, args), nprocs=world, join=True)
    return [json.load(open(os.path.join(str(result_dir), f"{r}.json"))) for r in range(world)]


# ------------------------------------------------------------------ work and host-sync counters
# Ops that bring a value from the device to the host (each one a sync on CUDA): .item()/.tolist()/
# bool()/int() go through _local_scalar_dense; nonzero sizes its output on the host.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero")


def profiled(fn):
    """Run ``fn()`` under the CPU profiler, which also sees the ATen calls made inside our C++ kernels.
    It runs with one torch thread: the profiler does not follow a kernel's own worker threads, and the
    counts must not depend on how a kernel splits its work between threads.

    Returns (counts, allocations): how many times each op ran, and (op name, bytes) of the CPU memory
    each op allocated itself (not counting its children). Used to show that a kernel skips the work (GEMMs, buffers) of a gradient nobody asked
    for, and that a path makes no host sync.
    """
    import collections

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                    record_shapes=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    events = prof.events()
    counts = collections.Counter(e.name for e in events)
    allocations = [(e.name, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage > 0]
    return counts, allocations


def host_syncs(counts) -> dict:
    return {name: counts[name] for name in HOST_SYNC_OPS if counts.get(name)}
