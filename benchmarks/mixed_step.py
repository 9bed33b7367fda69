"""What a request arriving mid-batch costs: the engine step that prefills its prompt together with the decodes of
the running sequences (a mixed step), against a step of those decodes alone. Under a steady request rate on a
server, such steps come every time a request arrives, so their cost sets the TPOT that the running streams see.

Starts N sequences, decodes until every one has its first token, then alternates R times: one decode-only step,
then a step that also admits a new prompt (which is aborted afterwards, so the batch stays at N). Reports CPU
milliseconds per step (this process, all threads), median and range over the rounds after the first.

    .venv/bin/python benchmarks/mixed_step.py --model .cache/peers/gguf/olmoe-1b-7b-8l-q4_0.gguf --seqs 15 \\
        --prompt-len 55 --json docs/benchmarks/mixed_step_olmoe.json
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_ms(fn) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def measure(model_path: str | None, num_seqs: int, prompt_len: int, rounds: int, threads: int) -> dict:
    from strata.config import EngineConfig
    from strata.engine.llm_engine import LLMEngine
    from strata.engine.sampling_params import SamplingParams

    eng = LLMEngine(EngineConfig(model=model_path, num_threads=threads, max_num_seqs=num_seqs + 1,
                                 max_model_len=prompt_len + 2 * rounds + 16, dtype="bfloat16"), progress=False)
    rng = random.Random(0)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2 * rounds + 8, ignore_eos=True)

    def prompt() -> list[int]:
        return [rng.randrange(vocab) for _ in range(prompt_len)]

    for _ in range(num_seqs):
        eng.add_request(prompt(), params)
    while eng.scheduler.waiting or any(s.num_completion_tokens == 0 for s in eng.scheduler.running):
        eng.step()  # prefill and the first token of every sequence
    decode, mixed = [], []
    for i in range(rounds):
        decode.append(_cpu_ms(eng.step))
        request_id = f"arrival-{i}"
        eng.add_request(prompt(), params, request_id=request_id)
        mixed.append(_cpu_ms(eng.step))
        eng.abort_request(request_id)

    def stats(xs: list[float]) -> dict:
        xs = xs[1:]  # the first round meets first-time costs (oneDNN primitives for new shapes)
        return {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs)}

    return {"seqs": num_seqs, "prompt_len": prompt_len, "rounds": rounds, "decode": stats(decode),
            "mixed": stats(mixed)}


def main() -> None:
    from benchmarks.child import run_child

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF (default: the bundled model)")
    ap.add_argument("--seqs", type=int, default=15, help="running sequences")
    ap.add_argument("--prompt-len", type=int, default=55, help="tokens of the arriving prompt")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = run_child("benchmarks.mixed_step", "measure", args.model, args.seqs, args.prompt_len, args.rounds,
                  args.threads)
    if "error" in r:
        raise SystemExit(r["error"])
    print("| step | CPU ms, median (min-max) |")
    print("|---|---|")
    for name, label in (("decode", f"{args.seqs} decodes"),
                         ("mixed", f"{args.seqs} decodes + a {args.prompt_len}-token prompt")):
        s = r[name]
        print(f"| {label} | {s['median_ms']:.0f} ({s['min_ms']:.0f}-{s['max_ms']:.0f}) |")
    if args.json:
        from strata.fileio import write_json_atomic

        write_json_atomic(args.json, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg": os.getloadavg()}, "args": vars(args), **r})


if __name__ == "__main__":
    main()
