"""Speculative decoding where the experts come from disk: an OLMoE-shaped MoE (random bf16 weights) with its
expert cache at --budget of the experts' bytes, routing replayed from the real Mixtral HumanEval traces, prompt
lookup against plain offloaded decode, in one run.

    .venv/bin/python benchmarks/spec_offload.py --text-model SmolLM2-135M-Instruct.Q4_1.gguf

The target's routing is replayed by position (tiers/trace.py), so a verification of rows t..t+k routes each
row as plain decoding routes that position, and the expert reads are those of the real trace. A random
target's text predicts nothing, and a draft cannot guess a random model's tokens, so the target's output is
replayed too (--output edit: a real model's greedy output on edit-style prompts, written by --text-model;
humaneval: Mixtral's own HumanEval completions): each forward runs in full and its logits are then replaced by
the replayed token's one-hot, so the cost is the target's and the acceptance is prompt lookup's on real text.
--output own keeps the random target's output. Rows: plain; fixed k; the adaptive rule (k per step from the
measured acceptance and forward times, engine/spec/policy.py). Every run is a fresh interpreter with the
expert store evicted from the page cache (reads are O_DIRECT anyway); configurations are interleaved
--repeats times; the table shows the median and the range. Also reported: how many distinct experts w
consecutive positions of the trace route to, over one position's (what a verification of w rows reads
before caching). Writes docs/benchmarks/spec_offload.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child import run_child
from benchmarks.offload import TRACE, _prompt, evict
from benchmarks.spec_decode import decode_to_end

ROUTING = TRACE.parent / "humaneval_2_routing.jsonl"  # Mixtral generating HumanEval/0 and /1
OUTPUTS = TRACE.parent / "humaneval_full_outputs.jsonl"  # Mixtral's completions of every HumanEval prompt
from strata.fileio import write_json_atomic
from strata.models.registry import load_config


def run_offloaded(path: str, slots: int, spec: dict | None, prompts: list[list[int]], outputs: list[list[int]] | None,
                  decode: int, threads: int, trace: str | None) -> dict:
    """One configuration in this (fresh) interpreter: decode tokens/s over the prompts (one at a time), expert
    traffic per token, the outputs. With `outputs`, each target forward's logits are replaced by a one-hot of
    the replayed output token at that position (the forward itself, and so its cost, is unchanged)."""
    import torch

    from strata import LLM, SamplingParams
    from strata.config import EngineConfig
    from strata.tiers import runtime
    from strata.tiers.store_convert import checkpoint_facts

    runtime.current_rss = lambda: 0  # the budget below is an exact expert-slot count
    facts, cfg = checkpoint_facts(path), load_config(path)
    kw = {"dtype": "bfloat16", "max_num_seqs": 1, "num_threads": threads, "max_num_batched_tokens": 256,
          "kv_cache_memory": 64 << 20, "replay_routing": trace, "speculative_config": spec}
    fixed = runtime._plan(path, EngineConfig(memory_budget=1 << 40, **kw), cfg, torch.bfloat16, facts).fixed_bytes
    llm = LLM(path, progress=False, memory_budget=fixed + slots * facts.slot_bytes, **kw)
    eng = llm.engine
    forced: dict[str, tuple[int, list[int]]] = {}  # request id -> (prompt length, output to replay)
    if outputs is not None:
        execute = eng.runner.execute

        def replay_output(batch, num_scored=None):
            logits, sampled, hidden = execute(batch, num_scored)
            logits, row = logits.clone(), 0  # an inference tensor: replaced rows go into a copy
            for i in sampled:
                seq, n = batch.seqs[i], num_scored[i] if num_scored else 1
                plen, out = forced[seq.request_id]
                end = seq.num_computed_tokens + batch.num_new_tokens[i]  # rows: positions end - n .. end - 1
                for j in range(n):
                    t = end - n + j + 1 - plen  # the output token this row predicts
                    logits[row + j].fill_(-1e4)[out[min(t, len(out) - 1)]] = 0.0
                row += n
            return logits, sampled, hidden

        eng.runner.execute = replay_output
    before, steps, seconds, n, texts = None, 0, 0.0, 0, []
    for r, prompt in enumerate(prompts):
        max_tokens = min(decode, len(outputs[r])) if outputs is not None else decode
        rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        if outputs is not None:
            forced[rid] = (len(prompt), outputs[r])
        eng.step()  # prefill + first token
        before = before or eng.tier_stats()
        took, n_steps = decode_to_end(eng, texts)
        seconds += took
        steps += n_steps
        n += max_tokens - 1
    after = eng.tier_stats()
    row = {"decode_tok_s": n / seconds, "target_steps": steps, "output": texts, "slots": after["expert_cache_slots"],
           "expert_accesses_per_token": (after["expert_accesses"] - before["expert_accesses"]) / n,
           "expert_misses_per_token": (after["expert_misses"] - before["expert_misses"]) / n,
           "disk_mb_per_token": (after["disk_bytes_read"] - before["disk_bytes_read"]) / n / 1e6,
           "io_stall_s_per_token": (after["io_stall_s"] - before["io_stall_s"]) / n}
    if eng.spec:
        s = eng.spec.stats()
        row.update(acceptance=s["spec_acceptance_rate"], mean_accepted=s["spec_mean_accepted_tokens"],
                   drafts=s["spec_num_drafts"], mean_k=s["spec_num_draft_tokens"] / max(s["spec_num_drafts"], 1))
    return row


def edit_texts(model: str, num: int, decode: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, greedy outputs) of a real model (`model`, e.g. SmolLM2) on the edit-style prompts of
    benchmarks/spec_decode.py (a story, then its first sentence again), as token ids. Run as a child."""
    from benchmarks.spec_decode import repetitive_prompts
    from strata import LLM, SamplingParams

    llm = LLM(model, progress=False, dtype="bfloat16", max_num_seqs=1)
    outs = llm.generate(repetitive_prompts(num), SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True))
    return [o.prompt_token_ids for o in outs], [o.outputs[0].token_ids for o in outs]


def humaneval_texts(tokenizer: str, num: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, Mixtral's completions) of the first num HumanEval problems, token ids of `tokenizer` (a model
    folder or GGUF file whose vocabulary fits the target's)."""
    import json

    from tokenizers import Tokenizer

    from strata.weights.gguf_cache import resolve_model_path

    tok = Tokenizer.from_file(str(Path(resolve_model_path(tokenizer)) / "tokenizer.json"))
    rows = [json.loads(line) for line in OUTPUTS.read_text().splitlines()[:num]]
    return ([tok.encode(r["prompt"]).ids for r in rows], [tok.encode(r["generated"]).ids for r in rows])


def expert_union(trace: str, num_experts: int, top_k: int, num_layers: int, windows: list[int]) -> dict:
    """{w: mean distinct experts per layer that w consecutive positions of the replayed trace route to, over the
    experts one position routes to}: what a verification of w rows reads against a plain step, before caching."""
    from strata.tiers.trace import RoutingReplay, read_trace

    replay = RoutingReplay(read_trace(trace), num_experts, top_k)
    out = {}
    for w in windows:
        sizes = [len({e for j in range(w) for e in replay.lookup(0, t + j, layer)[0]})
                 for layer in range(num_layers) for t in range(64)]
        out[w] = sum(sizes) / len(sizes) / top_k
    return out


def period(tokens: list[int]) -> int | None:
    """The smallest p with tokens[i] == tokens[i - p] over the last half of the output, or None."""
    tail = tokens[len(tokens) // 2 :]
    for p in range(1, len(tail) // 2 + 1):
        if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
            return p
    return None


def main() -> None:
    from benchmarks.synthetic import synthetic_model
    from strata.tiers.store_convert import checkpoint_facts, ensure_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.25, help="expert cache, fraction of the experts' bytes")
    ap.add_argument("--ks", default="2,4,7", help="fixed num_speculative_tokens rows")
    ap.add_argument("--adaptive-max", type=int, default=7)
    ap.add_argument("--output", choices=("edit", "humaneval", "own"), default="edit",
                    help="edit: the real --text-model's greedy output on edit-style prompts replayed as the "
                         "target's output; humaneval: Mixtral's HumanEval completions; own: the random target's "
                         "own greedy output on a random prompt")
    ap.add_argument("--text-model", default=None,
                    help="edit, humaneval: real model (folder or GGUF) that writes (edit) or tokenizes the text")
    ap.add_argument("--problems", type=int, default=3, help="edit, humaneval: prompts, one request each")
    ap.add_argument("--prompt-len", type=int, default=16, help="own: random prompt tokens")
    ap.add_argument("--decode", type=int, default=64, help="most tokens decoded per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "spec_offload.json"))
    args = ap.parse_args()
    path = str(synthetic_model(args.model, args.layers))
    store = ensure_store(path)
    facts = checkpoint_facts(path)
    slots = max(math.ceil(args.budget * facts.num_experts), 1)
    trace = str(ROUTING.resolve()) if ROUTING.exists() else None
    if args.output != "own" and not (OUTPUTS.exists() and args.text_model):
        raise SystemExit(f"--output {args.output} needs ../shared/data/mixtral-8x7b-routing and --text-model")
    if args.output == "edit":
        r = run_child("benchmarks.spec_offload", "edit_texts", args.text_model, args.problems, args.decode)
        if isinstance(r, dict):
            raise SystemExit(f"--text-model: {r['error']}")
        prompts, outputs = r
    elif args.output == "humaneval":
        prompts, outputs = humaneval_texts(args.text_model, args.problems)
    else:
        prompts, outputs = [_prompt(load_config(path).vocab_size, args.prompt_len)], None
    ngram = {"method": "ngram", "prompt_lookup_max": 4}
    runs = [("plain", None)] + [(f"ngram k={k}", {**ngram, "num_speculative_tokens": k})
                                for k in map(int, args.ks.split(","))]
    runs.append((f"ngram adaptive k<={args.adaptive_max}",
                 {**ngram, "num_speculative_tokens": args.adaptive_max, "adaptive": True}))
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for rep in range(args.repeats):  # interleaved: a burst of load hits every configuration alike
        for name, spec in runs:
            evict([store])
            r = run_child("benchmarks.spec_offload", "run_offloaded", path, slots, spec, prompts, outputs,
                          args.decode, args.threads, trace, timeout=1800)
            print(f"{rep} {name:28s} {r.get('decode_tok_s', 0):7.2f} tok/s {r.get('error', '')}", file=sys.stderr)
            results[name].append(r)
    rows = [summarize(name, rs, results["plain"]) for name, rs in results.items()]
    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
               "load_avg_start": load0, "load_avg_end": os.getloadavg(), "python": platform.python_version()}
    setup = {"model": f"{args.model}-{args.layers}l", "expert_bytes": facts.slot_bytes, "experts": facts.num_experts,
             "slots": slots, "budget": args.budget, "trace": os.path.basename(trace) if trace else None,
             "output": args.output, "problems": len(prompts), "decode": args.decode, "repeats": args.repeats, "dtype": "bfloat16"}
    cfg = load_config(path)
    setup["expert_union"] = expert_union(trace, cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers,
                                         [1, 2, 4, 6, 8]) if trace else None
    write_json_atomic(args.out, {"machine": machine, "setup": setup, "rows": rows})
    print_table(machine, setup, rows)


def summarize(name: str, runs: list[dict], plain: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"run": name, "error": runs[0]["error"]}
    tps = [r["decode_tok_s"] for r in ok]
    base = statistics.median(r["decode_tok_s"] for r in plain if "error" not in r)
    ref = next((r["output"] for r in plain if "error" not in r), None)
    row = {"run": name, "decode_tok_s_median": statistics.median(tps), "decode_tok_s_min": min(tps),
           "decode_tok_s_max": max(tps), "speedup": statistics.median(tps) / base,
           "same_output": sum(r["output"] == ref for r in ok), "runs": len(ok), "output_period": period(ok[0]["output"][0])}
    for key in ("target_steps", "expert_accesses_per_token", "expert_misses_per_token", "disk_mb_per_token",
                "io_stall_s_per_token", "acceptance", "mean_accepted", "mean_k", "slots"):
        if key in ok[0]:
            row[key] = statistics.median(r[key] for r in ok)
    return row


def print_table(machine: dict, setup: dict, rows: list[dict]) -> None:
    print(f"\n{setup['model']}, output {setup['output']}, {setup['experts']} experts of {setup['expert_bytes'] / 2**20:.0f} MiB, "
          f"{setup['slots']} slots ({setup['budget']:.0%}), {machine['threads']} thread(s), load avg "
          f"{machine['load_avg_start'][0]:.1f} -> {machine['load_avg_end'][0]:.1f}\n")
    if setup.get("expert_union"):
        print("distinct experts per layer for w consecutive positions of the trace, over one position's: " + ", ".join(
            f"w={w}: {u:.2f}" for w, u in setup["expert_union"].items()) + "\n")
    print("| run | decode tok/s (median, range) | vs plain | acceptance | accepted / verify | mean k | "
          "target steps | expert misses / token | disk MB / token | I/O wait ms / token | same output |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | error: {r['error']} |")
            continue

        def f(key, fmt="{:.2f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        print(f"| {r['run']} | {r['decode_tok_s_median']:.2f} ({r['decode_tok_s_min']:.2f}-"
              f"{r['decode_tok_s_max']:.2f}) | {r['speedup']:.2f}x | {f('acceptance')} | {f('mean_accepted')} | "
              f"{f('mean_k', '{:.1f}')} | {f('target_steps', '{:.0f}')} | {f('expert_misses_per_token', '{:.1f}')} | "
              f"{f('disk_mb_per_token', '{:.0f}')} | {1e3 * r['io_stall_s_per_token']:.0f} | "
              f"{r['same_output']}/{r['runs']} |")


if __name__ == "__main__":
    main()
