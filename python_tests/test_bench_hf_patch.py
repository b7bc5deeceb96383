"""Smoke test: benchmarks/bench_hf_patch.py --quick runs on the CPU and writes its rows to the CSV given."""
import csv
import os
import sys

import pytest

pytest.importorskip("transformers")
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_bench_hf_patch_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_hf_patch

    out = tmp_path / "results.csv"
    assert bench_hf_patch.main(["--quick", "--device", "cpu", "--reps", "1", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["provider"], r["metric"]) for r in rows}
    assert {("hf", "time"), ("vita_ext", "time"), ("hf", "peak_memory"), ("vita_ext", "peak_memory"),
            ("vita_ext", "speedup_vs_hf"), ("vita_ext", "memory_vs_hf")} <= got
    assert all(r["op"] == "hf_qwen2_train_step" and r["x"] == "T=256" and float(r["p50"]) > 0 for r in rows)
    sys.modules.pop("bench_hf_patch", None)
