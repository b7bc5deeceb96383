"""Smoke tests of the benchmark suite (benchmarks/): every bench script runs with --quick on the CPU and
appends rows with the harness schema, and plot.py draws them. These check that the harness and the
scripts work, not speed. torch.compile providers are skipped by the scripts in --quick CPU runs."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import harness  # noqa: E402

OPS = {  # script -> op name written in its rows
    "bench_pixel_shuffle_projector": "pixel_shuffle_projector",
    "bench_masked_lm_head": "masked_lm_head",
    "bench_masked_linear_cross_entropy": "masked_linear_cross_entropy",
    "bench_attention_lse": "attention_lse",
    "bench_merge_attention": "merge_attention",
    "bench_ring_attention": "ring_attention",
    "bench_prefill": "prefill",
    "bench_tiny_model": "tiny_model",
}
EXTRA = {"bench_attention_lse": ["--modes", "fwd,decode,fwd_bwd"], "bench_masked_lm_head": ["--modes", "fwd,fwd_bwd"]}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _run_script(script: str, csv_path: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(BENCH, script + ".py"), "--quick", "--device", "cpu", "--csv", csv_path]
    return subprocess.run(cmd + EXTRA.get(script, []), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every script once with --quick (two at a time: the CI machine has two cores), each into its own CSV."""
    tmp = tmp_path_factory.mktemp("bench")
    paths = {s: str(tmp / f"{s}.csv") for s in OPS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(OPS, pool.map(lambda s: _run_script(s, paths[s]), OPS)))
    return {s: (procs[s], paths[s]) for s in OPS}


@pytest.mark.parametrize("script", list(OPS))
def test_quick_run_appends_rows(quick_runs, script):
    proc, path = quick_runs[script]
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    assert tuple(header) == harness.FIELDS
    rows = harness.read_rows(path)
    assert rows, f"{script} appended no rows"
    assert {r["op"] for r in rows} == {OPS[script]}
    for r in rows:
        assert all(r[k] != "" for k in ("op", "provider", "mode", "metric", "unit", "x", "torch", "commit", "date"))
        assert r["device"].startswith("cpu")
        p20, p50, p80 = (float(r[k]) for k in ("p20", "p50", "p80"))
        assert p20 == p20 and p50 == p50 and p80 == p80, f"NaN in {r}"
        if r["metric"] == "time":
            assert 0 < p20 <= p50 <= p80, r
    times = {(r["provider"], r["mode"]) for r in rows if r["metric"] == "time"}
    assert any(p in ("ours", "masked", "single", "flash") for p, _ in times), f"no timing of our op in {script}"
    if script != "bench_ring_attention":  # the ring benchmark has no eager counterpart
        assert len({p for p, _ in times}) >= 2, f"{script} compared no providers: {times}"
    if "--compile" not in proc.args:
        assert "torch.compile providers skipped" in proc.stdout


def test_plot_draws_every_op(quick_runs, tmp_path):
    csvs = [path for proc, path in quick_runs.values() if proc.returncode == 0]
    assert len(csvs) == len(OPS)
    out = tmp_path / "plots"
    merged = tmp_path / "merged.csv"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "plot.py"), "--csv", *csvs, "--out", str(out),
                           "--merge-to", str(merged)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(len(harness.read_rows(c)) for c in csvs) == len(harness.read_rows(str(merged)))
    for op in OPS.values():
        png = out / f"{op}.png"
        assert png.exists() and png.stat().st_size > 1000, f"missing {png}"
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def same_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # a quick CPU run sets one thread; give the rest of the session its own back


def test_prefill_records_max_tokens_at_out_of_memory(monkeypatch, tmp_path, same_threads):
    """The OOM path: a head that runs out of memory past 32 tokens gets max_tokens 32 (bisected down from
    64), the others run to the cap."""
    import bench_prefill

    real = bench_prefill.prefill

    def fake(model, ids, head, chunk, attention):
        if head == "original" and ids.shape[1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB (simulated)")
        return real(model, ids, head, chunk, attention)

    monkeypatch.setattr(bench_prefill, "prefill", fake)
    csv_path = str(tmp_path / "r.csv")
    assert bench_prefill.main(["--quick", "--device", "cpu", "--csv", csv_path, "--refine", "2",
                               "--heads", "original,masked"]) == 0
    rows = harness.read_rows(csv_path)
    got = {(r["provider"], r["metric"]): (r["x"], float(r["p50"])) for r in rows if "tokens" in r["metric"]}
    assert got[("original", "max_tokens")] == ("oom", 32)
    assert got[("original", "first_oom_tokens")] == ("oom", 40)  # 64 -> 48 -> 40 by bisection
    assert got[("masked", "max_tokens")] == ("cap", 64)
    assert ("masked", "first_oom_tokens") not in got
    timed = {(r["provider"], r["x"]) for r in rows if r["metric"] == "time"}
    assert ("original", "S=64") not in timed and ("masked", "S=64") in timed
    assert any(r["metric"] == "speedup_vs_original" and r["x"] == "S=32" for r in rows)


def test_bench_skips_out_of_memory_and_failing_peers(tmp_path, same_threads):
    import _common

    args = _common.parser("t").parse_args(["--quick", "--device", "cpu", "--csv", str(tmp_path / "b.csv")])
    b = _common.Bench("unit", args)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def broken():
        raise RuntimeError("peer bug")

    assert b.time("eager", "fwd", "x", oom) is None
    assert b.time("liger", "fwd", "x", broken) is None
    with pytest.raises(RuntimeError, match="peer bug"):
        b.time("ours", "fwd", "x", broken)  # our own op's failures are never hidden
    assert b.time("ours", "fwd", "x", lambda: torch.ones(3).sum(), flops=3.0, nbytes=12.0) > 0
    assert {r.metric for r in b.rows} == {"time", "tflops", "gbps"}
    b.speedup("fwd", "x", "ours", "eager")  # nothing to compare with: no row
    assert not any(r.metric.startswith("speedup") for r in b.rows)
    with pytest.raises(AssertionError, match="disagrees"):
        b.check("eager", "x", lambda: torch.ones(4), torch.zeros(4) + 2)
    assert b.finish() == 0
    assert len(harness.read_rows(str(tmp_path / "b.csv"))) == 3
