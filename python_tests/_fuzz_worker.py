"""The process that runs fuzz cases for test_fuzz.py, one JSON request per line on stdin, one JSON
answer per line on the original stdout. Running them here, not in pytest, means a crash (a segfault in
a decoder) or a hang is seen by the test as what it is, with the case that caused it.

Requests: {"kind": "cli", "argv": [...], "stdin": str | None} runs ``vita_ext.cli.main`` and answers
{"rc", "stderr", "stdout", "escaped"}; {"kind": "processor", ...} runs ``LongVITAProcessor`` on
fuzzed media and answers the outcome and the facts test_fuzz checks a result against; {"kind": "data"}
encodes every record of a JSONL file with ``JsonlDataset``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
import warnings


def _processor_case(req: dict, processors: dict) -> dict:
    import torch

    from vita_ext.processing import LongVITAProcessor, LongVITATokenizer

    size = req.get("image_size", 56)
    if size not in processors:
        processors[size] = LongVITAProcessor(LongVITATokenizer.default(), image_size=size, patch_size=14)
    proc = processors[size]
    videos = [v if isinstance(v, str) else [_frame(f) for f in v] for v in req.get("videos", [])]
    out = proc(req["text"], images=req.get("images") or None, videos=videos or None, max_tiles=req.get("max_tiles"),
               max_frames=req.get("max_frames"), max_length=req.get("max_length"))
    tok = proc.tokenizer
    ids = out["input_ids"][0]
    context_ids = torch.tensor([tok.img_context_id, tok.vid_context_id, tok.patch_context_id])
    is_context = torch.isin(ids, context_ids)
    pv, positions = out["pixel_values"], out["context_positions"]
    return {"tiles": pv.shape[0], "pixel_shape": list(pv.shape[1:]), "finite": bool(torch.isfinite(pv).all()),
            "positions": int(positions.numel()), "context_tokens": int(is_context.sum()),
            "tokens_per_tile": proc.tokens_per_tile, "length": int(ids.numel()),
            "positions_ok": bool(is_context[positions].all()) and bool((positions.diff() > 0).all())}


def _frame(spec):
    from PIL import Image

    mode, w, h = spec
    return Image.new(mode, (w, h))


def _data_case(req: dict) -> dict:
    from vita_ext.processing import LongVITAProcessor, LongVITATokenizer
    from vita_ext.train.data import JsonlDataset

    proc = LongVITAProcessor(LongVITATokenizer.default(), image_size=56, patch_size=14)
    ds = JsonlDataset(req["path"], proc, max_frames=4, max_tiles=4)
    good = sum(ds.encode(i) is not None for i in range(len(ds)))
    return {"records": len(ds), "good": good, "bad": ds.report.num_bad}


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (and C-level output) never corrupt the answers
    processors: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        err, std = io.StringIO(), io.StringIO()
        answer: dict = {}
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std), warnings.catch_warnings():
            warnings.simplefilter("default")
            try:
                if req["kind"] == "cli":
                    from vita_ext.cli import main as cli_main

                    if req.get("stdin") is not None:
                        sys.stdin = io.TextIOWrapper(io.BytesIO(req["stdin"].encode("utf-8", "surrogateescape")))
                    try:
                        answer["rc"] = cli_main(req["argv"])
                    except SystemExit as e:  # argparse: usage + "error:" line, status 2
                        answer["rc"] = e.code
                    finally:
                        sys.stdin = sys.__stdin__
                elif req["kind"] == "processor":
                    answer["result"] = _processor_case(req, processors)
                else:
                    answer["result"] = _data_case(req)
            except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
                answer["error"] = f"{type(e).__name__}: {e}"
            except BaseException:  # noqa: BLE001 - what the fuzz test is looking for
                answer["escaped"] = traceback.format_exc()
        answer.update(stderr=err.getvalue(), stdout=std.getvalue(), seconds=time.perf_counter() - t0)
        out.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
