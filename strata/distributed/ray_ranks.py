"""--distributed-executor-backend ray: the tensor-parallel worker ranks as Ray actors instead of local processes.

Each worker rank is an actor (asking Ray for no CPUs) whose one long call runs the same worker loop as a
`mp` process (launcher._worker_main); rank 0 stays the engine's process. `RayRank` gives rank 0 the handle a
multiprocessing.Process gives (exitcode, join, is_alive, terminate), so launcher.py watches and stops both
kinds the same way. A Ray cluster is joined when RAY_ADDRESS names one (`ray start --head` elsewhere),
otherwise a local one is started. The ranks meet at rank 0's node address.
"""

from __future__ import annotations

from strata.errors import ConfigError


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--distributed-executor-backend ray needs Ray: pip install 'strata[distributed]'") from None
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


class _RankActor:
    def run(self, rank: int, world: int, host: str, port: int, path: str, fields: dict) -> None:
        from strata.distributed.launcher import _worker_main

        _worker_main(rank, world, port, path, fields, host)


class RayRank:
    """A worker rank's actor, watched like a multiprocessing.Process."""

    def __init__(self, actor, ref, name: str):
        self.actor, self.ref, self.name = actor, ref, name
        self._code: int | None = None

    @property
    def exitcode(self) -> int | None:
        """None while it runs; 0 once it returned, 1 after an error in it, -9 once its actor died."""
        if self._code is None:
            ray = _ray()
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    ray.get(self.ref)
                    self._code = 0
                except ray.exceptions.RayActorError:
                    self._code = -9
                except Exception:  # noqa: BLE001 - the worker raised: it printed its one line
                    self._code = 1
        return self._code

    def join(self, timeout: float | None = None) -> None:
        _ray().wait([self.ref], timeout=timeout)

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        _ray().kill(self.actor)

    kill = terminate


def node_ip() -> str:
    """The address the ranks meet at: this node's, as Ray sees it."""
    return _ray().util.get_node_ip_address()


def start_ranks(world: int, host: str, port: int, path: str, fields: dict) -> list[RayRank]:
    """Actors for ranks 1..world-1, each already running its worker loop."""
    ray = _ray()
    cls = ray.remote(num_cpus=0)(_RankActor)
    ranks = []
    for r in range(1, world):
        actor = cls.remote()
        ranks.append(RayRank(actor, actor.run.remote(r, world, host, port, path, fields), f"tp-rank{r}"))
    return ranks
