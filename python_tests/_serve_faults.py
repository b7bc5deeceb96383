"""`python -m vita_ext` with faults injected into the server's request path, for the error-path tests.

A prompt holding ``FAULT:<kind>:<rank>`` fails on that rank only (``RANK`` from torchrun; 0 in one
process): kind ``input`` raises ValueError while the inputs are prepared (bad input that one rank
sees: a 400), ``bug`` raises RuntimeError there (a bug: a 500). Every other request runs unchanged.
Usage: python python_tests/_serve_faults.py serve [...] (also as the script of torchrun).
"""
import os
import sys

from vita_ext.cli import main
from vita_ext.serve import engine

RANK = int(os.environ.get("RANK", "0"))
_prepare = engine.Worker._prepare


def _prepare_with_faults(self, request):
    for kind, error in (("input", ValueError), ("bug", RuntimeError)):
        if f"FAULT:{kind}:{RANK}" in request.prompt.text:
            raise error(f"injected {kind} fault on rank {RANK}")
    return _prepare(self, request)


engine.Worker._prepare = _prepare_with_faults
raise SystemExit(main(sys.argv[1:]))
