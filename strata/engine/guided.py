"""Structured outputs: grammars compiled by llguidance (JSON schema, regex, choice, Lark or GBNF), one matcher per
sequence, and each step's token bitmask, filled on a worker thread while the forward pass runs and applied to
the logits before sampling.

llguidance computes masks lazily (no per-grammar precompute) and releases the GIL while it does, so the mask of
step t overlaps the model's forward of step t. A matcher advances with every accepted token; the sequence ends
("stop") as soon as its grammar admits nothing more, and EOS is allowed only where the grammar accepts.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future, ThreadPoolExecutor

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


def unpack_bitmask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token bitmask [N, ceil(V/32)] int32 (bit j of word w = token 32w+j) -> allowed [N, V] bool."""
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")  # [N, 32*W]
    return torch.from_numpy(bits[:, :vocab_size]).bool()


class StructuredOutputManager:
    """The engine's matchers (one per constrained sequence) and the mask of the step in flight."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], overlap: bool = True):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.num_words = (vocab_size + 31) // 32
        self.overlap = overlap
        self.matchers: dict[int, object] = {}  # seq_id -> LLMatcher
        self._ll_tokenizer = None
        self._executor = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[list[int], torch.Tensor, Future | None] | None = None

    def _tokenizer(self):
        if self._ll_tokenizer is None:  # built on the first constrained request (~0.2 s for a 50k vocabulary)
            import llguidance

            self._ll_tokenizer = llguidance.LLTokenizer(self._hf_tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                        eos_token=self.eos_token_ids or None)
            self._executor = llguidance.LLExecutor(num_threads=1)
        return self._ll_tokenizer

    # ---- sequences ------------------------------------------------------------------------------
    def add(self, seq: Sequence, grammar: str) -> None:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"structured_outputs: {_one_line(matcher.get_error())}",
                                      param="structured_outputs")
        self.matchers[seq.seq_id] = matcher

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
    def _fill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, Future | None]:
        mask = torch.full((len(seqs), self.num_words), -1, dtype=torch.int32)  # -1: every token allowed
        rows = [(self.matchers[s.seq_id], i) for i, s in enumerate(seqs) if s.seq_id in self.matchers]

        def fill():
            self._executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), self.num_words * 4, len(seqs))

        if self.overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-grammar")
            return mask, self._pool.submit(fill)
        fill()
        return mask, None

    def prepare(self, seqs: list[Sequence]) -> None:
        """Start filling the mask of the sequences that sample this step (call before the forward pass)."""
        self.wait()
        if self.has_any(seqs):
            mask, future = self._fill(seqs)
            self._pending = ([s.seq_id for s in seqs], mask, future)

    def wait(self) -> None:
        if self._pending is not None and self._pending[2] is not None:
            self._pending[2].result()

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [N, V] -> a copy with the tokens each row's grammar forbids at -inf."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == [s.seq_id for s in seqs]:
            mask, future = pending[1], pending[2]
            if future is not None:
                future.result()
        else:  # not prepared (the Python API's own loop, or a row re-sampled alone): fill it now
            if pending is not None and pending[2] is not None:
                pending[2].result()
            mask, future = self._fill(seqs)
            if future is not None:
                future.result()
        allowed = unpack_bitmask(mask, logits.shape[-1])  # [N, V]
        empty = ~allowed.any(dim=1)
        if bool(empty.any()):  # a matcher in an error state allows nothing: let it end on EOS
            allowed[empty.nonzero().flatten()[:, None], torch.tensor(self.eos_token_ids or [0])] = True
        return logits.masked_fill(~allowed, float("-inf"))
