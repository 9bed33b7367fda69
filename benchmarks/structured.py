"""Structured-output overhead per generated token, against unconstrained decoding, on the bundled model at
batch 1 and 16: greedy decode steps of the same prompts, free, constrained by a JSON schema with the grammar
masks filled on a worker thread during the forward pass (the engine's default), and constrained with the masks
filled inline after it. The schema (an array of at least 100 short strings) keeps every sequence inside the
grammar for the whole run, so all decode the same number of tokens. Figure per case: the least disturbed round's
20th-percentile step time. Results:
docs/benchmarks/structured.json.

    .venv/bin/python benchmarks/structured.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic


def _lines(item: dict) -> dict:
    return {"type": "object", "properties": {"lines": {"type": "array", "minItems": 100, "items": item}},
            "required": ["lines"]}


SCHEMAS = {"strings": _lines({"type": "string"}),  # llguidance's cheapest case: any string
           "strings maxLength 40": _lines({"type": "string", "maxLength": 40})}  # a bounded repeat: dearer masks
MODES = ("overlapped", "inline")


def decode_step_ms(llm, batch: int, schema: str | None, mode: str, tokens: int) -> float:
    """Decode step time over `tokens` steps of `batch` sequences, per token (ms): the 20th percentile, as on a
    shared machine the upper ones measure the neighbours."""
    from strata import SamplingParams
    from strata.engine.sampling_params import StructuredOutputsParams

    eng = llm.engine
    so = None if schema is None else StructuredOutputsParams(json=SCHEMAS[schema])
    eng.structured.overlap = mode == "overlapped"
    for i in range(batch):
        eng.add_request(f"ROMEO {i}:", SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                                      structured_outputs=so))
    eng.step()  # prefill (and the first token)
    steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        outs = eng.step()
        steps.append(time.perf_counter() - t)
        assert all(o.outputs[0].finish_reason in (None, "length") for o in outs)
    return statistics.quantiles(steps, n=5)[0] * 1e3 / batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "structured.json")
    args = ap.parse_args(argv)

    from strata import LLM
    from strata.commands.bench_serve import machine_facts

    llm = LLM(progress=False, num_threads=args.threads, max_num_seqs=max(args.batch), enable_prefix_caching=False)
    decode_step_ms(llm, 1, "strings", "inline", 8)  # warm-up: the grammar tokenizer, the native kernels
    cases = [(None, "-")] + [(s, m) for s in SCHEMAS for m in MODES]
    per = {(b, s, m): [] for b in args.batch for s, m in cases}
    for _ in range(args.rounds):  # cases interleaved, so drift in the machine's load hits all alike
        for b in args.batch:
            for s, m in cases:
                per[b, s, m].append(decode_step_ms(llm, b, s, m, args.tokens))
    rows = []
    print(f"{'batch':>5} {'schema':<22} {'masks':<11} {'ms/token':>9} {'overhead':>9}   rounds")
    for b in args.batch:
        free = min(per[b, None, "-"])
        for s, m in cases:
            med = min(per[b, s, m])  # the least disturbed round
            rows.append({"batch": b, "schema": s, "masks": m, "ms_per_token": med, "overhead": med / free - 1,
                         "rounds_ms": per[b, s, m]})
            print(f"{b:>5} {s or 'none (free)':<22} {m:<11} {med:>9.3f} {100 * (med / free - 1):>8.1f}%   "
                  + " ".join(f"{x:.3f}" for x in per[b, s, m]))
    write_json_atomic(args.out, {"machine": machine_facts(), "threads": args.threads, "tokens": args.tokens,
                                 "rounds": args.rounds, "schemas": SCHEMAS, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
