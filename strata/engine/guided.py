"""Structured outputs: grammars compiled by llguidance (JSON schema, regex, choice, Lark or GBNF), one matcher per
sequence, and each step's token bitmask applied to the logits before sampling.

A matcher advances with every accepted token; the sequence ends ("stop") as soon as its grammar admits nothing
more, and EOS is allowed only where the grammar accepts. Masks are filled after the forward pass by default: for
typical JSON llguidance needs 1-10 us a row, less than handing the work to another thread costs on a busy CPU.
With `overlap = True` they fill on a worker thread during the forward (llguidance releases the GIL), which pays
when masks are dear (bounded strings over a large vocabulary) and a core is free; benchmarks/structured.py
measures both.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from strata.engine.sampling_params import StructuredOutputsParams
from strata.engine.sequence import Sequence
from strata.errors import InvalidRequestError

# `{"a": 1, "b": [2, 3]}` as json.dumps writes it: no free whitespace, so a model cannot loop on blanks
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def closed_objects(schema):
    """The schema with `additionalProperties: false` on every object that declares `properties` and says
    nothing about extra ones (OpenAI's strict mode asks for it): a model then ends its objects instead of
    inventing keys forever, and every output still validates against the schema as given."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    return out


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines[1:] if ln.startswith("error:")]
    return " ".join(lines[:1] + errors)


@functools.lru_cache(maxsize=256)
def _compile(kind: str, spec: str, whitespace_pattern: str | None) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    param = f"structured_outputs.{kind}"
    if kind in ("json", "json_object"):
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{param}: the schema is not valid JSON ({e.msg} at column {e.colno})",
                                      param=param) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}",
                                      param=param)
        opts = dict(JSON_OPTIONS)
        if whitespace_pattern is not None:
            opts.update(whitespace_flexible=True, whitespace_pattern=whitespace_pattern)
        grammar = LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=opts)
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        grammar = LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    else:
        try:
            grammar = LLMatcher.grammar_from_lark(any_to_lark(spec))
        except Exception as e:  # noqa: BLE001 - the GBNF converter raises plain exceptions
            raise InvalidRequestError(f"{param}: cannot read the grammar ({_one_line(str(e))})", param=param) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequestError(f"{param}: {_one_line(messages[0])}", param=param)
    return grammar


def compile_grammar(params: StructuredOutputsParams) -> str:
    """llguidance grammar text of the constraint; InvalidRequestError with a one-line reason if it is invalid."""
    kind = params.kind
    spec = params.spec
    if kind == "json_object":
        spec = '{"type": "object"}'
    elif kind == "json" and not isinstance(spec, str):
        spec = json.dumps(spec)  # key order kept: properties are generated in schema order
    elif kind == "choice":
        spec = json.dumps(list(spec))
    return _compile(kind, spec, params.whitespace_pattern)


def unpack_bitmask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token bitmask [N, ceil(V/32)] int32 (bit j of word w = token 32w+j) -> allowed [N, V] uint8 0/1."""
    return np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]


class StructuredOutputManager:
    """The engine's matchers (one per constrained sequence) and the mask of the step in flight."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], overlap: bool = False):
        self.tokenizer = tokenizer
        # the mask covers the logits and every token the tokenizer knows (either may be the longer)
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.eos_token_ids = list(eos_token_ids)
        self.num_words = (self.vocab_size + 31) // 32
        self.overlap = overlap
        self.matchers: dict[int, object] = {}  # seq_id -> LLMatcher
        self._ll_tokenizer = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list[int], np.ndarray, object] | None = None  # (seq ids, mask, future)

    def _llg_tokenizer(self):
        if self._ll_tokenizer is None:  # built once, on the first constrained request (it reads the whole vocabulary)
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                        eos_token=self.eos_token_ids or None)
        return self._ll_tokenizer

    # ---- sequences ------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence], grammar: str) -> None:
        """A matcher of the grammar for each of the sequences (all or none)."""
        from llguidance import LLMatcher

        matchers = [LLMatcher(self._llg_tokenizer(), grammar, log_level=0) for _ in seqs]
        if matchers and matchers[0].is_error():
            raise InvalidRequestError(f"structured_outputs: {_one_line(matchers[0].get_error())}",
                                      param="structured_outputs")
        self.matchers.update((s.seq_id, m) for s, m in zip(seqs, matchers))

    def free(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)

    def has_any(self, seqs: list[Sequence]) -> bool:
        return bool(self.matchers) and any(s.seq_id in self.matchers for s in seqs)

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's matcher; False if the grammar refuses the token."""
        m = self.matchers.get(seq.seq_id)
        return m is None or m.consume_token(token)

    def is_stopped(self, seq: Sequence) -> bool:
        """The grammar is complete and admits no further token."""
        m = self.matchers.get(seq.seq_id)
        return m is not None and m.is_stopped()

    # ---- masks ----------------------------------------------------------------------------------
    def _fill(self, seqs: list[Sequence], mask: np.ndarray) -> list[int]:
        """Each constrained row's mask into mask [N, W] (rows of unconstrained sequences stay all-ones);
        returns the rows whose matcher is in an error state (their mask allows nothing)."""
        size = self.num_words * 4
        base = mask.ctypes.data
        broken = []
        for i, s in enumerate(seqs):
            m = self.matchers.get(s.seq_id)
            if m is not None:
                m.unsafe_compute_mask_ptr(base + i * size, size)  # releases the GIL while it runs
                if m.is_error():
                    broken.append(i)
        return broken

    def prepare(self, seqs: list[Sequence]) -> None:
        """With `overlap`, start filling the mask of the sequences that sample this step on the worker thread
        (call before the forward pass; `apply` waits for it)."""
        self.wait()
        if self.overlap and self.has_any(seqs):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-grammar")
            mask = np.full((len(seqs), self.num_words), -1, dtype=np.int32)
            self._pending = ([s.seq_id for s in seqs], mask, self._pool.submit(self._fill, seqs, mask))

    def wait(self) -> list[int]:
        return self._pending[2].result() if self._pending is not None else []

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [N, V] -> a copy with the tokens each row's grammar forbids at -inf."""
        broken = self.wait()
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != [s.seq_id for s in seqs]:
            # not prepared (inline masks, or a row re-sampled alone): fill it now
            pending = (None, np.full((len(seqs), self.num_words), -1, dtype=np.int32), None)  # mask [N, W]
            broken = self._fill(seqs, pending[1])
        bits = unpack_bitmask(pending[1], logits.shape[-1])  # [N, V]
        if broken:  # a matcher in an error state allows nothing: let it end on EOS
            bits[np.array(broken)[:, None], self.eos_token_ids or [0]] = 1
        return logits.masked_fill(torch.from_numpy(bits == 0), float("-inf"))
