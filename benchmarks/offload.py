"""Issue-3 benchmark: decode with experts on disk under a memory budget, routing replayed from the real
Mixtral traces, beside no cache, fully resident Strata, transformers+accelerate disk offload and llama.cpp.

    .venv/bin/python benchmarks/offload.py --model olmoe-1b-7b --layers 2 --decode 48

Every engine runs in its own subprocess with the model's files evicted from the page cache first
(posix_fadvise DONTNEED on those files only: other processes' caches stay). Strata reads experts with
O_DIRECT, so its expert reads are cold by construction. The disk ceiling is measured in the same run
(O_DIRECT reads of the expert store), and "disk-bound limit" is that bandwidth divided by the bytes
Strata actually read per decoded token. The peers route with their own (random-weight) routers: their
numbers are speed under the same budget, not the same expert sequence. Results: docs/benchmarks/tiers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRACE = ROOT / ".." / "shared" / "data" / "mixtral-8x7b-routing" / "gsm8k_2_routing.jsonl"


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
def run_strata(path: str, fraction: float | None, policy: str, prefetch: str, prompt_len: int, decode: int,
               threads: int, trace: str | None) -> dict:
    import torch

    from strata import LLM, SamplingParams
    from strata.config import EngineConfig, ModelConfig
    from strata.tiers import runtime
    from strata.tiers.store_convert import checkpoint_facts

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_pretrained(path)
    kw = {"dtype": "bfloat16", "max_num_seqs": 1, "num_threads": threads, "max_num_batched_tokens": 256,
          "kv_cache_memory": 64 << 20, "replay_routing": trace}
    budget = None
    if fraction is not None:
        facts = checkpoint_facts(path)
        ecfg = EngineConfig(memory_budget=1 << 50, **kw)
        for _ in range(2):  # the first plan's imports raise the RSS the second one measures
            fixed = runtime._plan(path, ecfg, cfg, torch.bfloat16, facts).fixed_bytes
        slots = max(round(fraction * facts.num_experts), 2 * cfg.num_experts_per_tok)
        budget = fixed + slots * facts.slot_bytes + facts.slot_bytes // 2  # half a slot of slack: RSS drifts
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
    n = 1
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    t2 = time.perf_counter()
    out = {"prefill_s": t1 - t0, "decode_tok_s": (n - 1) / (t2 - t1), "budget_bytes": budget,
           "peak_rss_bytes": _vmhwm()}
    if tiered:
        after = eng.tier_stats()
        steps = n - 1
        out.update({
            "expert_hit_rate": (after["expert_accesses"] - before["expert_accesses"]
                                - (after["expert_misses"] - before["expert_misses"]))
            / max(after["expert_accesses"] - before["expert_accesses"], 1),
            "disk_bytes_per_token": (after["disk_bytes_read"] - before["disk_bytes_read"]) / steps,
            "io_stall_s_per_token": (after["io_stall_s"] - before["io_stall_s"]) / steps,
            "prefetch_coverage": after["prefetch_coverage"], "prefetch_waste_bytes": after["prefetch_waste_bytes"],
            "slots": after["expert_cache_slots"], "direct_io": after["direct_io"],
        })
    return out


def run_transformers(path: str, budget: int, prompt_len: int, decode: int, threads: int, offload: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=offload).eval()
    ids = torch.tensor([_prompt(model.config.vocab_size, prompt_len)])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=decode, min_new_tokens=decode, **kw)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": (decode - 1) / max(t2 - t1 - (t1 - t0), 1e-9),
            "budget_bytes": budget, "peak_rss_bytes": _vmhwm()}


def _child(fn: str, *args) -> dict:
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.offload import {fn} as f; "
            f"print('RESULT', json.dumps(f(*{list(args)!r})))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1800 s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}


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
    from strata.config import ModelConfig
    from strata.tiers.store_convert import checkpoint_facts, default_store_dir, ensure_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budgets", default="0.25,0.5")
    ap.add_argument("--variants", default="nextuse+none,nextuse+hybrid,lru+none",
                    help="policy+prefetcher pairs run at every budget")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared 2-core machine (no spin-wait)")
    ap.add_argument("--peers", default="transformers,llamacpp")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "tiers.json"))
    args = ap.parse_args()
    path = synthetic_model(args.model, args.layers)
    trace = str(TRACE.resolve()) if TRACE.exists() else None
    store = ensure_store(path)
    facts = checkpoint_facts(path)
    evict([store])
    bw = disk_read_gbs(store)
    rows = []

    def record(name: str, res: dict) -> None:
        res["engine"] = name
        rows.append(res)
        print(name, json.dumps(res), file=sys.stderr)

    budgets = [float(b) for b in args.budgets.split(",")]
    for frac in budgets:
        for variant in args.variants.split(","):
            policy, prefetch = variant.split("+")
            evict([path, store])
            record(f"strata {frac:.0%} {variant}", _child(
                "run_strata", str(path), frac, policy, prefetch, args.prompt_len, args.decode, args.threads, trace))
    evict([path, store])
    record("strata no cache (min slots)", _child("run_strata", str(path), 0.0, "lru", "none", args.prompt_len,
                                                 args.decode, args.threads, trace))
    evict([path])
    record("strata resident", _child("run_strata", str(path), None, "lru", "none", args.prompt_len, args.decode,
                                     args.threads, trace))
    half = next((r for r in rows if r.get("budget_bytes") and " 50% " in r["engine"]), rows[0])
    if "transformers" in args.peers and half.get("budget_bytes"):
        offload = default_store_dir(path).with_name(default_store_dir(path).name + "-accelerate")
        evict([path])
        record("transformers+accelerate (50% budget)", _child("run_transformers", str(path), half["budget_bytes"],
                                                             args.prompt_len, args.decode, args.threads,
                                                             str(offload)))
    if "llamacpp" in args.peers:
        from benchmarks.peers.llamacpp import bench_llamacpp, gguf_for

        gguf = gguf_for(path, "bf16")
        evict([gguf])
        r = bench_llamacpp(gguf, _prompt(ModelConfig.from_pretrained(path).vocab_size, args.prompt_len), args.decode - 1,
                           args.threads, warmup=False)
        record("llama.cpp bf16 mmap", {"decode_tok_s": r.get("decode_tok_s"), "load_s": r.get("load_s")})
    for r in rows:
        if r.get("disk_bytes_per_token"):
            r["disk_bound_tok_s"] = bw * 1e9 / r["disk_bytes_per_token"]
            r["fraction_of_disk_bound"] = r["decode_tok_s"] / r["disk_bound_tok_s"]
    import torch

    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "disk_o_direct_gb_s": bw, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_avg": os.getloadavg()}
    info = {"model": f"{args.model}-{args.layers}l", "expert_bytes": facts.slot_bytes, "experts": facts.num_experts,
            "expert_total_bytes": facts.expert_bytes, "resident_bytes": facts.non_expert_bytes,
            "trace": TRACE.name if trace else None, "decode_tokens": args.decode}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".tmp"
    Path(tmp).write_text(json.dumps({"machine": machine, "setup": info, "rows": rows}, indent=2))
    os.replace(tmp, args.out)
    print(f"\n{info['model']}: {facts.num_experts} experts x {facts.slot_bytes / 2**20:.1f} MiB, disk (O_DIRECT) "
          f"{bw:.2f} GB/s, {args.threads} threads, load avg {machine['load_avg'][0]:.1f}\n")
    print("| engine | decode tok/s | hit rate | MB read/token | disk-bound tok/s | of bound | stall s/token | "
          "peak RSS / budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | error: {r['error']} | | | | | | |")
            continue

        def f(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        rss = (f"{r['peak_rss_bytes'] / 2**30:.2f} / {r['budget_bytes'] / 2**30:.2f} GiB"
               if r.get("budget_bytes") and r.get("peak_rss_bytes") else "-")
        mb = f"{r['disk_bytes_per_token'] / 1e6:.0f}" if r.get("disk_bytes_per_token") else "-"
        print(f"| {r['engine']} | {f('decode_tok_s', '.2f')} | {f('expert_hit_rate', '.2f')} | {mb} | "
              f"{f('disk_bound_tok_s', '.2f')} | {f('fraction_of_disk_bound', '.0%')} | "
              f"{f('io_stall_s_per_token', '.3f')} | {rss} |")


if __name__ == "__main__":
    main()
