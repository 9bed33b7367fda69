"""The tensor-parallel process groups and the collectives every rank calls (gloo on CPU).

Two groups over the same ranks: the default group carries the collectives inside a step (input broadcast,
the all-reduces) under a short timeout, so a rank that hangs ends the step with an error; the control group
carries only the header that starts a step, under a long timeout, because workers wait on it while the
engine is idle. A rank that dies closes its sockets, so the peers' next collective fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from strata.errors import DistributedError

STEP_TIMEOUT = timedelta(seconds=120)  # one step's collectives (loading included: ranks load in parallel)
IDLE_TIMEOUT = timedelta(days=7)  # a worker waiting for the next step while the engine has no requests

_state: dict = {}


def rendezvous(rank: int, world_size: int, port: int, host: str = "127.0.0.1",
               timeout: timedelta = STEP_TIMEOUT) -> dist.TCPStore:
    """The key-value store of the group on host:port (rank 0 serves it); a worker marks itself ready."""
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    if rank:
        store.set(f"ready/{rank}", "1")
    return store


def init(store: dist.TCPStore, rank: int, world_size: int, timeout: timedelta = STEP_TIMEOUT) -> None:
    """Join the gloo group of `world_size` ranks meeting at `store` (see rendezvous)."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    _state.update(rank=rank, world_size=world_size, control=dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.clear()


def is_initialized() -> bool:
    return bool(_state)


def rank() -> int:
    return _state.get("rank", 0)


def world_size() -> int:
    return _state.get("world_size", 1)


def set_failure_handler(handler: Callable[[Exception], Exception] | None) -> None:
    """Rank 0: turns a failed collective into the one-line error naming the dead rank (launcher.py)."""
    _state["on_failure"] = handler


def _fail(err: Exception) -> Exception:
    handler = _state.get("on_failure")
    if handler is not None:
        return handler(err)
    return DistributedError(f"a collective failed, a peer rank is gone ({str(err).splitlines()[0]})")


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place."""
    try:
        dist.all_reduce(t)
    except (RuntimeError, dist.DistBackendError) as e:
        raise _fail(e) from None
    return t


def broadcast(t: torch.Tensor, control: bool = False) -> torch.Tensor:
    """Rank 0's `t` into every rank's `t` (same shape and dtype), in place."""
    try:
        dist.broadcast(t, src=0, group=_state["control"] if control else None)
    except (RuntimeError, dist.DistBackendError) as e:
        raise _fail(e) from None
    return t
