"""Failing together: when one rank of a multi-process run fails, every rank learns it within about a
second and stops with the same one-line reason, instead of waiting in a collective for the timeout.

Two pieces, for the two phases of a run:

- ``agree(group, fn)``: the local work of a phase (load the model, decode the media, read the data)
  runs on every rank, then ONE collective exchanges the verdicts (``all_gather_object`` of an error
  line or None). If any rank failed, every rank raises the same ``RankFailure`` (the lowest failing
  rank's reason). Use it before the first collective of a run, so no rank is ever left inside one.
- ``FailureWatch``: for what follows (ring attention, decode, training steps), where a failing rank
  cannot join the collective its peers are blocked in. The failing rank ``publish``-es its reason in
  the process group's key-value store (the TCPStore torchrun set up) and waits a moment for the
  others to acknowledge; every rank runs a daemon thread that polls the store and hands a published
  failure to ``on_failure`` (the CLI prints the line and exits), even while its main thread is
  blocked in a collective. The first failure published wins, so all ranks report the same one. Every
  rank, the winner included, acknowledges after it has printed the reason and then waits until every
  rank has: torchrun stops the other ranks as soon as one exits with an error, so a rank that left
  before a peer's line was out could cut it off (two ranks that both raised the same agreed failure
  lost one line that way under load).

A rank killed outright (SIGKILL, a segfault) cannot publish; its peers then fail in their next
collective (gloo reports the closed connection at once) and ``torchrun`` stops the rest.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

USER_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
               ValueError)
STORE_KEY = "vita_ext/failure"


class RankFailure(RuntimeError):
    """A failure on some rank of a group, raised (or reported) on every rank with the same text.

    rank: the rank where it happened; reason: one line ("rank 1: cannot read image a.png: ..."); exit_code:
    2 for an error the user can fix (a bad file or setting), 1 for anything else."""

    def __init__(self, reason: str, rank: int, exit_code: int = 1):
        super().__init__(reason)
        self.reason, self.rank, self.exit_code = reason, rank, exit_code

    def encode(self) -> str:
        return f"{self.exit_code}\n{self.rank}\n{self.reason}"

    @classmethod
    def decode(cls, text: str | bytes) -> RankFailure:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        code, rank, reason = text.split("\n", 2)
        return cls(reason, int(rank), int(code))


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name for a bug, so the line says what broke)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    if isinstance(exc, RankFailure) or (isinstance(exc, USER_ERRORS) and line):
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def failure_from(exc: BaseException, rank: int) -> RankFailure:
    """The RankFailure describing ``exc`` raised on ``rank`` (kept as is if it already is one)."""
    if isinstance(exc, RankFailure):
        return exc
    code = 2 if isinstance(exc, USER_ERRORS) else 1
    return RankFailure(f"rank {rank}: {one_line(exc)}", rank, code)


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised; launch with `torchrun --nproc-per-node P ...` "
                           "or call torch.distributed.init_process_group() first")
    return dist.get_rank(group), dist.get_world_size(group)


def verdict(error: BaseException | None, group=None) -> None:
    """Collective: every rank passes its local error (or None); if any rank failed, raise on every rank
    the RankFailure of the lowest failing rank (with a count of the others). One all_gather_object."""
    rank, world = _rank_world(group)
    mine = None if error is None else failure_from(error, rank).encode()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    failed = [RankFailure.decode(e) for e in everyone if e]
    if not failed:
        return
    first = failed[0]
    more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
    raise RankFailure(first.reason + more, first.rank, first.exit_code)


def agree(group, fn: Callable, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on every rank of ``group``, then agree on the outcome: its result on
    every rank, or the same ``RankFailure`` raised on every rank if it raised on any (see ``verdict``)."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    verdict(error, group)
    return result


def _default_store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a group initialised from a file): no watch
        return None


class FailureWatch:
    """Publish a failure to every rank and hear of theirs (see the module docstring).

    on_failure(failure): called once, from the watch thread, when ANOTHER rank published a failure;
        it should report it, call ``acknowledge()`` (which waits for every rank's), and stop the process (the CLI's
        ``exit_on_failure(failure, watch.acknowledge)`` prints ``failure.reason``, acknowledges and exits
        with its exit_code); if it returns, the watch acknowledges.
    poll_s: how often the store is polled; grace_s: how long ``acknowledge`` waits for the other ranks
    to acknowledge (they have printed the reason by then). The watch is inert without a process group.
    """

    def __init__(self, on_failure: Callable[[RankFailure], None], group=None, poll_s: float = 0.1,
                 grace_s: float = 5.0, key: str = STORE_KEY):
        self.on_failure, self.poll_s, self.grace_s, self.key = on_failure, poll_s, grace_s, key
        self.rank, self.world = _rank_world(group)
        self.store = _default_store()
        self.failure: RankFailure | None = None  # the failure this rank reported, once there is one
        self._stop = threading.Event()
        self._handled = threading.Lock()  # taken by whoever reports: the watch thread or publish()
        self._reported = threading.Event()
        self._acked = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FailureWatch:
        if self.store is not None and self.world > 1:
            self._thread = threading.Thread(target=self._poll, name="vita_ext-failure-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.poll_s + 1)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if not self.store.check([self.key]):
                    continue
                failure = RankFailure.decode(self.store.get(self.key))
            except Exception:  # noqa: BLE001 - the store is gone (rank 0 exited): nothing more to hear
                return
            if failure.rank == self.rank or not self._handled.acquire(blocking=False):
                return  # the main thread is reporting (its own failure, or it heard first)
            self.failure = failure
            try:
                self.on_failure(failure)
                self.acknowledge()
            finally:
                self._reported.set()
            return

    def acknowledge(self) -> None:
        """Call once this rank has printed the reason: count it, then wait (up to ``grace_s``) until
        every rank of the group has, so that no rank exits -- and makes torchrun stop the rest -- before
        every line is out. A rank that died without acknowledging costs the others ``grace_s``."""
        if self._acked or self.store is None or self.world == 1:
            return
        self._acked = True
        try:
            self.store.add(self.key + "/ack", 1)
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and self.store.add(self.key + "/ack", 0) < self.world:
                time.sleep(self.poll_s / 2)
        except Exception:  # noqa: BLE001 - the store is gone: so are the ranks it would wait for
            pass

    def publish(self, exc: BaseException) -> RankFailure:
        """Report ``exc`` (raised on this rank) to every rank and return the failure every rank reports:
        this one, or another rank's that was published first. Either way the caller then prints it and
        calls ``acknowledge()``. Without a store (or alone) it only builds the RankFailure."""
        failure = failure_from(exc, self.rank)
        if self.store is None or self.world == 1:
            return failure
        if not self._handled.acquire(blocking=False):  # the watch thread is reporting a peer's failure
            self._reported.wait(self.grace_s)
            return self.failure or failure
        try:
            failure = RankFailure.decode(self.store.compare_set(self.key, "", failure.encode()))
        except Exception:  # noqa: BLE001 - the store is gone: so are the other ranks
            pass
        self.failure = failure
        self._reported.set()
        return failure


def exit_on_failure(failure: RankFailure, acknowledge: Callable[[], None] | None = None) -> None:
    """``on_failure`` for command-line tools: print the reason as one line, then ``acknowledge()``
    (``FailureWatch.acknowledge``: the line is out; it returns when every rank's is), and end the process now (the main thread may be
    blocked in a collective, so nothing can unwind it)."""
    print(f"vita-ext: error: {failure.reason}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if acknowledge is not None:
        acknowledge()
    os._exit(failure.exit_code)


__all__ = ["FailureWatch", "RankFailure", "USER_ERRORS", "agree", "exit_on_failure", "failure_from", "one_line",
           "verdict"]
