"""The paper's LM-head table on one device (issue 4, target 5): prefill of a long real text prompt with
three LM heads, at growing lengths, until each runs out of memory.

Model: Long-VITA-14B shapes (hidden 5120, 40/8 heads, MLP 13824, vocab 152064, the InternViT-300M and
projector weights on the device too) with fewer decoder layers (--layers, default 4; stated in every
row's mode), random bf16 weights (LongVITAForCausalLM.random, or write_random_checkpoint + from_pretrained
with --checkpoint DIR). Prompt: Python's own pydoc_data/topics.py tokenised with
LongVITATokenizer.default(), repeated to the longest length. One prefill = embed -> decoder layers
filling a KV cache sized for the prompt -> final norm -> head -> next token (argmax), under
inference_mode. Heads (providers):
  original  F.linear over all S rows, logits upcast to fp32 as HF did before logits_to_keep ([S, V] bf16
            + fp32), last row kept
  chunked   the same logits computed --chunk rows at a time (each chunk's fp32 logits dropped after use),
            so memory is O(chunk x V) but the FLOPs stay 2*S*H*V
  masked    vita_ext.masked_lm_head at the last position only (the paper's logits-masked head)
Rows (op prefill, mode "L<layers>/<attention>"): time (ms; --reps runs, default 3, while every head
survives, then one run per length) and peak_memory (absolute bytes, weights included) at each length S
a head survives; speedup_vs_original / speedup_vs_chunked of the masked head
where both survive; max_tokens per head (x "oom": the longest length that ran, with first_oom_tokens the
shortest that did not; x "cap": no OOM up to the longest length tried, or "budget": stopped by
--time-budget); weights_memory and kv_cache_per_token of the model.
Target: the masked head reaches the length at which the KV cache and activations, not the head,
exhaust memory (compare its max_tokens with the computed kv/activation limit in RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

import _common
from _common import Bench

import vita_ext  # noqa: E402

OP = "prefill"
HEADS = ("original", "chunked", "masked")


class SdpaAttention:
    """Attention backend (vita_ext.model.language.AttentionBackend) using torch SDPA, for runs that want the
    head comparison without depending on attention_lse's speed (--attention sdpa)."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, layer_idx, q, k, v):
        k, v = self.cache.update(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)  # prefill: Sq == Sk
        return out.transpose(1, 2)

    def advance(self, n):
        self.cache.advance(n)


def prompt_ids(max_len: int, quick: bool) -> torch.Tensor:
    """Token ids of pydoc_data/topics.py (a long real English text), repeated to max_len: [1, max_len]."""
    import pydoc_data.topics

    from vita_ext.processing import LongVITATokenizer

    with open(pydoc_data.topics.__file__, encoding="utf-8") as f:
        text = f.read()
    if quick:
        text = text[:20000]
    ids = LongVITATokenizer.default().encode(text)
    reps = -(-max_len // len(ids))
    return torch.tensor((ids * reps)[:max_len], dtype=torch.long)[None]


def build_model(args, dtype, device):
    from vita_ext.model import presets
    from vita_ext.model.long_vita import LongVITAForCausalLM

    if args.quick:
        config = presets.tiny(layers=args.layers or 2, hidden=64)
    else:
        config = presets.long_vita_14b()
        config.text = dataclasses.replace(config.text, num_hidden_layers=args.layers or 4)
    if args.checkpoint:
        import os

        from vita_ext.model.checkpoint import write_random_checkpoint

        if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
            write_random_checkpoint(args.checkpoint, config, dtype=dtype)
        return LongVITAForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    return LongVITAForCausalLM.random(config, dtype=dtype, device=device)


def prefill(model, ids: torch.Tensor, head: str, chunk: int, attention: str) -> torch.Tensor:
    from vita_ext.model.language import LocalAttention

    s = ids.shape[1]
    cache = model.new_cache(1, s)
    backend = LocalAttention(cache) if attention == "ours" else SdpaAttention(cache)
    positions = torch.arange(s, device=ids.device)[None]
    hidden = model.decode(model.embed(ids), positions, backend).view(s, -1)
    weight = model.lm_head.weight
    if head == "original":
        last = F.linear(hidden, weight).float()[-1:]
    elif head == "chunked":
        for start in range(0, s, chunk):
            logits = F.linear(hidden[start:start + chunk], weight).float()
        last = logits[-1:]
    else:
        last = vita_ext.masked_lm_head(hidden, weight, torch.tensor([s - 1], device=ids.device)).float()
    return last.argmax(-1)


class Runner:
    """Runs (head, length) prefills with timing, peak memory and out-of-memory detection."""

    def __init__(self, b: Bench, model, ids, args, reps: int):
        self.b, self.model, self.ids, self.args, self.reps = b, model, ids, args, reps
        self.mode = f"L{model.config.text.num_hidden_layers}/{args.attention}"
        self.t0 = b._t0  # the budget counts from the script's start (model build and tokenising included)
        self.last: dict[str, tuple[int, float]] = {}  # head -> (length, p50 ms) of its last run

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def predicted_s(self, head: str, s: int, reps: int) -> float:
        """Seconds a run at s should take, from the head's last run (attention makes it up to quadratic)."""
        if head not in self.last:
            return 0.0
        s0, ms = self.last[head]
        return ms * 1e-3 * (s / s0) ** 2 * reps

    def run(self, head: str, s: int, reps: int | None = None) -> bool | None:
        """True: ran and recorded; False: out of memory; None: skipped for the time budget."""
        reps = reps or self.reps
        if self.elapsed() + self.predicted_s(head, s, reps) > self.args.time_budget:
            self.b.note(f"{head} S={s}: skipped, would exceed --time-budget {self.args.time_budget:g} s")
            return None
        dev, ids = self.b.device, self.ids[:, :s].to(self.b.device)
        fn = lambda: prefill(self.model, ids, head, self.args.chunk, self.args.attention)  # noqa: E731
        oom = False
        try:
            with torch.inference_mode():
                if head not in self.last:  # first run of this head: warm up kernels and heuristics
                    fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                import harness

                q = harness.time_ms(fn, [()], dev, warmup=0, reps=reps)
                peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected
            if not _common.is_oom(exc):
                raise
            oom = True
        del ids
        if oom:
            _common.free(dev)
            self.b.note(f"{head} S={s}: out of memory")
            return False
        x = f"S={s}"
        self.b.row(head, self.mode, "time", "ms", x, *q)
        if peak is not None:
            self.b.row(head, self.mode, "peak_memory", "bytes", x, peak)
        self.last[head] = (s, q[1])
        self.b.note(f"{head} S={s}: {q[1]:.1f} ms" + (f", peak {peak / 2**30:.2f} GiB" if peak is not None else ""))
        return True


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; quick 2, tiny model)")
    p.add_argument("--lengths", default=None,
                   help="prompt lengths, ascending (default 4096 doubling to 1048576; quick 16,32,64)")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--chunk", type=int, default=2048, help="rows per chunk of the chunked head")
    p.add_argument("--attention", choices=("ours", "sdpa"), default="ours",
                   help="attention in the decoder: vita_ext.attention_lse (ours) or torch SDPA")
    p.add_argument("--refine", type=int, default=None,
                   help="bisection steps between a head's last good length and its first OOM (default 2; quick 0)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds from the start; runs predicted to end past it are skipped")
    p.add_argument("--checkpoint", default=None,
                   help="write a random checkpoint here (if none is there) and load it, instead of building "
                        "the random model in memory")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    reps = args.reps or (1 if args.quick else 3)
    lengths = _common.ints(args.lengths or ("16,32,64" if args.quick else
                                            ",".join(str(4096 << i) for i in range(9))))
    heads = [h for h in args.heads.split(",") if h]
    refine = args.refine if args.refine is not None else (0 if args.quick else 2)

    ids = prompt_ids(max(lengths), args.quick)
    b.note(f"prompt: {ids.shape[1]} tokens of pydoc_data/topics.py (repeated)")
    model = build_model(args, b.dtype, b.device)
    r = Runner(b, model, ids, args, reps)
    t = model.config.text
    elt = torch.finfo(b.dtype).bits // 8
    weights = sum(x.numel() * x.element_size() for x in model.state_dict().values())
    b.row("model", r.mode, "weights_memory", "bytes", "model", weights)
    b.row("model", r.mode, "kv_cache_per_token", "bytes", "model",
          t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * elt)
    b.note(f"model: {t.num_hidden_layers} decoder layers, {weights / 2**30:.2f} GiB of weights, "
           f"attention {args.attention}")

    good = {h: 0 for h in heads}
    bad: dict[str, int] = {}
    stop: dict[str, str] = {}
    for s in lengths:
        for head in heads:
            if head in stop:
                continue
            # the timing table needs lengths every head survives; past the first stop one run per length
            # finds the limits sooner
            ok = r.run(head, s, reps=1 if stop else None)
            if ok:
                good[head] = s
            elif ok is False:
                bad[head], stop[head] = s, "oom"
            else:
                stop[head] = "budget"
        if len(stop) == len(heads):
            break
    for head, hi in bad.items():
        lo = good[head]
        for _ in range(refine):
            mid = (lo + hi) // 2 // 1024 * 1024 if hi - lo > 2048 else (lo + hi) // 2
            if mid <= lo or mid >= hi:
                break
            ok = r.run(head, mid, reps=1)
            if ok is None:
                break
            lo, hi = (mid, hi) if ok else (lo, mid)
        good[head], bad[head] = lo, hi
    for head in heads:
        why = stop.get(head, "cap")
        b.row(head, r.mode, "max_tokens", "tokens", why, good[head])
        if head in bad:
            b.row(head, r.mode, "first_oom_tokens", "tokens", why, bad[head])
    for s in lengths:
        for base in ("original", "chunked"):
            b.speedup(r.mode, f"S={s}", "masked", base)
    del model
    _common.free(b.device)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
