"""xgrammar against llguidance on this CPU: grammar compile time for a few JSON schemas and the time to fill
one sequence's token bitmask per generated token, for the bundled model's 2,048-token vocabulary and for a
49,152-token GPT-2-style byte-level BPE vocabulary (SmolLM2's, read from its GGUF through transformers).

Each engine runs on one thread. A step is: fill the mask for the current state, then accept the next token of
a valid JSON instance of the schema (its canonical BPE tokenization). Compile time is cold (a fresh compiler,
no cache). Results: docs/benchmarks/grammar_engines.json.

    .venv/bin/python benchmarks/grammar_engines.py --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from strata.fileio import write_json_atomic

BUNDLED = ROOT / "strata" / "assets" / "models" / "shakespeare-moe" / "tokenizer.json"

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]},
             {"name": "Juliet Capulet", "age": 13}),
    "enum+pattern": ({"type": "object", "properties": {
        "mood": {"enum": ["happy", "sad", "angry"]},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "score": {"type": "number", "minimum": 0}},
        "required": ["mood", "code"]},
        {"mood": "sad", "code": "ROM-1597", "score": 7.5}),
    "nested+arrays": ({"type": "object", "properties": {
        "play": {"type": "string"},
        "acts": {"type": "array", "items": {"type": "object", "properties": {
            "number": {"type": "integer"},
            "scenes": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
            "required": ["number", "scenes"]}},
        "meta": {"type": "object", "properties": {"year": {"type": "integer"}, "tragic": {"type": "boolean"}}}},
        "required": ["play", "acts"]},
        {"play": "Hamlet", "acts": [{"number": 1, "scenes": ["Elsinore, a platform", "A room of state"]},
                                    {"number": 2, "scenes": ["Polonius' house"]}],
         "meta": {"year": 1600, "tragic": True}}),
}


def _hf_tokenizer(tokenizer_json: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int):
        from llguidance import LLMatcher, LLTokenizer

        self.LLMatcher = LLMatcher
        t = time.perf_counter()
        self.tok = LLTokenizer(Path(tokenizer_json).read_text(), n_vocab=vocab_size, eos_token=eos)
        self.init_s = time.perf_counter() - t
        self.words = (vocab_size + 31) // 32

    def compile(self, schema: dict):
        m = self.LLMatcher(self.tok, self.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def mask_steps(self, matcher, ids: list[int]) -> list[float]:
        import torch

        mask = torch.zeros(self.words, dtype=torch.int32)
        ptr, size = mask.data_ptr(), self.words * 4
        times = []
        for tok in ids:
            t = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(ptr, size)
            times.append(time.perf_counter() - t)
            assert (int(mask[tok // 32]) >> (tok % 32)) & 1, f"token {tok} masked out"
            assert matcher.consume_token(tok), matcher.get_error()
        return times


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int):
        import xgrammar as xgr

        self.xgr = xgr
        hf = _hf_tokenizer(tokenizer_json)
        t = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
        self.init_s = time.perf_counter() - t
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return self.xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))

    def mask_steps(self, matcher, ids: list[int]) -> list[float]:
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for tok in ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - t)
            assert (int(mask[0, tok // 32]) >> (tok % 32)) & 1, f"token {tok} masked out"
            assert matcher.accept_token(tok)
        return times


def run(engine_cls, tokenizer_json: str, vocab_size: int, eos: int, rounds: int) -> dict:
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_file(tokenizer_json)
    eng = engine_cls(tokenizer_json, vocab_size, eos)
    out = {"tokenizer_init_ms": eng.init_s * 1e3, "schemas": {}}
    for name, (schema, instance) in SCHEMAS.items():
        ids = tok.encode(json.dumps(instance), add_special_tokens=False).ids
        compiles, steps = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            matcher = eng.compile(schema)
            compiles.append(time.perf_counter() - t)
            steps.extend(eng.mask_steps(matcher, ids))
        out["schemas"][name] = {"compile_ms": statistics.median(compiles) * 1e3, "tokens": len(ids),
                                "mask_us_mean": statistics.mean(steps) * 1e6,
                                "mask_us_p50": statistics.median(steps) * 1e6,
                                "mask_us_max": max(steps) * 1e6}
    return out


def gguf_tokenizer_json(gguf: Path, dest: Path) -> Path:
    """tokenizer.json of a GGUF file's vocabulary, through transformers' GGUF reader."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf.backend_tokenizer.save(str(dest))
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF file whose 49,152-token vocabulary is the second case")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "grammar_engines.json")
    args = ap.parse_args(argv)
    import tempfile

    from strata.commands.bench_serve import machine_facts

    vocabs = [("bundled (2,048)", str(BUNDLED), 2048, 0)]
    tmp = tempfile.TemporaryDirectory()
    if args.gguf:
        path = gguf_tokenizer_json(args.gguf, Path(tmp.name) / "tokenizer.json")
        vocabs.append(("SmolLM2 BPE (49,152)", str(path), 49152, 2))
    engines = []
    for cls in (LLGuidance, XGrammar):
        try:
            __import__(cls.name)
            engines.append(cls)
        except ImportError:
            print(f"{cls.name} is not installed: skipped")
    results = {"machine": machine_facts(), "threads": 1, "rounds": args.rounds, "results": {}}
    print(f"{'vocabulary':<22} {'engine':<11} {'schema':<14} {'compile ms':>10} {'mask us/token':>14} "
          f"{'p50':>7} {'max':>8}")
    for label, path, vocab, eos in vocabs:
        for cls in engines:
            r = run(cls, path, vocab, eos, args.rounds)
            results["results"].setdefault(label, {})[cls.name] = r
            for schema, s in r["schemas"].items():
                print(f"{label:<22} {cls.name:<11} {schema:<14} {s['compile_ms']:>10.2f} {s['mask_us_mean']:>14.1f} "
                      f"{s['mask_us_p50']:>7.1f} {s['mask_us_max']:>8.1f}")
            print(f"{label:<22} {cls.name:<11} tokenizer init {r['tokenizer_init_ms']:.0f} ms")
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
