"""`vita-ext serve` under load: requests/s and p50/p99 latency of the tiny model at 1, 8 and 64 concurrent
clients, against the same requests run back to back by ``vita_ext.generation.generate`` in one process
(the peer: the model with no HTTP, no queue, no JSON), measured in the same run.

    python benchmarks/bench_serve.py [--clients 1,8,64] [--requests 128] [--max-tokens 8] [--quick]
                                     [--csv benchmarks/results.csv] [--png benchmarks/serve_tiny_cpu.png]

The server is the real one (`python -m vita_ext serve`, a subprocess on a free loopback port, a queue
large enough that nothing is refused); clients are threads speaking raw HTTP/1.1 (http.client), each
sending its next request when the last is answered. Latency is the client's wall time from send to the
whole (non-streamed) response, queueing included. Each request asks a different text prompt
(greedy, ``--max-tokens`` new tokens; the tiny model has random weights and never stops early).
Rows: op ``serve``; provider ``vita-ext serve`` or ``generate (in-process)``; mode ``c<clients>``;
metrics ``throughput`` (req/s), ``latency`` (ms, p20/p50/p80), ``latency_p99`` (ms), and
``throughput_vs_in_process`` (x). The figure has requests/s and p50/p99 latency per client count.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(1 if _path == ROOT else 0, _path)

import harness  # noqa: E402
from harness import Row  # noqa: E402

START_RE = re.compile(r"serving \S+ at http://127\.0\.0\.1:(\d+)")


def _prompt(i: int) -> str:
    return f"Request {i}: please continue this sentence about long videos and context parallelism."


def _body(i: int, max_tokens: int) -> bytes:
    return json.dumps({"model": "tiny", "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": _prompt(i)}]}).encode()


def in_process(ckpt: str, n: int, max_tokens: int) -> list[float]:
    """Seconds per request of the same prompts through the processor + generate(), back to back."""
    from vita_ext.generation import GenerationConfig, generate
    from vita_ext.model.long_vita import LongVITAForCausalLM
    from vita_ext.processing import LongVITAProcessor

    model = LongVITAForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    processor = LongVITAProcessor.from_pretrained(ckpt)
    cfg = GenerationConfig.from_pretrained(ckpt).updated(max_new_tokens=max_tokens, do_sample=False, temperature=0)
    out = []
    for i in range(-2, n):  # two warm-up requests
        t0 = time.perf_counter()
        inputs = processor(_prompt(i))
        generate(model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"], generation_config=cfg)
        if i >= 0:
            out.append(time.perf_counter() - t0)
    return out


class ServerProcess:
    def __init__(self, ckpt: str, threads: int):
        cmd = [sys.executable, "-m", "vita_ext", "serve", "--model", ckpt, "--port", "0", "--max-queue", "100000",
               "--no-access-log"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.port, lines = None, []
        for line in self.proc.stderr:
            lines.append(line)
            m = START_RE.search(line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain the per-request log

    def post(self, body: bytes) -> float:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        finally:
            conn.close()
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def load(server: ServerProcess, clients: int, n: int, max_tokens: int) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of n requests from `clients` concurrent clients."""
    counter = iter(range(n))
    lock = threading.Lock()

    def client() -> list[float]:
        out = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return out
            out.append(server.post(_body(i, max_tokens)))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        latencies = [x for f in futures for x in f.result()]
    return n / (time.perf_counter() - t0), latencies


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def plot(results: dict, peer_rps: float, path: str, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar([str(c) for c in levels], [results[c]["rps"] for c in levels], color="tab:blue", label="vita-ext serve")
    ax1.axhline(peer_rps, color="tab:gray", ls="--", label="generate() in-process, back to back")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("requests / s")
    ax1.set_title("throughput")
    ax1.set_ylim(0, 1.4 * max([peer_rps] + [results[c]["rps"] for c in levels]))
    ax1.legend(fontsize=8, loc="upper center")
    x = range(len(levels))
    ax2.plot(x, [results[c]["p50"] * 1e3 for c in levels], "o-", label="p50")
    ax2.plot(x, [results[c]["p99"] * 1e3 for c in levels], "s--", label="p99")
    ax2.set_xticks(list(x), [str(c) for c in levels])
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency, ms (send -> whole response)")
    ax2.set_title("latency")
    ax2.legend(fontsize=8)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = harness.parser("vita-ext serve: requests/s and latency at several client counts (CPU)")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests", type=int, default=128, help="requests per client count")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--png", default=os.path.join(HERE, "serve_tiny_cpu.png"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server and of the in-process peer alike (default 1: on a shared, "
                        "oversubscribed CPU, more threads spin against other jobs)")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    n = 4 if args.quick else args.requests
    if args.quick:
        levels = [c for c in levels if c <= 2] or [1]
    from vita_ext.model.checkpoint import write_random_checkpoint
    from vita_ext.model.presets import tiny

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(os.path.join(tmp, "tiny"), tiny(), seed=0)
        peer = in_process(ckpt, n, args.max_tokens)
        peer_rps = len(peer) / sum(peer)
        server = ServerProcess(ckpt, args.threads)
        results = {}
        try:
            for _ in range(3):
                server.post(_body(-1, args.max_tokens))  # warm-up
            for c in levels:
                rps, lat = load(server, c, n, args.max_tokens)
                results[c] = {"rps": rps, "p20": pct(lat, 0.2), "p50": statistics.median(lat), "p80": pct(lat, 0.8),
                              "p99": pct(lat, 0.99)}
                print(f"[serve] {c:3d} clients: {rps:6.1f} req/s ({rps / peer_rps:.2f}x in-process), latency "
                      f"p50 {results[c]['p50'] * 1e3:7.1f} ms, p99 {results[c]['p99'] * 1e3:7.1f} ms", flush=True)
        finally:
            server.stop()
    print(f"[serve] in-process generate(): {peer_rps:.1f} req/s, p50 {statistics.median(peer) * 1e3:.1f} ms")
    device = torch.device("cpu")
    rows = [Row("serve", "generate (in-process)", "c1", "throughput", "req/s", f"{args.max_tokens} new tokens",
                peer_rps, peer_rps, peer_rps),
            Row("serve", "generate (in-process)", "c1", "latency", "ms", f"{args.max_tokens} new tokens",
                pct(peer, 0.2) * 1e3, statistics.median(peer) * 1e3, pct(peer, 0.8) * 1e3)]
    for c, r in results.items():
        x = f"{args.max_tokens} new tokens"
        rows += [Row("serve", "vita-ext serve", f"c{c}", "throughput", "req/s", x, r["rps"], r["rps"], r["rps"]),
                 Row("serve", "vita-ext serve", f"c{c}", "latency", "ms", x, r["p20"] * 1e3, r["p50"] * 1e3,
                     r["p80"] * 1e3),
                 Row("serve", "vita-ext serve", f"c{c}", "latency_p99", "ms", x, *(3 * [r["p99"] * 1e3])),
                 Row("serve", "vita-ext serve", f"c{c}", "throughput_vs_in_process", "x", x,
                     *(3 * [r["rps"] / peer_rps]))]
    harness.append_rows(rows, args.csv, device)
    note = (f"vita-ext serve, tiny model (random weights), {args.max_tokens} new tokens, {n} requests per level, "
            f"{args.threads} torch thread(s)\n{harness.device_name(device)}, a shared and noisy machine; "
            f"torch {torch.__version__}, commit {harness.commit()}")
    if args.png:
        plot(results, peer_rps, args.png, note)
        print(f"[serve] figure: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
