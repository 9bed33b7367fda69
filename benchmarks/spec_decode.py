"""Speculative decoding: decode tokens/s with and without speculation, same engine and prompts, in one run.

    .venv/bin/python benchmarks/spec_decode.py
    .venv/bin/python benchmarks/spec_decode.py --cases dense-ngram --dense PATH   # any HF folder, e.g. SmolLM2

Cases: the bundled MoE with the bundled draft, resident and with its expert cache at 25% of the experts'
bytes (the draft at the same slots, and at the same total bytes, where its weights and KV cache take slots
away); a real dense model (stories260K by default, from ../shared/data) with prompt lookup on input that
repeats itself. Batch 1 (one request at a time, greedy), bf16. Every run is a fresh interpreter
(benchmarks/child.py), each configuration --repeats times interleaved, the fastest counting; budgets are exact
slot counts (the interpreter's RSS is left out of the plan). Ratios are against the plain run of the same
case. Writes docs/benchmarks/spec_decode.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child import run_child
from strata.fileio import write_json_atomic

BUNDLED = ROOT / "strata" / "assets" / "models" / "shakespeare-moe"
DRAFT = ROOT / "strata" / "assets" / "models" / "shakespeare-draft"
SHARED = ROOT / ".." / "shared" / "data"
SHAKESPEARE = ["ROMEO:\nBut soft, what light through yonder window breaks?\n",
               "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n", "KING HENRY:\nOnce more unto the breach,"]


def repetitive_prompts(num: int = 3) -> list[str]:
    """Edit-style prompts: a story, then its first sentences again, so the continuation repeats the input."""
    text = (SHARED / "tinystories-valid100" / "validation_100.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if len(s.strip()) > 400][1 : num + 1]
    return [f"{s[:600]}\n\n{s[:120]}" for s in stories]



def decode_to_end(eng, outputs: list) -> tuple[float, int]:
    """Steps the engine until its requests finish, appending finished token ids to `outputs`; (seconds, steps)."""
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs.append(out.outputs[0].token_ids)
        steps += 1
    return time.perf_counter() - t0, steps

def run_engine(path: str, prompts: list[str], max_tokens: int, spec, slots, threads: int, dtype: str) -> dict:
    """One configuration in this (fresh) interpreter: decode tokens/s over the prompts, one at a time."""
    from strata import LLM, SamplingParams
    from strata.config import EngineConfig
    from strata.models.registry import load_config
    from strata.tiers import runtime
    from strata.tiers.store_convert import checkpoint_facts
    from strata.weights.loader import resolve_dtype

    kw = {"num_threads": threads, "max_num_seqs": 1, "speculative_config": spec, "dtype": dtype}
    if slots is not None:
        runtime.current_rss = lambda: 0  # budgets below are exact expert-slot counts
        facts, cfg = checkpoint_facts(path), load_config(path)
        fixed = runtime._plan(path, EngineConfig(memory_budget=1 << 40, max_num_seqs=1), cfg,
                              resolve_dtype(None, cfg), facts).fixed_bytes
        kw["memory_budget"] = fixed + slots * facts.slot_bytes
    llm = LLM(path, progress=False, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    eng = llm.engine
    if eng.spec:
        eng.spec.num_drafts = eng.spec.num_draft_tokens = eng.spec.num_accepted_tokens = 0
    outputs, decode_s, decoded, steps = [], 0.0, 0, 0
    for prompt in prompts:
        eng.add_request(prompt, params)
        eng.step()  # prefill and the first token: not decode
        seconds, n_steps = decode_to_end(eng, outputs)
        decode_s += seconds
        steps += n_steps
        decoded += max_tokens - 1
    row = {"decode_tok_s": decoded / decode_s, "target_steps": steps, "outputs": outputs,
           "expert_slots": eng.tiers.cache.num_slots if eng.tiers and eng.tiers.cache else None}
    if eng.spec:
        s = eng.spec.stats()
        row.update(acceptance=s["spec_acceptance_rate"], mean_accepted=s["spec_mean_accepted_tokens"],
                   proposer_bytes=s["spec_proposer_bytes"])
    return row


def run_llamacpp(gguf: str, prompts: list[str], max_tokens: int, spec, slots, threads: int, dtype: str) -> dict:
    """llama.cpp (llama-cpp-python) on the same prompts, greedy, EOS suppressed; `spec` {"num_speculative_tokens":
    k, "prompt_lookup_max": n} runs its prompt lookup (LlamaPromptLookupDecoding), None plain. Decode tokens/s
    from the first streamed token to the last. (slots and dtype: the signature of run_engine; unused.)"""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = spec and LlamaPromptLookupDecoding(max_ngram_size=spec["prompt_lookup_max"],
                                               num_pred_tokens=spec["num_speculative_tokens"])
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, draft_model=draft,
                verbose=False, seed=0)
    no_eos = {llm.token_eos(): -1e9}
    llm.create_completion(prompts[0], max_tokens=8, temperature=0.0, logit_bias=no_eos)  # warm-up
    decode_s, decoded, outputs = 0.0, 0, []
    for prompt in prompts:
        first, text = None, []
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, logit_bias=no_eos,
                                           stream=True):
            first = first or time.perf_counter()
            text.append(chunk["choices"][0]["text"])
        decode_s += time.perf_counter() - first
        decoded += max_tokens - 1
        outputs.append("".join(text))
    return {"decode_tok_s": decoded / decode_s, "target_steps": None, "outputs": outputs, "expert_slots": None}


def proposer_bytes(path: str) -> int:
    from strata.config import EngineConfig
    from strata.engine.spec.draft_model import DraftModelProposer

    return DraftModelProposer(path, str(BUNDLED), EngineConfig(max_num_seqs=1)).memory_bytes()


def dense_model(arg: str | None, tmp: Path) -> str | None:
    if arg:
        return arg
    ckpt, tok = SHARED / "stories260k" / "stories260K.bin", SHARED / "stories260k" / "tok512.bin"
    if not ckpt.is_file():
        return None
    from strata.weights.llama2c import convert_llama2c

    return str(convert_llama2c(ckpt, tok, tmp / "stories260k"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="moe-resident,moe-offload25,dense-ngram,llamacpp-ngram")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens of the fixed-k rows")
    ap.add_argument("--adaptive-max", type=int, default=8, help="num_speculative_tokens of the adaptive rows")
    ap.add_argument("--dense", default=None,
                    help="HF folder or GGUF for dense-ngram (default: stories260K converted); a GGUF also runs "
                         "the llamacpp-ngram case (llama-cpp-python, its prompt lookup) on the same file")
    ap.add_argument("--dense-dtype", default="bfloat16", help="compute dtype of the dense model")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration (interleaved); the fastest counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "spec_decode.json"))
    args = ap.parse_args()
    import tempfile

    from strata.tiers.store_convert import checkpoint_facts

    k = args.k
    draft = {"model": str(DRAFT), "num_speculative_tokens": k}
    kmax = args.adaptive_max
    adaptive = {"model": str(DRAFT), "num_speculative_tokens": kmax, "adaptive": True}
    runs: list[tuple] = []  # (case, run, model path, prompts, speculative config, expert slots, dtype)
    cases = args.cases.split(",")
    if "moe-resident" in cases:
        runs += [("moe-resident", name, str(BUNDLED), SHAKESPEARE, spec, None, "auto")
                 for name, spec in (("plain", None), (f"draft k={k}", draft), (f"draft adaptive k<={kmax}", adaptive))]
    if "moe-offload25" in cases:
        facts = checkpoint_facts(str(BUNDLED))
        slots = max(4, math.ceil(facts.num_experts / 4))
        same_bytes = max(4, slots - math.ceil(proposer_bytes(str(DRAFT)) / facts.slot_bytes))
        runs += [("moe-offload25", "plain", str(BUNDLED), SHAKESPEARE, None, slots, "auto"),
                 ("moe-offload25", f"draft k={k}, same slots", str(BUNDLED), SHAKESPEARE, draft, slots, "auto"),
                 ("moe-offload25", f"draft k={k}, same bytes", str(BUNDLED), SHAKESPEARE, draft, same_bytes, "auto"),
                 ("moe-offload25", f"draft adaptive k<={kmax}, same slots", str(BUNDLED), SHAKESPEARE, adaptive,
                  slots, "auto")]
    tmp = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    dense = dense_model(args.dense, tmp) if "dense-ngram" in cases else None
    if dense:
        prompts = repetitive_prompts()
        ngram = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4}
        dt = args.dense_dtype
        runs += [("dense-ngram", "plain", dense, prompts, None, None, dt),
                 ("dense-ngram", f"ngram k={k}", dense, prompts, ngram, None, dt),
                 ("dense-ngram", f"ngram adaptive k<={kmax}", dense, prompts,
                  {**ngram, "num_speculative_tokens": kmax, "adaptive": True}, None, dt)]
        if dense.endswith(".gguf") and "llamacpp-ngram" in cases:
            runs += [("llamacpp-ngram", "plain", dense, prompts, None, None, "gguf"),
                     ("llamacpp-ngram", f"prompt lookup k={k}", dense, prompts, ngram, None, "gguf")]
    load0 = os.getloadavg()
    best: dict[tuple[str, str], dict] = {}
    for rep in range(args.repeats):  # interleaved, so a burst of load on the shared machine hits every row alike
        for case, name, path, prompts, spec, slots, dtype in runs:
            fn = "run_llamacpp" if case == "llamacpp-ngram" else "run_engine"
            r = run_child("benchmarks.spec_decode", fn, path, prompts, args.max_tokens, spec, slots, args.threads,
                          dtype, timeout=900)
            print(f"{rep} {case:14s} {name:34s} {r.get('decode_tok_s', 0):8.1f} tok/s {r.get('error', '')}",
                  file=sys.stderr)
            old = best.get((case, name))
            if old is None or "error" in old or r.get("decode_tok_s", 0) > old.get("decode_tok_s", 0):
                best[(case, name)] = {**r, "case": case, "run": name, "model": os.path.basename(path.rstrip("/"))}
    rows = list(best.values())
    plain = {r["case"]: r for r in rows if r["run"] == "plain"}
    for r in rows:
        base = plain.get(r["case"], {})
        if "decode_tok_s" in r and "decode_tok_s" in base:
            r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["same_output"] = sum(a == b for a, b in zip(r["outputs"], base["outputs"])) / len(base["outputs"])
    for r in rows:
        r.pop("outputs", None)
    machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
               "load_avg_start": load0, "load_avg_end": os.getloadavg(), "python": platform.python_version()}
    setup = {"max_tokens": args.max_tokens, "k": k, "adaptive_max": kmax, "batch": 1, "repeats": args.repeats,
             "moe_dtype": "bf16 (checkpoint)", "dense_dtype": args.dense_dtype,
             "dense_model": os.path.basename(args.dense.rstrip("/")) if args.dense else ("stories260K" if dense else None)}
    by = {(r["case"], r["run"]): r.get("decode_tok_s") for r in rows}
    pairs = {"plain": (("dense-ngram", "plain"), ("llamacpp-ngram", "plain")),
             "prompt lookup": (("dense-ngram", f"ngram k={k}"), ("llamacpp-ngram", f"prompt lookup k={k}"))}
    versus = {name: by[a] / by[b] for name, (a, b) in pairs.items() if by.get(a) and by.get(b)}
    write_json_atomic(args.out, {"machine": machine, "setup": setup, "rows": rows, "strata_vs_llamacpp": versus})
    print_table(machine, rows)
    for name, ratio in versus.items():
        print(f"Strata / llama.cpp, {name}: {ratio:.2f}x")


def print_table(machine: dict, rows: list[dict]) -> None:
    print(f"\n{machine['cpu']}, {machine['threads']} thread(s), load avg {machine['load_avg_start'][0]:.1f} -> "
          f"{machine['load_avg_end'][0]:.1f} (a shared machine: noisy)\n")
    print("| case | run | expert slots | decode tok/s | vs plain | acceptance | accepted / verify | same output |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['run']} | | error: {r['error']} | | | | |")
            continue
        acc = f"{r['acceptance']:.2f}" if r.get("acceptance") is not None else "-"
        mean = f"{r['mean_accepted']:.2f}" if r.get("mean_accepted") is not None else "-"
        print(f"| {r['case']} | {r['run']} | {r['expert_slots'] or '-'} | {r['decode_tok_s']:.1f} | "
              f"{r.get('speedup', 1.0):.2f}x | {acc} | {mean} | {r.get('same_output', 1.0):.0%} |")


if __name__ == "__main__":
    main()
