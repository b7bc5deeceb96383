"""Run the server: uvicorn in the main thread, the engine in its own thread; under context parallelism
rank 0 does that and every other rank follows rank 0's messages (it never opens a port).

Stopping: SIGINT/SIGTERM on rank 0 (or a client-free Ctrl-C) refuses new requests, stops the running
generation at its next token, lets uvicorn close the connections, then tells the other ranks to stop
(STOP), and every rank tears down the process group and exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

import torch.distributed as dist
import uvicorn

from vita_ext.generation import GenerationConfig

from . import distributed as cpd
from .app import AppConfig, build_app
from .engine import Engine, Worker, follow

log = logging.getLogger("vita_ext.serve")


@dataclass
class ServeOptions:
    """``vita-ext serve`` settings (see its --help). max_model_len None: the model's max_position_embeddings."""
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "vita-ext-default"
    api_key: str | None = None
    media_root: str | None = None
    max_model_len: int | None = None
    max_frames: int = 128
    max_tiles: int = 12
    max_queue: int = 64
    max_body_mb: float = 64.0
    cp_timeout: float = 600.0
    log_level: str = "info"
    access_log: bool = True


class _Server(uvicorn.Server):
    """uvicorn's server, telling the engine at the first signal (not after the open requests finish)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_shutdown()
        super().handle_exit(sig, frame)


def _setup_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[vita-ext serve] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def _max_model_len(model, requested: int | None) -> int:
    limit = model.config.text.max_position_embeddings
    if requested is None:
        return limit
    if not 1 <= requested <= limit:
        raise ValueError(f"--max-model-len must be in [1, {limit}] (the model's max_position_embeddings), "
                         f"got {requested}")
    return requested


def _check(options: ServeOptions) -> None:
    for name, value in (("--max-frames", options.max_frames), ("--max-tiles", options.max_tiles),
                        ("--max-queue", options.max_queue)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if options.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be > 0, got {options.max_body_mb}")


def serve(model, processor, generation_config: GenerationConfig, options: ServeOptions,
          context_parallel: bool = False) -> int:
    """Serve ``model`` until stopped; returns the exit status (0 after a clean stop).

    context_parallel: the default process group is initialised (torchrun); every rank calls this, rank 0
    serves HTTP. Raises ValueError for bad options (before any port is opened)."""
    _setup_logging(options.log_level)
    _check(options)
    max_len = _max_model_len(model, options.max_model_len)
    control = cpd.control_group(2 * options.cp_timeout + 60) if context_parallel else None
    worker = Worker(model, processor, generation_config, max_len, control)
    if context_parallel and dist.get_rank() != 0:
        return follow(worker)
    try:
        sock = _listen(options.host, options.port)
        engine = Engine(worker, options.max_queue)
        app = build_app(engine, AppConfig(options.model_name, max_len, options.max_frames, options.max_tiles,
                                          options.api_key, int(options.max_body_mb * 2**20), options.media_root),
                        generation_config)
        config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                                access_log=options.access_log, timeout_graceful_shutdown=5, lifespan="off")
        server = _Server(config, engine)
        engine.on_fatal = lambda: setattr(server, "should_exit", True)
        engine.start()  # from here on, the engine tells the other ranks to stop when it ends
    except BaseException:
        if context_parallel:  # the other ranks wait for rank 0's first message: make it STOP
            cpd.send(cpd.STOP, control)
        raise
    host, port = sock.getsockname()[:2]
    if options.media_root is None and options.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening beyond this host without --media-root: clients can make the server read any "
                    "image or video file this process can read")
    where = f"{dist.get_world_size()} ranks, context parallel" if context_parallel else "one process"
    log.info("serving %s at http://%s:%d (pid %d, %s, max model len %d, queue %d) -- POST /v1/chat/completions",
             options.model_name, host if ":" not in host else f"[{host}]", port, os.getpid(), where, max_len,
             options.max_queue)
    restore = None
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises a captured SIGTERM after its graceful shutdown; turn it into a clean exit.
        restore = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run(sockets=[sock])
    finally:
        engine.join(timeout=60)
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    return 1 if worker.broken else 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: the OS picks one); ValueError naming the address if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _exit_on_sigterm(signum, frame):
    raise SystemExit(0)
