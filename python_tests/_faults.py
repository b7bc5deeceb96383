"""Kill a process at a chosen file-system step: the harness of the training fault tests.

``run_to_kill(fn, out_dir, kill_at)`` forks; the child counts every step that changes ``out_dir``
(creating a temporary directory, writing a file -- torch.save, safetensors, or a text file opened for
writing or appending --, renaming, deleting a tree) and SIGKILLs itself at step ``kill_at``: before it,
or, with ``torn=True`` for a file write, after writing half of it (a power cut mid-write). No
``except``/``finally`` of the code under test runs, as with a real kill. ``kill_at=None`` runs to the end
and returns the list of steps. The parent only waits, so each kill costs a fork, not a fresh
interpreter; ``in_parallel`` runs independent cases on both cores. POSIX only (fork).
"""
from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import tempfile

import torch


_real_open = builtins.open


class _Steps:
    def __init__(self, root: str, kill_at: int | None, torn: bool, log: str):
        self.root, self.kill_at, self.torn, self.log = os.path.abspath(root), kill_at, torn, log
        self.names: list[str] = []

    def mine(self, path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return path == self.root or path.startswith(self.root + os.sep)

    def step(self, name: str, path) -> bool:
        """Count a step; returns True when this step is the one to tear (write half, then die)."""
        self.names.append(f"{name} {os.path.relpath(os.path.abspath(os.fspath(path)), self.root)}")
        with _real_open(self.log, "w") as f:  # the parent reads how far the child got
            json.dump(self.names, f)
        if self.kill_at is not None and len(self.names) == self.kill_at:
            if self.torn:
                return True
            self.die()
        return False

    @staticmethod
    def die():
        os.kill(os.getpid(), signal.SIGKILL)


def _truncate_to_half(path: str, start: int) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(start + (size - start) // 2)


def _install(steps: _Steps) -> None:
    import vita_ext.model.shards as model_shards  # where safetensors shards are written

    real_open, real_rename, real_replace = builtins.open, os.rename, os.replace
    real_rmtree, real_mkdtemp, real_save = shutil.rmtree, tempfile.mkdtemp, torch.save
    real_save_file = model_shards.save_file

    def file_step(name, path, write):
        start = os.path.getsize(path) if name == "append" and os.path.exists(path) else 0
        tear = steps.step(name, path)
        result = write()
        if tear:
            _truncate_to_half(os.fspath(path), start)
            steps.die()
        return result

    class TornFile:
        """A text/binary file whose close() may tear it (written half) and kill."""

        def __init__(self, f, path, start, tear):
            self._f, self._path, self._start, self._tear = f, path, start, tear

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def __iter__(self):
            return iter(self._f)

        def close(self):
            self._f.close()
            if self._tear:
                _truncate_to_half(os.fspath(self._path), self._start)
                steps.die()

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and steps.mine(file):
            name = "append" if "a" in mode else "write"
            start = os.path.getsize(file) if name == "append" and os.path.exists(file) else 0
            tear = steps.step(name, file)
            return TornFile(real_open(file, mode, *args, **kwargs), file, start, tear)
        return real_open(file, mode, *args, **kwargs)

    def rename(src, dst, *a, **k):
        if steps.mine(dst):
            steps.step("rename", dst)
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        if steps.mine(dst):
            steps.step("replace", dst)
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if steps.mine(path):
            steps.step("rmtree", path)
        return real_rmtree(path, *a, **k)

    def mkdtemp(*a, **k):
        path = real_mkdtemp(*a, **k)
        if steps.mine(path):
            steps.step("mkdtemp", path)
        return path

    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and steps.mine(f):
            return file_step("torch.save", f, lambda: real_save(obj, f, *a, **k))
        return real_save(obj, f, *a, **k)

    def save_file(tensors, filename, *a, **k):
        if steps.mine(filename):
            return file_step("safetensors", filename, lambda: real_save_file(tensors, filename, *a, **k))
        return real_save_file(tensors, filename, *a, **k)

    builtins.open = open_
    os.rename, os.replace, shutil.rmtree, tempfile.mkdtemp, torch.save = rename, replace, rmtree, mkdtemp, save
    model_shards.save_file = save_file


def start(fn, out_dir: str, kill_at: int | None = None, torn: bool = False) -> tuple[int, str]:
    """Fork a child that runs ``fn()`` and is SIGKILLed at step ``kill_at`` of its changes to ``out_dir``
    (see the module docstring); returns (pid, log path) for ``finish``."""
    log = os.path.abspath(out_dir).rstrip(os.sep) + ".steps.json"
    with open(log, "w") as f:
        json.dump([], f)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)  # OpenMP's pool does not survive a fork
            _install(_Steps(out_dir, kill_at, torn, log))
            fn()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    return pid, log


def finish(child: tuple[int, str]) -> tuple[bool, list[str]]:
    """Wait for a child of ``start``: (killed by SIGKILL, the steps it counted). A child that raised
    (or exited non-zero) fails the caller."""
    pid, log = child
    _, status = os.waitpid(pid, 0)
    with open(log) as f:
        names = json.load(f)
    os.remove(log)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return True, names
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise AssertionError(f"the child failed ({status}) after steps {names[-3:]}")
    return False, names


def run_to_kill(fn, out_dir: str, kill_at: int | None = None, torn: bool = False) -> tuple[bool, list[str]]:
    """``start`` + ``finish``: run ``fn()`` in a child killed at step ``kill_at``; (killed, steps)."""
    return finish(start(fn, out_dir, kill_at, torn))


def in_parallel(jobs, width: int = 2) -> None:
    """Run ``jobs`` (each a function taking no argument that raises on failure) in forked children,
    ``width`` at a time; raises AssertionError naming the first job that failed."""
    jobs = list(enumerate(jobs))
    running: dict[int, int] = {}
    failed = []
    while jobs or running:
        while jobs and len(running) < width:
            k, job = jobs.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    torch.set_num_threads(1)
                    job()
                except BaseException:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                    code = 3
                os._exit(code)
            running[pid] = k
        pid, status = os.wait()
        k = running.pop(pid)
        if status != 0:
            failed.append(k)
    if failed:
        raise AssertionError(f"{len(failed)} job(s) failed, the first: number {min(failed)} (see stderr)")
