"""Test helpers for `vita-ext serve`: the real server in a subprocess on a free loopback port (the OS picks
it: --port 0, read back from the server's start line), raw HTTP with the standard library, and the
official openai client. Bounded everywhere: start-up, requests and shutdown all have timeouts."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from _utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_RE = re.compile(r"serving (\S+) at http://127\.0\.0\.1:(\d+) \(pid (\d+)")


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


class Server:
    """``vita-ext serve ARGS`` (``script``: a wrapper to run instead of ``-m vita_ext``; ``ranks`` > 0:
    under torchrun with --context-parallel). Output is collected in ``lines``."""

    def __init__(self, *args: str, script: str | None = None, ranks: int = 0, start_timeout: float = 180):
        launcher = [script] if script else ["-m", "vita_ext"]
        if ranks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(free_port()), *launcher, "serve", "--context-parallel"]
        else:
            cmd = [sys.executable, *launcher, "serve"]
        cmd += ["--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                                     cwd=ROOT)
        self.lines: list[str] = []
        self.port = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not start (exit {self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        while self.get("/health")[0] != 200:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server never became healthy:\n{self.log()}")
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = START_RE.search(line)
            if match and self.port is None:
                self.model, self.server_pid, self.port = match.group(1), int(match.group(3)), int(match.group(2))

    def log(self) -> str:
        return "".join(self.lines[-200:])

    # ------------------------------------------------------------------------------ raw HTTP
    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 120):
        """(status, headers, parsed JSON or raw text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return resp.status, dict(resp.getheaders()), parsed
        except (ConnectionError, OSError):
            return 0, {}, None
        finally:
            conn.close()

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, body, key: str | None = None, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        return self.request("POST", "/v1/chat/completions", body, headers=headers, **kw)

    def health(self) -> dict:
        return self.get("/health")[2]

    def client(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    # ------------------------------------------------------------------------------ lifecycle
    def pids(self) -> list[int]:
        """This process and its descendants (the torchrun ranks)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return out

    def stop(self, sig=signal.SIGTERM, pid: int | None = None, timeout: float = 60) -> int:
        """Send ``sig`` (to ``pid``, default the server process) and wait for the server to exit."""
        if self.proc.poll() is None:
            os.kill(pid or self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def chat(content, **kw) -> dict:
    """A chat request body with one user message."""
    return {"messages": [{"role": "user", "content": content}], **kw}


def sse_events(raw: str) -> list:
    """The JSON payloads (and the final "[DONE]") of a server-sent-event body."""
    out = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
