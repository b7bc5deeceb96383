"""How the ranks of a context-parallel server stay in step.

Rank 0 holds the HTTP server. Every message it sends the other ranks goes over a separate gloo group
(the *control* group), so it never interleaves with the model's collectives on the default group:
    a Request   -> every rank runs it (``Worker.run``);
    NOOP        -> a heartbeat, sent every second while idle, so waiting ranks return to Python (and see
                   signals) and never reach the group's timeout;
    STOP        -> every rank leaves its loop and tears down the process group.
Before the first model collective of a request, the ranks exchange their input verdicts
(``agree_on_error``), so bad input seen by one rank only (a file that rank cannot read) fails the
request on every rank at the same point, and the group stays usable for the next request.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .protocol import APIError

NOOP = "noop"
STOP = "stop"


def control_group(timeout_s: float):
    """A gloo group over all ranks for rank 0's messages and the error verdicts (every rank calls this)."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def send(message, group) -> None:
    """Rank 0: broadcast ``message`` (a Request, NOOP or STOP) to every rank of ``group``."""
    dist.broadcast_object_list([message], src=0, group=group)


def receive(group):
    """Ranks > 0: the next message rank 0 broadcast over ``group``."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def agree_on_error(error: APIError | None, group) -> APIError | None:
    """Every rank's verdict (None = ok) -> one verdict, the same on every rank: None when all are ok,
    else the worst status (500 over 400) with each failing rank's message.

    This is the serving variant of ``vita_ext.parallel.agree`` (which keeps no HTTP status): a failure on
    any rank becomes an APIError on all of them at the same point, with no collective left pending."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, error, group=group)
    failed = [(r, e) for r, e in enumerate(verdicts) if e is not None]
    if not failed:
        return None
    status = max(e.status for _, e in failed)
    if len(failed) == world and len({e.message for _, e in failed}) == 1:
        message = failed[0][1].message  # the same failure everywhere: say it once
    else:
        message = "; ".join(f"rank {r}: {e.message}" for r, e in failed)
    first = failed[0][1]
    return APIError(status, message, first.param, first.code)


def broadcast_flag(flag: bool, device: torch.device, group=None) -> bool:
    """Rank 0's ``flag`` on every rank (one int on the default group, between two decode steps)."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0, group=group)
    return bool(t.item())
