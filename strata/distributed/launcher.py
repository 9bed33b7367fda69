"""Starts the tensor-parallel ranks (`--distributed-executor-backend mp`, or Ray actors: ray_ranks.py) and keeps
them in step.

Rank 0 is the engine's process: it runs the scheduler and the sampler, and a forward pre-hook on its model
broadcasts each forward's inputs (token ids, positions, attention metadata, logits rows) as int64 tensors, so
the workers run the same forward on their shards; the all-reduces inside the layers keep every rank's
hidden states identical. Workers are spawned with torch.multiprocessing, each with its own torch threads
(one unless --num-threads), and are handed their rank and the EngineConfig as Process arguments (pickled
by multiprocessing between our own processes at start; every step after that travels as tensors).

A rank that dies ends the others: rank 0 raises DistributedError naming the rank and its exit code and stops
the rest; a worker whose peer is gone prints one line and exits.
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
import sys
import time
import weakref

import torch
import torch.multiprocessing as mp

from strata.config import EngineConfig
from strata.distributed import parallel_state
from strata.distributed.expert_parallel import choose_placement
from strata.distributed.tensor_parallel import Shard, check_supported, parallelize
from strata.errors import DistributedError, StrataError, UnsupportedError
from strata.layers.attention import AttentionMetadata
from strata.layers.kv_cache import allocate_kv_caches
from strata.layers.quant_embedding import compute_dtype
from strata.models.base import CausalLM
from strata.models.registry import load_config

OP_FORWARD, OP_STOP = 1, 2
# header: op, tokens, sequences, context slots in all, cache slots (0 = no cache), logits rows (-1 = all),
# has slot mapping
HEADER_LEN = 7
JOIN_TIMEOUT_S = 10
_FORWARD_ARGS = inspect.signature(CausalLM.forward)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_config(config: EngineConfig) -> None:
    for name in ("record_routing", "replay_routing", "speculative_config"):
        if getattr(config, name):
            raise UnsupportedError(f"--{name.replace('_', '-')} is not supported with --tensor-parallel-size > 1 yet")
    if config.memory_budget and not config.enable_expert_parallel:
        raise UnsupportedError("--memory-budget with --tensor-parallel-size > 1 needs --enable-expert-parallel "
                               "(each rank then tiers its own whole experts)")
    if config.memory_budget and (config.miss_fallback != "none" or config.prefetch != "none"):
        raise UnsupportedError("--memory-budget under expert parallel supports --miss-fallback none and --prefetch "
                               "none only")


def _load(path: str, config: EngineConfig, rank: int, progress: bool, placement: torch.Tensor | None = None):
    """Load this rank's shard -> (model, TierRuntime or None). Expert parallel: every rank receives rank 0's
    [L, E] placement first; with --memory-budget each rank tiers its own experts within that budget."""
    from strata.tiers.runtime import load_model_tiered

    if config.enable_expert_parallel:
        if placement is None:
            cfg = load_config(path)
            placement = torch.empty(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
        placement = parallel_state.broadcast(placement)  # [L, E]
    model, tiers = load_model_tiered(path, config, progress and rank == 0,
                                     shard=Shard(rank, config.tensor_parallel_size, placement))
    parallelize(model, config.tensor_parallel_size, rank, placement)
    model.__dict__["expert_placement"] = placement  # not a buffer: outside the state dict
    return model, tiers


# ---- rank 0 ------------------------------------------------------------------------------------------------
class _Ranks:
    """Rank 0's handle on the worker processes: stop them, and name the one that died."""

    def __init__(self, procs):
        self.procs = procs
        self.stopped = False

    def wait_ready(self, store) -> None:
        """Wait until every worker reached the store; one that exits first (a spawn error) ends the wait."""
        deadline = time.monotonic() + parallel_state.STEP_TIMEOUT.total_seconds()
        keys = [f"ready/{r}" for r in range(1, len(self.procs) + 1)]
        while not store.check(keys):
            dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs) if p.exitcode is not None]
            if dead:
                raise DistributedError(f"tensor-parallel rank {dead[0][0]} exited with code {dead[0][1]} while "
                                       "starting")
            if time.monotonic() > deadline:
                raise DistributedError(f"tensor-parallel ranks did not start within "
                                       f"{parallel_state.STEP_TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.05)

    def failure(self, err: Exception) -> Exception:
        for p in self.procs:
            p.join(timeout=1)  # a peer that closed its sockets is exiting: let its exit code arrive
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.procs) if p.exitcode is not None]
        self.stop(send=False)
        if dead:
            rank, code = dead[0]
            return DistributedError(f"tensor-parallel rank {rank} exited with code {code}; the other ranks "
                                    "were stopped")
        return DistributedError(f"tensor-parallel collective failed ({str(err).splitlines()[0]}); the ranks "
                                "were stopped")

    def stop(self, send: bool = True) -> None:
        if self.stopped:
            return
        self.stopped = True
        if send:
            try:
                header = torch.zeros(HEADER_LEN, dtype=torch.long)
                header[0] = OP_STOP
                parallel_state.broadcast(header, control=True)
            except StrataError:
                pass  # a worker already gone: terminated below
        for p in self.procs:
            p.join(timeout=JOIN_TIMEOUT_S)
            if p.is_alive():
                p.terminate()
                p.join()
        parallel_state.destroy()


def _broadcast_forward(model, args, kwargs):
    """Forward pre-hook on rank 0: send this forward's inputs to the workers."""
    bound = _FORWARD_ARGS.bind(model, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    ids, positions, meta, kv_caches, rows = a["input_ids"], a["positions"], a["meta"], a["kv_caches"], a[
        "logits_indices"]
    parts = [ids, positions, torch.tensor(meta.query_starts), torch.tensor(meta.query_lens),
             torch.tensor(meta.context_lens)]
    has_slots = meta.slot_mapping is not None and kv_caches is not None
    ctx = torch.cat(list(meta.context_slots)) if has_slots and meta.context_slots else torch.empty(0, dtype=torch.long)
    if has_slots:
        parts += [meta.slot_mapping, ctx]
    if rows is not None:
        parts.append(rows)
    header = torch.tensor([OP_FORWARD, ids.shape[0], len(meta.query_lens), ctx.shape[0],
                           kv_caches[0][0].shape[0] if has_slots else 0, -1 if rows is None else rows.shape[0],
                           int(has_slots)], dtype=torch.long)
    parallel_state.broadcast(header, control=True)
    parallel_state.broadcast(torch.cat([p.to(torch.long) for p in parts]))  # [payload]


def load_model_parallel(path: str, config: EngineConfig, progress: bool = True):
    """Spawn ranks 1..N-1, join the group as rank 0 and load rank 0's shard -> (a model whose forwards drive
    the workers, rank 0's TierRuntime or None). The workers stop when the model is garbage collected, at exit,
    or with `shutdown(model)`."""
    _check_config(config)
    check_supported(load_config(path), config.tensor_parallel_size, path,  # before any spawn
                    config.enable_expert_parallel)
    if parallel_state.is_initialized():
        raise UnsupportedError("one tensor-parallel engine per process: shut the previous one down first")
    world = config.tensor_parallel_size
    placement = None
    if config.enable_expert_parallel:  # chosen before any spawn: a bad trace ends here with one line
        placement, line = choose_placement(load_config(path), world, config.expert_placement_trace)
        if progress:
            print(line, file=sys.stderr)
    port = _free_port()
    fields = dataclasses.asdict(config)
    host = "127.0.0.1"
    if config.distributed_executor_backend == "ray":
        from strata.distributed.ray_ranks import node_ip, start_ranks

        host = node_ip()
        procs = start_ranks(world, host, port, path, fields)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(r, world, port, path, fields), daemon=True,
                             name=f"tp-rank{r}") for r in range(1, world)]
        for p in procs:
            p.start()
    ranks = _Ranks(procs)
    torch.set_num_threads(config.num_threads or 1)
    try:
        store = parallel_state.rendezvous(0, world, port, host)
        ranks.wait_ready(store)
        parallel_state.init(store, 0, world)
        parallel_state.set_failure_handler(ranks.failure)
        model, tiers = _load(path, config, 0, progress, placement)
        parallel_state.broadcast(torch.zeros(1), control=True)  # every rank loaded (a worker's error ends here)
    except BaseException:
        ranks.stop(send=False)
        raise
    model.register_forward_pre_hook(_broadcast_forward, with_kwargs=True)
    model.__dict__["_tp_ranks"] = ranks  # not a submodule
    weakref.finalize(model, ranks.stop)
    return model, tiers


def shutdown(model: CausalLM) -> None:
    """Stop the workers of a tensor-parallel model (no-op for a single-process model)."""
    ranks = model.__dict__.get("_tp_ranks")
    if ranks is not None:
        ranks.stop()


# ---- workers -----------------------------------------------------------------------------------------------
def _worker_main(rank: int, world: int, port: int, path: str, fields: dict, host: str = "127.0.0.1") -> None:
    config = EngineConfig(**fields)
    torch.set_num_threads(config.num_threads or 1)
    try:
        parallel_state.init(parallel_state.rendezvous(rank, world, port, host), rank, world)
        model, tiers = _load(path, config, rank, progress=False)  # tiers: this rank's expert cache, kept alive
        parallel_state.broadcast(torch.zeros(1), control=True)
        _serve(model)
        if tiers is not None:
            tiers.close()
    except StrataError as e:
        print(f"error: tensor-parallel rank {rank}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's process group; rank 0 reports it
        sys.exit(130)
    parallel_state.destroy()


@torch.inference_mode()
def _serve(model: CausalLM) -> None:
    """Run rank 0's forwards until it sends OP_STOP."""
    kv_caches = None
    dtype = compute_dtype(model)
    while True:
        try:
            header = parallel_state.broadcast(torch.zeros(HEADER_LEN, dtype=torch.long), control=True).tolist()
        except DistributedError:
            return  # rank 0 exited between steps (a server stopped by a signal): it reports its own errors
        op, T, S, num_ctx, num_slots, num_rows, has_slots = header
        if op == OP_STOP:
            return
        size = 2 * T + 3 * S + (T + num_ctx if has_slots else 0) + max(num_rows, 0)
        payload = parallel_state.broadcast(torch.empty(size, dtype=torch.long))  # [payload]
        ids, positions, starts, qlens, clens, rest = payload.split([T, T, S, S, S, size - 2 * T - 3 * S])
        clens_list = clens.tolist()
        meta = AttentionMetadata(starts.tolist(), qlens.tolist(), clens_list)
        caches = None
        if has_slots:
            if kv_caches is None or kv_caches[0][0].shape[0] != num_slots:
                kv_caches = allocate_kv_caches(model.kv_cache_spec(), num_slots, dtype)  # this rank's heads only
            slot_mapping, ctx, rest = rest.split([T, num_ctx, rest.shape[0] - T - num_ctx])
            meta.slot_mapping, meta.context_slots = slot_mapping, list(ctx.split(clens_list))
            caches = kv_caches
        rows = rest if num_rows >= 0 else None
        model(ids, positions, meta, caches, rows, return_hidden=True)  # the result is rank 0's to use
