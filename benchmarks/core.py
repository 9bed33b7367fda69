"""Benchmark: decode (batch 1) and prefill tokens/s, Strata vs transformers on the same weights,
with the memory-bandwidth roofline measured in the same run.

    .venv/bin/python benchmarks/core.py --models bundled,dense-1b,olmoe-1b-7b
    .venv/bin/python benchmarks/core.py --models bundled,dense-1b --engines strata,strata-no-bf16-gemv,transformers

`strata-no-bf16-gemv` is Strata with STRATA_NATIVE_BF16=0 (bf16 projections through torch's F.linear instead of
the native GEMV of strata/layers/linear.py), to measure what that kernel buys in the same run.

Each engine runs in its own subprocess (so neither sees the other's memory); results go to
docs/benchmarks/core.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.child import run_child
from strata.fileio import write_json_atomic


def _prompt(vocab: int, n: int) -> list[int]:
    import torch

    return torch.randint(3, min(vocab, 30000), (n,), generator=torch.Generator().manual_seed(0)).tolist()


def run_strata(path: str, prompt_len: int, decode: int, threads: int, quantized_activations: str = "none") -> dict:
    import torch

    from strata import LLM, SamplingParams

    # no prefix caching: the warm-up uses the same prompt and must not make the measured prefill a cache hit
    llm = LLM(path, progress=False, dtype="bfloat16", num_threads=threads, max_num_seqs=1,
              enable_prefix_caching=False, quantized_activations=quantized_activations)
    eng = llm.engine
    ids = _prompt(eng.model_config.vocab_size, prompt_len)
    params = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    # warm-up with the same prompt length, so oneDNN's per-shape kernel set-up is not timed
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.add_request(ids, params)
    t0 = time.perf_counter()
    eng.step()  # prefill (+ first token)
    t1 = time.perf_counter()
    n = 1
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    t2 = time.perf_counter()
    del torch
    return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1)}


def run_transformers(path: str, prompt_len: int, decode: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([_prompt(model.config.vocab_size, prompt_len)])
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up, same prompt length
        t0 = time.perf_counter()
        model(ids)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=decode, min_new_tokens=decode, **kw)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": (decode - 1) / max(t2 - t1 - prefill, 1e-9)}


# engine label -> (runner in this file, extra environment of its subprocess)
ENGINES = {"strata": ("strata", {}), "strata-no-bf16-gemv": ("strata", {"STRATA_NATIVE_BF16": "0"}),
           "transformers": ("transformers", {})}


def _child(engine: str, path: str, prompt_len: int, decode: int, threads: int) -> dict:
    runner, env = ENGINES[engine]
    return run_child("benchmarks.core", f"run_{runner}", path, prompt_len, decode, threads, env=env)


def main() -> None:
    from benchmarks.synthetic import memory_bandwidth_gbs, synthetic_model, weight_bytes_per_token
    from strata.engine.llm_engine import BUNDLED_MODEL
    from strata.models.registry import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bundled,dense-1b,olmoe-1b-7b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="strata,transformers", help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--rounds", type=int, default=3, help="repeat every run; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "core.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    models = []
    for name in args.models.split(","):
        path = BUNDLED_MODEL if name == "bundled" else str(synthetic_model(name))
        cfg = load_config(path)
        models.append((name, path, cfg))
    runs: dict[tuple[str, str], list[dict]] = {(m[0], e): [] for m in models for e in engines}
    bws = []
    for rnd in range(args.rounds):  # engines of one model back to back, so each ratio compares neighbours
        bws.append(memory_bandwidth_gbs())
        for name, path, _ in models:
            for engine in engines:
                runs[name, engine].append(_child(engine, path, args.prompt_len, args.decode, args.threads))
                print(rnd, name, engine, runs[name, engine][-1], file=sys.stderr)
    bw = statistics.median(bws)
    rows = []
    for name, _, cfg in models:
        bytes_tok = weight_bytes_per_token(cfg)
        row = {"model": name, "params": cfg.param_counts()["total"], "active_params": cfg.param_counts()["active"],
               "weight_bytes_per_token": bytes_tok, "roofline_decode_tok_s": bw * 1e9 / bytes_tok}
        for engine in engines:
            ok = [r for r in runs[name, engine] if "error" not in r]
            row[engine] = ({k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s")}
                           if ok else runs[name, engine][0])
            row[engine]["rounds"] = runs[name, engine]
            if ok:
                row[f"{engine}_roofline_fraction"] = row[engine]["decode_tok_s"] / row["roofline_decode_tok_s"]
        if "strata" in engines and "transformers" in engines:
            pairs = [(a["decode_tok_s"] / b["decode_tok_s"], a["prefill_tok_s"] / b["prefill_tok_s"])
                     for a, b in zip(runs[name, "strata"], runs[name, "transformers"]) if "error" not in a and "error" not in b]
            if pairs:
                row["decode_ratio"] = statistics.median(d for d, _ in pairs)
                row["prefill_ratio"] = statistics.median(f for _, f in pairs)
                row["decode_ratio_rounds"] = [d for d, _ in pairs]
        rows.append(row)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
               "memory_read_gb_s": bw, "memory_read_gb_s_rounds": bws, "rounds": args.rounds,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg()}
    write_json_atomic(args.out, {"machine": machine, "rows": rows})
    print(f"\nmemory read bandwidth {bw:.1f} GB/s (median of {', '.join(f'{b:.0f}' for b in bws)}), {args.threads} "
          f"threads, load avg {machine['load_avg'][0]:.1f}, medians of {args.rounds} rounds\n")
    print("| model | engine | prefill tok/s | decode tok/s | decode vs transformers (per round) | roofline tok/s | fraction |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for e in engines:
            m = r[e]
            if "error" in m:
                print(f"| {r['model']} | {e} | error: {m['error']} | | | | |")
                continue
            ratio = ""
            if e == "strata" and "decode_ratio" in r:
                ratio = f"**{r['decode_ratio']:.2f}x** ({', '.join(f'{x:.2f}' for x in r['decode_ratio_rounds'])})"
            print(f"| {r['model']} | {e} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.2f} | {ratio} | "
                  f"{r['roofline_decode_tok_s']:.1f} | {m['decode_tok_s'] / r['roofline_decode_tok_s']:.0%} |")


if __name__ == "__main__":
    main()
