"""``vita-ext serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a Long-VITA model,
in one process or context-parallel under torchrun. Needs the ``serve`` extra
(``pip install "vita_ext[serve]"``).

Modules: ``protocol`` (the wire format and errors), ``media`` (messages -> prompt + media, the media
root), ``engine`` (the queue and running one request on a rank), ``distributed`` (rank 0 <-> other ranks),
``app`` (routes), ``server`` (uvicorn, start and stop).
"""
from .server import ServeOptions, serve

__all__ = ["ServeOptions", "serve"]
