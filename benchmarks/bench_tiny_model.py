"""The shipped default model (the tiny Long-VITA trained on digits) end to end, per attention backend:
how much the choice of attention kernel changes its ViT encode, prefill and decode (issue 10).

Input: N held-out digit images in one prompt ("<image>" x N + a question), so the prompt holds N tiles
and ~N x (tokens per tile + tags) tokens. One run = ``vita_ext.generate`` (greedy, --new-tokens), whose
timings split it into vision encode, prefill and decode. The providers are the attention backends,
forced through VITA_EXT_ATTENTION_BACKEND (``vita``: vita_ext's kernels; ``flash``: PyTorch's flash
kernels), run in alternation so load swings on a shared machine hit both alike. The outputs of all
providers must be the same tokens (checked). Rows (op "tiny_model", mode = vision | prefill | decode,
x "N=<images>,S=<prompt tokens>"): time (ms), decode tokens_per_s, and speedup_vs_vita of flash.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

import _common
import harness
from _common import Bench

import vita_ext  # noqa: E402
from vita_ext.generation import generate
from vita_ext.model.default import default_model
from vita_ext.ops import attention_dispatch

OP = "tiny_model"


def digit_prompt(processor, n: int, folder: str):
    from vita_ext.train import digits

    _, test = digits.load_split()
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f"{i}.png"))
        digits.to_image(test.images[i % len(test.labels)]).save(paths[-1])
    return processor("<image>" * n + "\nRead the digits in order.", images=paths)


def run_once(model, inputs, backend: str, new_tokens: int):
    os.environ[attention_dispatch.ENV_VAR] = backend
    out = generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"],
                   max_new_tokens=new_tokens, temperature=0)
    return out


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--images", default="16,64,256", help="images per prompt (quick: 4)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). With the model this small, a loaded machine makes "
                        "multi-threaded runs measure OpenMP barrier waits, not kernels: say which in RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = "fp32"
    b = Bench(OP, args)
    backends = [n for n in ("vita", "flash") if b.wants(n)]
    model, processor, _, label = default_model()
    model = model.to(b.device)
    b.note(f"model: {label}; torch threads {torch.get_num_threads()}")
    saved = os.environ.get(attention_dispatch.ENV_VAR)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for n in _common.ints("4" if args.quick else args.images):
                inputs = digit_prompt(processor, n, folder)
                x = f"N={n},S={inputs['input_ids'].shape[1]}"
                samples = {name: {"vision": [], "prefill": [], "decode": [], "tps": []} for name in backends}
                texts = {}
                for name in backends:  # warm-up
                    texts[name] = run_once(model, inputs, name, args.new_tokens).sequences
                if len({tuple(t[0].tolist()) for t in texts.values()}) != 1:
                    raise AssertionError(f"tiny_model: backends disagree at {x}: {texts}")
                for rep in range(b.reps):
                    for name in backends[rep % len(backends):] + backends[:rep % len(backends)]:
                        out = run_once(model, inputs, name, args.new_tokens)
                        s = samples[name]
                        s["vision"].append(out.vision_seconds * 1e3)
                        s["prefill"].append(out.prefill_seconds * 1e3)
                        s["decode"].append(out.decode_seconds * 1e3)
                        s["tps"].append(out.decode_tokens_per_second)
                for name in backends:
                    for mode in ("vision", "prefill", "decode"):
                        b.row(name, mode, "time", "ms", x, *harness.quantiles(samples[name][mode]))
                    b.row(name, "decode", "tokens_per_s", "tokens/s", x, *harness.quantiles(samples[name]["tps"]))
                if "flash" in backends and "vita" in backends:
                    for mode in ("vision", "prefill", "decode"):
                        b.speedup(mode, x, "flash", "vita")
    finally:
        if saved is None:
            os.environ.pop(attention_dispatch.ENV_VAR, None)
        else:
            os.environ[attention_dispatch.ENV_VAR] = saved
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
