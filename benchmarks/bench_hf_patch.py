"""Benchmark: one Qwen2 training step through Hugging Face transformers, unpatched vs vita_ext.patch_qwen2.

The step is ``model.zero_grad(); model(input_ids, labels=input_ids, use_cache=False).loss.backward()`` on
a batch of one sequence of T tokens, with random weights (no download).

Model: Qwen2.5-0.5B's shapes (hidden 896, 14 query / 2 kv heads of 128, MLP 4864, vocab 151936) with
--layers decoder layers (default 4: the head and loss, which the patch changes most, weigh as in the
real model, and the step fits quickly); bf16 on CUDA, fp32 on the CPU. --quick: hidden 64, 4/2 heads,
2 layers, vocab 2048, T = 256, fp32 (a CPU smoke run of this script).
Sequence lengths: --tokens (default 2048,8192; quick 256).
Providers:
  hf        the model as transformers builds it (sdpa attention, lm_head over all T rows, ForCausalLMLoss)
  vita_ext  after vita_ext.patch_qwen2(model): attention_lse, masked_linear_cross_entropy (no [T, V] logits)
Metrics (op "hf_qwen2_train_step", mode "fwd_bwd", x "T=<tokens>"):
  time (ms, p20/p50/p80), peak_memory (bytes above the step's start: CUDA max_memory_allocated; on the
  CPU the peak of the running total of bytes torch.profiler(profile_memory=True) records per op),
  speedup_vs_hf and memory_vs_hf (x: hf / vita_ext) for vita_ext.
The losses of the two providers are compared first; a mismatch fails the run.
"""
from __future__ import annotations

import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # harness, and vita_ext from a source checkout
    if _path not in sys.path:
        sys.path.insert(1 if _path != HERE else 0, _path)
import harness  # noqa: E402
from harness import Row  # noqa: E402

OP = "hf_qwen2_train_step"
MODE = "fwd_bwd"


def build(quick: bool, layers: int, tokens: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if quick:
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=2048, num_hidden_layers=2)
    else:
        shape = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                     vocab_size=151936, num_hidden_layers=layers)
    cfg = Qwen2Config(max_position_embeddings=max(tokens, 32768), tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).train()
    return model, cfg.vocab_size


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss


def cpu_peak_bytes(fn) -> int:
    """Peak of the running total of the bytes each op allocates (net of what it frees), ordered by op
    start, as recorded by torch.profiler with profile_memory=True. Misses only allocations an op makes
    and frees within itself, which is what a CPU probe of torch tensors can see."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    return peak


def peak_bytes(fn, device: torch.device) -> int:
    return harness.peak_memory_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)


def main(argv=None) -> int:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="comma-separated sequence lengths (default 2048,8192; quick 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the full-size model (default 4)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on CUDA, float32 on the CPU")
    args = p.parse_args(argv)
    device, warmup, reps = harness.settings(args)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = [int(t) for t in (args.tokens or ("256" if args.quick else "2048,8192")).split(",")]
    wanted = set(args.providers.split(",")) if args.providers else {"hf", "vita_ext"}

    import vita_ext

    rows: list[Row] = []
    for tokens in lengths:
        x = f"T={tokens}"
        hf, vocab = build(args.quick, args.layers, tokens, dtype, device)
        patched = vita_ext.patch_qwen2(copy.deepcopy(hf))
        providers = {"hf": hf, "vita_ext": patched}
        ids = torch.randint(0, vocab, (1, tokens), device=device)
        losses = {name: train_step(m, ids).item() for name, m in providers.items()}
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if abs(losses["hf"] - losses["vita_ext"]) > tol * max(1.0, abs(losses["hf"])):
            print(f"{x}: losses differ: {losses}", file=sys.stderr)
            return 1
        times, peaks = {}, {}
        for name, model in providers.items():
            if name not in wanted:
                continue
            times[name] = harness.time_ms(lambda i: train_step(model, i), [(ids,)], device, warmup, reps)
            peaks[name] = peak_bytes(lambda: train_step(model, ids), device)
            rows.append(Row(OP, name, MODE, "time", "ms", x, *times[name]))
            rows.append(Row(OP, name, MODE, "peak_memory", "bytes", x, *([float(peaks[name])] * 3)))
            print(f"{x:>8} {name:>9}: {times[name][1]:10.2f} ms  peak {peaks[name] / 2**20:10.1f} MiB  "
                  f"loss {losses[name]:.4f}")
        if {"hf", "vita_ext"} <= times.keys():
            speed = times["hf"][1] / times["vita_ext"][1]
            rows.append(Row(OP, "vita_ext", MODE, "speedup_vs_hf", "x", x, speed, speed, speed))
            if peaks["vita_ext"] > 0:
                ratio = peaks["hf"] / peaks["vita_ext"]
                rows.append(Row(OP, "vita_ext", MODE, "memory_vs_hf", "x", x, ratio, ratio, ratio))
        del hf, patched, providers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    harness.append_rows(rows, args.csv, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
