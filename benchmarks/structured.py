"""Structured-output overhead per generated token, against unconstrained decoding, on the bundled model at
batch 1 and 16: greedy decode steps of the same prompts, free, and constrained by two JSON schemas with the
grammar masks filled inline after the forward pass (the engine's default) or on a worker thread during it. The
schemas (an object holding an array of at least 100 strings) keep every sequence inside the grammar for the
whole run, so all cases decode the same number of tokens. Per case, from the least disturbed round: the step
time, the forward's share of it and the time in the grammar calls (masks, accepting tokens), each the 20th
percentile over the steps. The overhead is the grammar time against the free step: a step-time difference also
holds the forward's own dependence on the tokens it sees. Results: docs/benchmarks/structured.json.

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


class Clock:
    """Seconds spent in the wrapped calls (measured on the same steps as the step time, so their ratio holds when
    the machine's load drifts)."""

    def __init__(self, obj, names: tuple[str, ...]):
        self.seconds = 0.0
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn):
        def call(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t
        return call


def decode_step_ms(llm, batch: int, schema: str | None, mode: str, tokens: int) -> tuple[float, float, float]:
    """Per token (ms) over `tokens` decode steps of `batch` sequences: the step time, the time in the forward pass
    (it depends on the tokens: JSON is not the free text) and the time in the grammar calls on the critical path;
    20th percentiles over the steps, as on a shared machine the upper ones measure the neighbours."""
    from strata import SamplingParams
    from strata.engine.sampling_params import StructuredOutputsParams

    eng = llm.engine
    grammar, forward = eng.structured.clock, eng.runner.clock
    so = None if schema is None else StructuredOutputsParams(json=SCHEMAS[schema])
    eng.structured.overlap = mode == "overlapped"
    for i in range(batch):
        eng.add_request(f"ROMEO {i}:", SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                                      structured_outputs=so))
    eng.step()  # prefill (and the first token)
    steps, fwd, gram = [], [], []
    while eng.has_unfinished_requests():
        grammar.seconds = forward.seconds = 0.0
        t = time.perf_counter()
        outs = eng.step()
        steps.append(time.perf_counter() - t)
        fwd.append(forward.seconds)
        gram.append(grammar.seconds)
        assert all(o.outputs[0].finish_reason in (None, "length") for o in outs)
    return tuple(statistics.quantiles(x, n=5)[0] * 1e3 / batch for x in (steps, fwd, gram))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="an HF model folder (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "structured.json")
    args = ap.parse_args(argv)

    from strata import LLM
    from strata.commands.bench_serve import machine_facts

    llm = LLM(args.model, progress=False, num_threads=args.threads, max_num_seqs=max(args.batch), enable_prefix_caching=False)
    llm.engine.structured.clock = Clock(llm.engine.structured, ("prepare", "apply", "accept", "is_stopped"))
    llm.engine.runner.clock = Clock(llm.engine.runner, ("execute",))
    decode_step_ms(llm, 1, "strings", "inline", 8)  # warm-up: the grammar tokenizer, the native kernels
    cases = [(None, "-")] + [(s, m) for s in SCHEMAS for m in MODES]
    per = {(b, s, m): [] for b in args.batch for s, m in cases}
    for _ in range(args.rounds):  # cases interleaved, so drift in the machine's load hits all alike
        for b in args.batch:
            for s, m in cases:
                per[b, s, m].append(decode_step_ms(llm, b, s, m, args.tokens))
    rows = []
    print(f"{'batch':>5} {'schema':<22} {'masks':<11} {'step':>7} {'vs free':>8} {'forward':>8} {'grammar':>8} "
          f"{'grammar/free step':>17}   rounds (step)")
    for b in args.batch:
        free = min(per[b, None, "-"])[0]
        for s, m in cases:
            step, fwd, gram = min(per[b, s, m])  # the least disturbed round
            rows.append({"batch": b, "schema": s, "masks": m, "step_ms_per_token": step, "vs_free": step / free - 1,
                         "forward_ms_per_token": fwd, "grammar_ms_per_token": gram, "grammar_overhead": gram / free,
                         "rounds_step_ms": [x[0] for x in per[b, s, m]]})
            print(f"{b:>5} {s or 'none (free)':<22} {m:<11} {step:>7.3f} {100 * (step / free - 1):>7.1f}% {fwd:>8.3f} "
                  f"{gram:>8.4f} {100 * gram / free:>16.1f}%   " + " ".join(f"{x[0]:.3f}" for x in per[b, s, m]))
    write_json_atomic(args.out, {"machine": machine_facts(), "model": args.model or "bundled",
                                 "vocab_size": llm.engine.model_config.vocab_size, "threads": args.threads,
                                 "tokens": args.tokens,
                                 "rounds": args.rounds, "schemas": SCHEMAS, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
