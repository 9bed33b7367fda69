"""Benchmark: decode with experts on disk under a memory budget, routing replayed from the real
Mixtral traces, beside no cache, fully resident Strata, transformers+accelerate disk offload and llama.cpp.

    .venv/bin/python benchmarks/offload.py --layers 8 --decode 32       # 6.4 GiB model, 2.9-4.5 GiB limits

Every engine runs in its own subprocess with the model's files evicted from the page cache first
(posix_fadvise DONTNEED on those files only: other processes' caches stay). With --cgroup (the default where a
cgroup-v1 memory controller is writable, see benchmarks/memlimit.py) each budgeted child runs in a memory
cgroup of budget x --cgroup-slack, page cache included, so the mmap peers cannot keep a model larger than the
limit in RAM. Strata reads experts with O_DIRECT. The disk ceiling is measured in the same run (O_DIRECT
reads of the expert store) at the start and after every row, since a shared disk drifts; each engine's I/O
bound is the mean of the probes around its row over the bytes it made the kernel read per decoded token
(/proc/self/io). The peers route with their own (random-weight) routers: their numbers are
speed under the same memory, not the same expert sequence. Results: docs/benchmarks/tiers.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRACE = ROOT / ".." / "shared" / "data" / "mixtral-8x7b-routing" / "gsm8k_2_routing.jsonl"
CGROUP = {"on": False, "slack": 1.1}  # set by main(); children never read it

from benchmarks.child import run_child
from benchmarks.memlimit import MemCgroup, unavailable_reason
from benchmarks.offload_peers import proc_read_bytes
from benchmarks.synthetic import machine_rates
from strata.fileio import write_json_atomic


def evict(paths: list[Path]) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def _prompt(vocab: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, min(vocab, 30000), (n,), generator=torch.Generator().manual_seed(0)).tolist()


def _vmhwm() -> int:
    from strata.engine.stats import peak_rss_bytes

    return peak_rss_bytes()


# ---- children ----------------------------------------------------------------------------------------
def strata_budgets(path: str, fractions: list[float], threads: int) -> list[int]:
    """Budget for each fraction of the experts: runtime + resident + KV (64 MiB) + activations + the slots
    (at least 2 x top-k), plus half a slot of slack since RSS drifts. Run as a child: RSS is part of the plan."""
    import torch

    from strata.config import EngineConfig
    from strata.models.registry import load_config
    from strata.tiers import runtime
    from strata.tiers.store_convert import checkpoint_facts

    cfg = load_config(path)
    facts = checkpoint_facts(path)
    ecfg = EngineConfig(memory_budget=1 << 50, **_strata_kw(threads, None))
    for _ in range(2):  # the first plan's imports raise the RSS the second one measures
        fixed = runtime._plan(path, ecfg, cfg, torch.bfloat16, facts).fixed_bytes
    return [fixed + max(round(f * facts.num_experts), 2 * cfg.num_experts_per_tok) * facts.slot_bytes
            + facts.slot_bytes // 2 for f in fractions]


def _strata_kw(threads: int, trace: str | None) -> dict:
    return {"dtype": "bfloat16", "max_num_seqs": 1, "num_threads": threads, "max_num_batched_tokens": 256,
            "kv_cache_memory": 64 << 20, "replay_routing": trace}


def run_strata(path: str, budget: int | None, policy: str, prefetch: str, prompt_len: int, decode: int,
               threads: int, trace: str | None, kv_cache_memory: int | None = None) -> dict:
    import torch

    from strata import LLM, SamplingParams
    from strata.models.registry import load_config

    torch.set_num_threads(threads)
    cfg = load_config(path)
    kw = _strata_kw(threads, trace)
    if kv_cache_memory:
        kw["kv_cache_memory"] = kv_cache_memory
    if budget is not None:
        kw.update(memory_budget=budget, expert_cache_policy=policy, prefetch=prefetch)
    llm = LLM(path, progress=False, **kw)
    eng = llm.engine
    eng.add_request(_prompt(cfg.vocab_size, prompt_len), SamplingParams(temperature=0, max_tokens=decode,
                                                                        ignore_eos=True))
    t0 = time.perf_counter()
    eng.step()  # prefill + first token
    t1 = time.perf_counter()
    tiered = bool(eng.tier_stats and eng.tier_stats().get("tiered"))
    before = eng.tier_stats() if tiered else {}
    r1, n = proc_read_bytes(), 1
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    t2 = time.perf_counter()
    out = {"prefill_s": t1 - t0, "decode_tok_s": (n - 1) / (t2 - t1), "budget_bytes": budget,
           "peak_rss_bytes": _vmhwm(), "proc_read_bytes_per_token": (proc_read_bytes() - r1) / max(n - 1, 1)}
    if tiered:
        after = eng.tier_stats()
        steps = n - 1
        out.update({
            "expert_hit_rate": (after["expert_accesses"] - before["expert_accesses"]
                                - (after["expert_misses"] - before["expert_misses"]))
            / max(after["expert_accesses"] - before["expert_accesses"], 1),
            "disk_bytes_per_token": (after["disk_bytes_read"] - before["disk_bytes_read"]) / steps,
            "io_stall_s_per_token": (after["io_stall_s"] - before["io_stall_s"]) / steps,
            # the rate the engine's own reads achieved while they ran (one I/O worker), beside the probes
            "disk_read_gb_s_engine": (after["disk_bytes_read"] - before["disk_bytes_read"])
            / max(after["disk_read_s"] - before["disk_read_s"], 1e-9) / 1e9,
            "prefetch_coverage": after["prefetch_coverage"], "prefetch_waste_bytes": after["prefetch_waste_bytes"],
            "slots": after["expert_cache_slots"], "direct_io": after["direct_io"],
        })
    return out


def _child(fn: str, *args, limit: int | None = None, name: str = "", timeout: float = 1800) -> dict:
    """Runs `fn(*args)` (from benchmarks.offload or benchmarks.offload_peers) in a fresh interpreter, inside a
    memory cgroup of `limit` bytes when --cgroup is on; adds the cgroup's max usage to the result."""
    mod = "benchmarks.offload_peers" if fn in ("run_transformers", "run_llamacpp") else "benchmarks.offload"
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(MemCgroup(name or fn, limit)) if limit and CGROUP["on"] else None
        res = run_child(mod, fn, *args, timeout=timeout, preexec_fn=cg.enter if cg else None)
        if cg:
            res.update(cg.report())
            if res.get("cgroup_oom_kills"):
                res["error"] = f"killed by the memory cgroup's OOM killer (limit {limit / 2**30:.2f} GiB)"
    return res


def disk_read_gbs(store_dir: Path, reads: int = 64) -> float:
    """O_DIRECT reads of whole experts from the store, in random order (the access pattern of a miss)."""
    import random

    from strata.tiers.store import ExpertStore, alloc_aligned

    store = ExpertStore(store_dir, verify="never")
    keys = random.Random(0).sample(store.keys(), min(reads, len(store.keys())))
    mm, _ = alloc_aligned(store.slot_bytes)
    t0, total = time.perf_counter(), 0
    for k in keys:
        total += store.read_into(k, memoryview(mm))
    return total / (time.perf_counter() - t0) / 1e9


def main() -> None:
    from benchmarks.synthetic import synthetic_model
    from strata.models.registry import load_config
    from strata.tiers.store_convert import checkpoint_facts, default_store_dir, ensure_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budgets", default="0.25,0.5")
    ap.add_argument("--variants", default="nextuse+none,nextuse+hybrid,lru+none",
                    help="policy+prefetcher pairs run at every budget")
    ap.add_argument("--own-routing", default="nextuse+none",
                    help="policy+prefetcher also run at every budget with the model's own router, as the peers "
                         "route ('' to skip)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--peer-decode", type=int, default=16, help="decode tokens for the peers")
    ap.add_argument("--peer-time-cap", type=float, default=300, help="seconds of decode for transformers")
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared 2-core machine (no spin-wait)")
    ap.add_argument("--peers", default="transformers,llamacpp")
    ap.add_argument("--cgroup", action=argparse.BooleanOptionalAction, default=None,
                    help="run each budgeted engine in a memory cgroup of budget x --cgroup-slack (default: on "
                         "where possible)")
    ap.add_argument("--cgroup-slack", type=float, default=1.1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "tiers.json"))
    args = ap.parse_args()
    reason = unavailable_reason()
    if args.cgroup and reason:
        raise SystemExit(f"--cgroup: {reason}")
    CGROUP.update(on=args.cgroup is not False and reason is None, slack=args.cgroup_slack)
    print("memory cgroups: " + (f"on, limit = budget x {args.cgroup_slack:.2f}" if CGROUP["on"] else
                                f"off ({reason or '--no-cgroup'}): the peers are not held to the budget"),
          file=sys.stderr)
    path = synthetic_model(args.model, args.layers)
    trace = str(TRACE.resolve()) if TRACE.exists() else None
    store = ensure_store(path)
    facts = checkpoint_facts(path)
    vocab = load_config(path).vocab_size
    load_before = os.getloadavg()
    evict([store])
    bw0 = disk_read_gbs(store)
    rows = []
    bw1 = bw0  # the latest disk probe
    mem1 = machine_rates(args.threads)  # and memory probe, at the run's thread count

    def record(name: str, res: dict) -> None:
        # the shared disk and memory drift within a run: probe them again after each row, so every row carries the
        # mean of the probes just before and just after it
        nonlocal bw1, mem1
        evict([store])
        after, mem = disk_read_gbs(store), machine_rates(args.threads)
        res.update(engine=name, disk_o_direct_gb_s_row=(bw1 + after) / 2,
                   memory_read_gb_s_row=(mem1["memory"] + mem["memory"]) / 2,
                   gemv_bf16_gb_s_row=(mem1["gemv_bf16"] + mem["gemv_bf16"]) / 2)
        bw1, mem1 = after, mem
        rows.append(res)
        print(name, json.dumps(res), file=sys.stderr)

    def limit(budget: int) -> int:
        return int(budget * args.cgroup_slack)

    fracs = [float(b) for b in args.budgets.split(",")]
    budgets = dict(zip([*fracs, 0.0], _child("strata_budgets", str(path), [*fracs, 0.0], args.threads), strict=True))
    for frac in fracs:
        for variant in args.variants.split(","):
            policy, prefetch = variant.split("+")
            evict([path, store])
            record(f"strata {frac:.0%} {variant}", _child(
                "run_strata", str(path), budgets[frac], policy, prefetch, args.prompt_len, args.decode, args.threads,
                trace, limit=limit(budgets[frac]), name=f"strata-{frac}-{variant}"))
    for frac in fracs if args.own_routing else []:  # the peers' routing: same weights, prompt and router
        policy, prefetch = args.own_routing.split("+")
        evict([path, store])
        record(f"strata {frac:.0%} {args.own_routing}, own routing", _child(
            "run_strata", str(path), budgets[frac], policy, prefetch, args.prompt_len, args.decode, args.threads,
            None, limit=limit(budgets[frac]), name=f"strata-{frac}-own"))
    evict([path, store])
    record("strata no cache (min slots)", _child(
        "run_strata", str(path), budgets[0.0], "lru", "none", args.prompt_len, args.decode, args.threads, trace,
        limit=limit(budgets[0.0]), name="strata-nocache"))
    evict([path])
    record("strata resident (no limit)", _child("run_strata", str(path), None, "lru", "none", args.prompt_len,
                                                args.decode, args.threads, trace))
    prompt = _prompt(vocab, args.prompt_len)
    if "llamacpp" in args.peers:
        from benchmarks.peers.llamacpp import gguf_for

        gguf = gguf_for(path, "bf16")
        for frac in fracs:
            evict([gguf])
            record(f"llama.cpp bf16 mmap, {frac:.0%} budget", _child(
                "run_llamacpp", str(gguf), prompt, args.peer_decode, args.threads, budgets[frac],
                limit=limit(budgets[frac]), name=f"llamacpp-{frac}"))
    if "transformers" in args.peers:
        frac = max(fracs)
        offload = default_store_dir(path).with_name(default_store_dir(path).name + "-accelerate")
        killed = []
        for share in (1.0, 0.5, 0.25):  # max_memory places weights only; its runtime comes on top
            evict([path, offload])
            res = _child("run_transformers", str(path), int(budgets[frac] * share), prompt, args.peer_decode,
                         args.threads, str(offload), args.peer_time_cap, limit=limit(budgets[frac]),
                         name="accelerate", timeout=1800)
            if not res.get("cgroup_oom_kills"):
                break
            killed.append(f"max_memory {share:.0%} of the budget: {res['error']}")
        record(f"transformers+accelerate, {frac:.0%} budget", dict(res, oom_killed_attempts=killed))
    bw = (bw0 + bw1) / 2
    for r in rows:
        per_tok = r.get("proc_read_bytes_per_token") or r.get("disk_bytes_per_token")
        if per_tok and r.get("decode_tok_s") and r.get("budget_bytes"):
            r["io_bound_tok_s"] = r["disk_o_direct_gb_s_row"] * 1e9 / per_tok
            r["fraction_of_io_bound"] = r["decode_tok_s"] / r["io_bound_tok_s"]
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "disk_o_direct_gb_s": bw, "disk_o_direct_gb_s_start_end": [bw0, bw1], "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_start": load_before, "load_avg": os.getloadavg(),
               "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
               "cgroup": CGROUP["on"], "cgroup_slack": args.cgroup_slack}
    info = {"model": f"{args.model}-{args.layers}l", "expert_bytes": facts.slot_bytes, "experts": facts.num_experts,
            "expert_total_bytes": facts.expert_bytes, "resident_bytes": facts.non_expert_bytes,
            "model_file_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "budgets": {str(k): v for k, v in budgets.items()},
            "trace": TRACE.name if trace else None, "decode_tokens": args.decode, "peer_decode_tokens": args.peer_decode}
    write_json_atomic(args.out, {"machine": machine, "setup": info, "rows": rows})
    print_table(machine, info, rows)


def print_table(machine: dict, info: dict, rows: list[dict]) -> None:
    gib = 2**30
    print(f"\n{info['model']}: {info['experts']} experts x {info['expert_bytes'] / 2**20:.1f} MiB, model files "
          f"{info['model_file_bytes'] / gib:.2f} GiB, disk (O_DIRECT) {machine['disk_o_direct_gb_s']:.2f} GB/s, "
          f"{machine['threads']} threads, load avg {machine['load_avg_start'][0]:.1f} -> {machine['load_avg'][0]:.1f}, "
          f"cgroup {'on' if machine['cgroup'] else 'off'}\n")
    print("| engine | decode tok/s | hit rate | MB read/token | I/O-bound tok/s | of bound | stall s/token | "
          "peak RSS | cgroup max / limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r and not r.get("decode_tok_s"):
            print(f"| {r['engine']} | error: {r['error']} | | | | | | | |")
            continue

        def f(key, fmt, scale=1.0, r=r):
            return format(r[key] / scale, fmt) if r.get(key) is not None else "-"

        cg = (f"{r['cgroup_max_usage_bytes'] / gib:.2f} / {r['cgroup_limit_bytes'] / gib:.2f} GiB"
              if r.get("cgroup_max_usage_bytes") else
              (f"(budget {r['budget_bytes'] / gib:.2f} GiB)" if r.get("budget_bytes") else "-"))
        print(f"| {r['engine']} | {f('decode_tok_s', '.2f')} | {f('expert_hit_rate', '.2f')} | "
              f"{f('proc_read_bytes_per_token', '.0f', 1e6)} | {f('io_bound_tok_s', '.2f')} | "
              f"{f('fraction_of_io_bound', '.0%')} | {f('io_stall_s_per_token', '.3f')} | "
              f"{f('peak_rss_bytes', '.2f', gib)} GiB | {cg} |")
    base = {r["engine"]: r.get("decode_tok_s") for r in rows}
    nocache = base.get("strata no cache (min slots)")
    for r in rows:
        if r["engine"].startswith("strata ") and "%" in r["engine"] and r.get("decode_tok_s") and nocache:
            frac = r["engine"].split()[1] + " "
            peers = {k: v for k, v in base.items() if not k.startswith("strata") and v and
                     (frac in k or "transformers" in k)}
            ratios = ", ".join(f"{r['decode_tok_s'] / v:.1f}x {k.split(',')[0]}" for k, v in peers.items())
            own = "own routing" in r["engine"]  # no cache ran on the replayed routing only
            print(f"{r['engine']}: " + ("" if own else f"{r['decode_tok_s'] / nocache:.2f}x no cache, ") + ratios)


if __name__ == "__main__":
    main()
