"""One request at a time, in arrival order.

``Engine`` (rank 0) keeps a bounded FIFO of ``Job``s and one thread that runs them; past the bound a
request is refused with 429 and a Retry-After estimated from recent service times. ``Worker`` runs one
request on one rank: media + prompt -> processor inputs, the context-length budget, then
``vita_ext.generation.generate`` (one process) or ``vita_ext.parallel.cp_generate`` (every rank, ring
prefill and sharded-KV decode) with a streamer that hands text to the job. A job stops early when its
client goes away, a stop string appears, or the server shuts down: the streamer raises ``_Stop``
between two decode steps; under context parallelism rank 0's decision is broadcast first, so every rank
stops at the same token.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from vita_ext.generation import GenerationConfig, generate
from vita_ext.parallel import cp_generate

from . import distributed as cpd
from .media import Prompt, open_image, video_paths
from .protocol import APIError

log = logging.getLogger("vita_ext.serve")
INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
                UnicodeError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Request:
    """Everything a rank needs to run one request (picklable: broadcast to every rank)."""
    id: str
    prompt: Prompt
    max_frames: int
    max_tiles: int
    max_tokens: int | None = None
    seed: int | None = None
    overrides: dict = field(default_factory=dict)  # GenerationConfig fields (temperature, top_p, ...)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end token or stop string) | "length" (max_tokens) | "abort" (cancelled)
    prompt_tokens: int
    completion_tokens: int  # generated ids, the end token included
    timings: dict  # seconds: queue, preprocess, prefill (vision + prompt, to the first token), decode


class _Stop(Exception):
    """Raised by the streamer to end generation after the current token."""


def context_budget(prompt_tokens: int, max_tokens: int | None, default_max_new: int, max_model_len: int) -> int:
    """max_new_tokens for a prompt of ``prompt_tokens`` in a context of ``max_model_len`` positions.

    Without max_tokens: the model's default, cut to the room left (as vLLM does). Raises APIError(400,
    code "context_length_exceeded") when the prompt fills the context or prompt + max_tokens exceeds it."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens (text and vision), past the context length "
                            f"of {max_model_len}", "messages", "context_length_exceeded")
    if max_tokens is None:
        return min(default_max_new, room)
    if max_tokens > room:
        raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                            f"{prompt_tokens + max_tokens}, past the context length of {max_model_len}",
                       "max_tokens", "context_length_exceeded")
    return max_tokens


class StopText:
    """The reply text with stop strings applied: cut before the first stop string, and hold back the last
    ``len(longest stop) - 1`` characters while streaming (they may be the start of one)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, piece: str) -> bool:
        """Append a piece; True once a stop string has appeared (the text is then final)."""
        if self.hit or not piece:
            return self.hit
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[:min(found)], True
        return self.hit

    def take(self, final: bool = False) -> str:
        """Text not yet handed out that can no longer change."""
        end = len(self.text) if final or self.hit else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


class Job:
    """One request on rank 0, between the engine thread and the asyncio handler that waits for it.
    Events (``kind``, value): ("started", None) inputs are ready; ("text", str) (streaming jobs only);
    ("done", Result); ("error", APIError)."""

    def __init__(self, request: Request, stops: list[str], loop: asyncio.AbstractEventLoop, stream: bool = True):
        self.request, self.loop, self.stream = request, loop, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stopping: threading.Event | None = None  # the engine's, set on submit
        self.text = StopText(stops)
        self.enqueued = time.perf_counter()

    def post(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def feed(self, piece: str, final: bool = False) -> bool:
        """Hand a piece of text to the client; True when generation should stop here."""
        hit = self.text.add(piece)
        out = self.text.take(final)
        if out and self.stream:  # a whole answer needs no pieces: it is in the Result
            self.post("text", out)
        return hit or self.cancelled.is_set() or bool(self.stopping and self.stopping.is_set())

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs requests on this rank. ``control`` is None in one process; under context parallelism it is
    the control group (see ``distributed``) and the model's collectives use the default group."""

    def __init__(self, model, processor, generation_config: GenerationConfig, max_model_len: int, control=None):
        self.model, self.processor, self.gen_cfg = model, processor, generation_config
        self.max_model_len, self.control = max_model_len, control
        self.broken = False  # a failure inside a collective: the process group can no longer be trusted

    @property
    def parallel(self) -> bool:
        return self.control is not None

    def _prepare(self, request: Request):
        p = request.prompt
        images = [open_image(m) for m in p.images]
        with video_paths(p.videos) as videos:
            inputs = self.processor(p.text, images=images or None, videos=videos or None, chat=False,
                                    max_frames=request.max_frames, max_tiles=request.max_tiles)
        n = inputs["input_ids"].shape[1]
        max_new = context_budget(n, request.max_tokens, self.gen_cfg.max_new_tokens, self.max_model_len)
        return inputs, self.gen_cfg.updated(max_new_tokens=max_new, **request.overrides)

    def _agreed_inputs(self, request: Request):
        inputs, cfg, error = None, None, None
        try:
            inputs, cfg = self._prepare(request)
        except APIError as exc:
            error = exc
        except INPUT_ERRORS as exc:
            error = APIError(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: 500, after the other ranks hear of it
            log.exception("request %s: preparing the inputs failed", request.id)
            error = APIError(500, f"preparing the inputs failed: {type(exc).__name__}: {exc}")
        if self.parallel:
            error = cpd.agree_on_error(error, self.control)
        if error is not None:
            raise error
        return inputs, cfg

    def run(self, request: Request, job: Job | None = None) -> Result | None:
        """Run ``request`` on this rank; ``job`` (rank 0) receives the text. Returns the Result on rank 0,
        None elsewhere. Raises APIError (the same status on every rank)."""
        t0 = time.perf_counter()
        inputs, cfg = self._agreed_inputs(request)
        if job is not None:
            job.post("started")
        stream = self.processor.tokenizer.stream(skip_special_tokens=True)
        clock = {"n": 0, "first": None}

        def on_token(token: int) -> None:
            clock["n"] += 1
            clock["first"] = clock["first"] or time.perf_counter()
            stop = job.feed(stream.put(token)) if job is not None else False
            if self.parallel:
                stop = cpd.broadcast_flag(stop, self.model.device)
            if stop:
                raise _Stop

        t1 = time.perf_counter()
        outcome = self._generate(request, inputs, cfg, on_token)
        t2 = time.perf_counter()
        if job is None:
            return None
        if outcome != "interrupted":
            job.feed(stream.finish(), final=True)
        job.feed("", final=True)  # what was held back for a possible stop string
        n, first = clock["n"], clock["first"] or t2
        timings = {"queue": t0 - job.enqueued, "preprocess": t1 - t0, "prefill": first - t1, "decode": t2 - first,
                   "decode_tokens_per_s": (n - 1) / (t2 - first) if n > 1 and t2 > first else 0.0}
        finish = {"eos": "stop", "length": "length", "interrupted": "abort"}[outcome]
        finish = "stop" if job.text.hit else finish
        return Result(job.text.text, finish, int(inputs["input_ids"].shape[1]), n,
                      {k: round(v, 6) for k, v in timings.items()})

    def _generate(self, request: Request, inputs, cfg: GenerationConfig, on_token) -> str:
        args = (self.model, inputs["input_ids"], inputs["pixel_values"], inputs["context_positions"])
        try:
            if self.parallel:
                out = cp_generate(*args, generation_config=cfg, seed=request.seed, streamer=on_token)
            else:
                out = generate(*args, generation_config=cfg, seed=request.seed, streamer=on_token)
        except _Stop:
            return "interrupted"
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500
            raise self._generation_failed(request, exc) from exc
        return "eos" if out.stopped_on_eos else "length"

    def _generation_failed(self, request: Request, exc: Exception) -> APIError:
        log.exception("request %s: generation failed", request.id)
        error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}")
        if not self.parallel:
            return error
        # Each rank raised; if all raised the same error (cp_generate's own agreement), they stopped at the
        # same collective and the group is fine. Otherwise a rank failed inside a collective that the others
        # waited on until its timeout: that group cannot be trusted again.
        verdicts: list = [None] * torch.distributed.get_world_size(self.control)
        torch.distributed.all_gather_object(verdicts, error.message, group=self.control)
        if len(set(verdicts)) > 1:
            self.broken = True
            log.error("context parallel: the ranks failed at different points (%s); stopping the server, as the "
                      "process group is no longer usable", " | ".join(verdicts))
        return APIError(500, verdicts[0] if len(set(verdicts)) == 1 else
                        "; ".join(f"rank {r}: {m}" for r, m in enumerate(verdicts)))


class Engine:
    """Rank 0's queue and the thread that runs the jobs one at a time (and, under context parallelism,
    sends each to the other ranks first)."""

    def __init__(self, worker: Worker, max_queue: int, heartbeat_s: float = 1.0):
        if max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
        self.worker, self.max_queue, self.heartbeat_s = worker, max_queue, heartbeat_s
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.stopping = threading.Event()
        self.running: Job | None = None
        self.stats = {"served": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._service_s = 1.0  # moving average of one job's time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="vita-ext-engine", daemon=True)
        self.on_fatal = lambda: None  # set by the server: stop accepting requests

    # ---- asyncio side --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises APIError 503 while shutting down, 429 (with Retry-After) when full."""
        with self._cond:
            if self.stopping.is_set():
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected"] += 1
                wait = self._service_s * (len(self._queue) + 1)
                raise APIError(429, f"the server is busy: {len(self._queue)} requests are waiting (--max-queue "
                                    f"{self.max_queue}); retry later", code="queue_full",
                               retry_after=max(1, min(3600, math.ceil(wait))))
            job.stopping = self.stopping
            self._queue.append(job)
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            return {"queued": len(self._queue), "running": self.running is not None, **self.stats}

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and not self.stopping.is_set() and not self.worker.broken

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new requests, stop the running one at its next token, fail the queued ones (503)."""
        with self._cond:
            self.stopping.set()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.begin_shutdown()
        self._thread.join(timeout)

    # ---- engine thread -------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cond:
            if not self._queue and not self.stopping.is_set():
                self._cond.wait(self.heartbeat_s)
            if self.stopping.is_set() or not self._queue:
                return None
            self.running = self._queue.popleft()
            return self.running

    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                job = self._next()
                if job is None:
                    if self.worker.parallel and not self.stopping.is_set():
                        cpd.send(cpd.NOOP, self.worker.control)
                    continue
                self._run(job)
                if self.worker.broken:
                    self.on_fatal()
                    break
        except Exception:  # noqa: BLE001 - the control channel failed (a rank died): nothing can be served
            log.exception("the engine stopped")
            self.on_fatal()
        finally:
            self.begin_shutdown()
            self._fail_queued()
            if self.worker.parallel and not self.worker.broken:
                try:
                    cpd.send(cpd.STOP, self.worker.control)
                except Exception as exc:  # noqa: BLE001 - a peer is already gone
                    log.warning("could not tell the other ranks to stop: %s", exc)

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                return
            if self.worker.parallel:
                cpd.send(job.request, self.worker.control)
            result = self.worker.run(job.request, job)
            if result.finish_reason == "abort" and job.cancelled.is_set():
                self.stats["cancelled"] += 1
                log.info("request %s: client gone, stopped after %d tokens", job.request.id, result.completion_tokens)
            elif result.finish_reason == "abort":
                job.post("error", APIError(503, "the server is shutting down", code="shutting_down"))
            else:
                self.stats["served"] += 1
                job.post("done", result)
                t = result.timings
                log.info("request %s: %d prompt + %d new tokens, %s | queue %.3f s, preprocess %.3f s, prefill "
                         "%.3f s, decode %.3f s (%.1f tokens/s)", job.request.id, result.prompt_tokens,
                         result.completion_tokens, result.finish_reason, t["queue"], t["preprocess"], t["prefill"],
                         t["decode"], t["decode_tokens_per_s"])
        except APIError as exc:
            self.stats["failed"] += 1
            log.info("request %s: %d %s", job.request.id, exc.status, exc.message)
            job.post("error", exc)
        except Exception as exc:  # noqa: BLE001 - a bug in the engine itself; keep serving
            self.stats["failed"] += 1
            log.exception("request %s failed", job.request.id)
            job.post("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            with self._cond:
                self.running = None
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - start)

    def _fail_queued(self) -> None:
        with self._cond:
            jobs, self._queue = list(self._queue), collections.deque()
        for job in jobs:
            job.post("error", APIError(503, "the server is shutting down", code="shutting_down"))


def follow(worker: Worker) -> int:
    """Ranks > 0: run what rank 0 sends until it says STOP. Returns the exit status: 0 after STOP, 1 when
    rank 0 is gone (its connection closed: killed, or crashed) or the process group broke."""
    rank = torch.distributed.get_rank()
    while True:
        try:
            message = cpd.receive(worker.control)
            if message == cpd.NOOP:
                continue
            if message == cpd.STOP:
                return 0
            try:
                worker.run(message)
            except APIError:
                pass  # rank 0 has the same verdict and answers the client
        except Exception as exc:  # noqa: BLE001 - a collective failed: rank 0 or a peer is gone
            log.error("rank %d: lost contact with the other ranks (%s: %s); stopping", rank, type(exc).__name__,
                      str(exc).splitlines()[0] if str(exc) else "")
            return 1
        if worker.broken:
            return 1
