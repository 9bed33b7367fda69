"""Prompt prefill and time to first token on one thread, side by side for several checkouts.

Per checkout (`name=path`; rounds alternate between them, so a change of load hits all alike):

- `engine`: LLMEngine (no server, prefix caching off) prefills one request of random tokens per call,
  `max_tokens=1`, --reps calls per length of --lengths, each prompt new (new routing, new row counts per
  expert, as a server sees them); process CPU milliseconds per prefill, median;
- `server`: `strata serve --num-threads 1`, then --num-prompts ShareGPT first turns (cut to
  --max-prompt-chars) sent one after another, streaming; client time to the first chunk: median, p90, max.

Prints a table and, with --json, writes the rounds and the machine's facts.

    .venv/bin/python benchmarks/prefill_ttft.py before=../strata-before after=. --json prefill_ttft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_healthy
from strata.fileio import write_text_atomic

SHAREGPT = ROOT.parent / "shared" / "data" / "sharegpt-prompts-500" / "ShareGPT_V3_filtered_500.json"

# run in a checkout's own interpreter environment (PYTHONPATH = the checkout): prints {length: [ms, ...]}
ENGINE = """
import json, random, sys, time, torch
from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine
from strata.engine.sampling_params import SamplingParams
lengths, reps, model, max_len = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None, int(sys.argv[4])
eng = LLMEngine(EngineConfig(model=model, num_threads=1, max_model_len=max_len, enable_prefix_caching=False,
                             dtype=sys.argv[5]), progress=False)
rng, vocab = random.Random(0), eng.model_config.vocab_size
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
def prefill(n):
    eng.add_request([rng.randrange(1, vocab) for _ in range(n)], params)
    t = time.process_time()
    while eng.has_unfinished_requests():
        eng.step()
    return (time.process_time() - t) * 1e3
for n in lengths:
    prefill(n)  # the length's first prompt: the process's first shapes
print(json.dumps({n: [prefill(n) for _ in range(reps)] for n in lengths}))
"""


def engine_round(path: str, args) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ENGINE, json.dumps(args.lengths), str(args.reps), args.model or "",
                          str(args.max_model_len), args.dtype], cwd=path, env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_round(path: str, prompts: list[str], args) -> list[float]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "strata.cli", "serve", "--port", str(port), "--num-threads", "1",
           "--max-num-seqs", "16", "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
           "--served-model-name", "m", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=path, env={**os.environ, "PYTHONPATH": path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=300)
        ttft = []
        with httpx.Client(base_url=base, timeout=120) as client:
            for prompt in prompts:
                t = time.perf_counter()
                body = {"model": "m", "prompt": prompt, "max_tokens": 4, "stream": True}
                with client.stream("POST", "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            ttft.append((time.perf_counter() - t) * 1e3)
                            break
        return ttft
    finally:
        proc.terminate()
        proc.wait()


def first_turns(path: Path, num: int, max_chars: int) -> list[str]:
    data = json.loads(path.read_text())
    turns = [(d.get("conversations") or [{}])[0].get("value", "") for d in data]
    return [t[:max_chars] for t in turns if t][:num]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs="+", help="name=path of a strata checkout")
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 150, 200, 400])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=30)
    ap.add_argument("--max-prompt-chars", type=int, default=600)
    ap.add_argument("--dataset-path", type=Path, default=SHAREGPT)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-server", action="store_true", help="engine prefill only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    checkouts = dict(c.split("=", 1) for c in args.checkouts)
    prompts = [] if args.no_server else first_turns(args.dataset_path, args.num_prompts, args.max_prompt_chars)
    rounds = []
    for r in range(args.rounds):
        for name, path in checkouts.items():
            row = {"round": r, "checkout": name, "load": os.getloadavg()[0], "engine": engine_round(path, args)}
            if prompts:
                row["server_ttft_ms"] = server_round(path, prompts, args)
            rounds.append(row)
    head = ["checkout", *(f"prefill {n} ms" for n in args.lengths)]
    if prompts:
        head += ["server TTFT median / p90 / max ms"]
    print("| round | " + " | ".join(head) + " | load |")
    print("|---" * (len(head) + 2) + "|")
    for row in rounds:
        cells = [f"{statistics.median(row['engine'][str(n)]):.1f}" for n in args.lengths]
        if prompts:
            ts = sorted(row["server_ttft_ms"])
            cells.append(f"{statistics.median(ts):.1f} / {ts[int(0.9 * len(ts))]:.1f} / {ts[-1]:.1f}")
        print(f"| {row['round']} | {row['checkout']} | " + " | ".join(cells) + f" | {row['load']:.1f} |")
    if args.json:
        facts = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
        kept = {k: v for k, v in vars(args).items() if k not in ("checkouts", "dataset_path", "json", "model")}
        kept.update(checkouts=list(checkouts), dataset=args.dataset_path.name,
                    model=Path(args.model).name if args.model else "bundled")  # no paths of this machine
        write_text_atomic(args.json, json.dumps({"args": kept, "facts": facts, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
