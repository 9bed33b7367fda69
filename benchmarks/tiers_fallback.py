"""Miss fallbacks: what the miss fallbacks cost in perplexity and buy in disk reads and speed.

    .venv/bin/python benchmarks/tiers_fallback.py [--max-tokens N] [--out docs/benchmarks/tiers_fallback.json]

The bundled Shakespeare MoE (6 MoE layers x 8 experts, top-2) scores its held-out text (the last 10% of
tinyshakespeare, cut at a line boundary, as `strata eval ppl --tail-fraction 0.1`) teacher-forced, one
token per forward through the engine's model and paged KV cache: every forward is a decode step (T = 1)
with the expert provider, cache and fallback the engine uses, which a whole-window no-cache forward
(`strata eval ppl`) would not exercise (a window's prefill touches every expert at once). Windows of
`--window` tokens overlap by one token, so every token after the first is scored once, with 0..W-2
tokens of context. Budgets are whole numbers of expert slots: the planner's runtime-RSS probe is pinned
to its value at start-up so each configuration gets exactly the slots asked for (reported as `slots`).
Results: docs/benchmarks/tiers_fallback.json and docs/benchmarks/tiers_fallback.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic

DATA = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"


def held_out_ids(tok, fraction: float = 0.1) -> list[int]:
    from strata.eval.textfile import read_text

    return tok.encode(read_text(DATA, tail_fraction=fraction))


def score(llm, ids: list[int], window: int) -> tuple[float, int, float]:
    """Teacher-forced decode: (summed NLL in nats, scored tokens, seconds)."""
    import torch
    import torch.nn.functional as F

    from strata.layers.attention import AttentionMetadata

    model, kv = llm.engine.model, llm.engine.runner.kv_caches
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window - 1):
            w = ids[s : s + window]
            for p in range(len(w) - 1):
                meta = AttentionMetadata([0], [1], [p + 1], torch.tensor([p]), [torch.arange(p + 1)])
                logits = model(torch.tensor([w[p]]), torch.tensor([p]), meta, kv)  # [1, V]
                nll -= float(F.log_softmax(logits[0], dim=-1)[w[p + 1]])
                n += 1
    return nll, n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    ap.add_argument("--window", type=int, default=512, help="context window (the model's max positions)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "tiers_fallback.json"))
    args = ap.parse_args()

    import torch

    from strata import LLM
    from strata.config import EngineConfig
    from strata.engine.llm_engine import BUNDLED_MODEL
    from strata.models.registry import load_config
    from strata.tiers import runtime
    from strata.tiers.budget import current_rss
    from strata.tiers.store_convert import checkpoint_facts
    from strata.tokenizer import Tokenizer

    torch.set_num_threads(1)
    ids = held_out_ids(Tokenizer(BUNDLED_MODEL))
    if args.max_tokens:
        ids = ids[: args.max_tokens + 1]
    cfg = load_config(BUNDLED_MODEL)
    facts = checkpoint_facts(BUNDLED_MODEL)
    kw = {"dtype": "float32", "max_num_seqs": 1, "kv_cache_memory": 8 << 20, "num_threads": 1}
    for _ in range(2):  # the first plan's imports raise the RSS the second one measures
        rss = current_rss()
        runtime._plan(BUNDLED_MODEL, EngineConfig(memory_budget=1 << 40, **kw), cfg, torch.float32, facts)
    runtime.current_rss = lambda: rss  # every plan below sees the same runtime bytes: exact slot counts

    def budget(slots: int, lowbit: bool) -> int:
        plan = runtime._plan(BUNDLED_MODEL, EngineConfig(memory_budget=1 << 40, **kw), cfg, torch.float32, facts,
                             lowbit)
        return plan.fixed_bytes + slots * facts.slot_bytes

    n_exp = facts.num_experts
    lowbit_slots = math.ceil(facts.lowbit_bytes / facts.slot_bytes)  # what the int4 copies displace
    configs = [("resident", None, "none", False)]
    for frac in (0.25, 0.5):
        slots = round(frac * n_exp)
        label = f"{int(frac * 100)}%"
        configs += [(label, slots, "none", False), (label, slots, "renormalize", False),
                    (label, slots, "lowbit", False)]
        if slots > lowbit_slots + 2 * cfg.num_experts_per_tok:
            configs.append((f"{label} same bytes", slots - lowbit_slots, "lowbit", True))
    rows = []
    calls_per_token = cfg.num_hidden_layers * cfg.num_experts_per_tok
    for label, slots, fallback, same_bytes in configs:
        extra = {} if slots is None else {
            "memory_budget": budget(slots, fallback == "lowbit"), "miss_fallback": fallback}
        llm = LLM(BUNDLED_MODEL, progress=False, **kw, **extra)
        nll, n, secs = score(llm, ids, args.window)
        st = llm.engine.tier_stats() if llm.engine.tier_stats else {"tiered": False}
        row = {"budget": label, "fallback": fallback, "ppl": math.exp(nll / n), "tokens": n, "tok_s": n / secs,
               "budget_bytes": extra.get("memory_budget")}
        if st.get("tiered"):
            fb = st["fallback_renormalized"] + st["fallback_lowbit"]
            row.update(slots=st["expert_cache_slots"], hit_rate=st["expert_hit_rate"],
                       fallback_rate=fb / (n * calls_per_token), disk_bytes_per_token=st["disk_bytes_read"] / n,
                       io_stall_s_per_token=st["io_stall_s"] / n, direct_io=st["direct_io"],
                       lowbit_bytes=st["memory_plan"]["lowbit_bytes"], same_bytes_as_budget=same_bytes)
            llm.engine.tiers.close()
        rows.append(row)
        print(json.dumps(row), flush=True)

    machine = {"cpu": platform.processor() or platform.machine(), "threads": 1, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg(),
               "note": "2 shared cores; other jobs ran at the same time"}
    setup = {"model": "shakespeare-moe", "experts": n_exp, "expert_slot_bytes": facts.slot_bytes,
             "lowbit_bytes": facts.lowbit_bytes, "window": args.window, "held_out_tokens": len(ids) - 1,
             "dtype": "float32", "policy": "nextuse", "prefetch": "none"}
    write_json_atomic(args.out, {"machine": machine, "setup": setup, "rows": rows})
    print("\n| budget | fallback | slots | ppl | fallback rate | hit rate | KB read/token | tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['fallback']} | {r.get('slots', n_exp)} | {r['ppl']:.3f} | "
              f"{r.get('fallback_rate', 0):.3f} | {r.get('hit_rate', 1):.3f} | "
              f"{r.get('disk_bytes_per_token', 0) / 1e3:.1f} | {r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
