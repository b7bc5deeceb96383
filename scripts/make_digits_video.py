#!/usr/bin/env python
"""Make a video of held-out handwritten digits for the packaged digits model to read.

    python scripts/make_digits_video.py DIGITS.mp4                 # 16 held-out digits, one per second
    vita-ext generate --video DIGITS.mp4 --prompt "Read the digits in order."

The digits are scikit-learn's held-out split (``vita_ext.train.digits.load_split``: the 20% of each
class the default model never trained on), drawn at 28x28 px as in training and written one per
second (Long-VITA samples videos at 1 frame per second), H.264 lossless when PyAV has libx264. The
digits shown are printed, in order, on stdout (and with --answer FILE written to FILE), so the
model's reading can be checked. Needs scikit-learn (``pip install -e ".[test]"``).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vita_ext.train import digits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the video file to write (.mp4)")
    p.add_argument("--frames", type=int, default=16,
                   help="digits in the video (the default model was trained on up to 256; "
                        "vita-ext generate samples up to 256 frames for it)")
    p.add_argument("--seed", type=int, default=0, help="which held-out digits (seeded draw)")
    p.add_argument("--answer", default=None, metavar="FILE", help="also write the digits shown to FILE")
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error(f"--frames: expected >= 1, received {args.frames}")
    _, test = digits.load_split()
    rng = random.Random(args.seed)
    picks = [rng.randrange(len(test.labels)) for _ in range(args.frames)]
    digits.write_digits_video(args.out, [test.images[i] for i in picks])
    shown = "".join(str(test.labels[i]) for i in picks)
    if args.answer:
        with open(args.answer, "w", encoding="utf-8") as f:
            f.write(shown + "\n")
    print(shown)
    print(f"wrote {args.out}: {args.frames} held-out digits, 1 per second", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
