"""What a step hands out per request: RequestOutput (with one CompletionOutput per sequence), built at once, or
a DeferredOutput whose detokenizing and assembly wait for the consumer's thread.

A request without stop strings needs no text inside the engine: whether it finished is decided on token ids.
With `LLMEngine.defer_detokenization()` its step outputs are DeferredOutputs, which carry the step's new token
ids and the sequences' state at the end of the step; `resolve()` feeds the new tokens to the request's
incremental detokenizers and builds the RequestOutput that the step would have built, the same in every field.
The server resolves them in its event loop (vLLM V1 splits its engine core and output processor the same way),
whose Python then runs while the engine thread is in the GIL-free native forward.

The deferred outputs of a request must be resolved once each, in step order: each one advances the request's
detokenizers. After that, only the consumer's thread touches those detokenizers. Consecutive ones can resolve as
one (`resolve_run`): the RequestOutput of the last, carrying all their text, as RequestOutput.add makes of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.engine.detokenizer import IncrementalDetokenizer
from strata.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    delta: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    logprobs: list[dict] | None = None  # of the tokens whose text is in `text` (all of them once finished)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict | None] | None = None  # one per prompt token, None for the first

    def add(self, later: RequestOutput) -> RequestOutput:
        """`later` (an output of the same request from a later step) carrying both outputs' text deltas: what a
        consumer that fell behind takes in one go instead of one output per step (vLLM's output collector
        merges the same way). Everything else in an output is cumulative, so `later` already has it."""
        deltas = {o.index: o.delta for o in self.outputs}
        for o in later.outputs:
            o.delta = deltas.get(o.index, "") + o.delta
        return later

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated so far over all of the request's sequences."""
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def finish_reasons(self) -> list[str | None]:
        return [o.finish_reason for o in self.outputs]

    def resolve(self) -> RequestOutput:
        return self


def completion_output(seq: Sequence, detok: IncrementalDetokenizer, num_tokens: int, finished: bool,
                      finish_reason: str | None, stop_reason: str | int | None,
                      token_ids: list[int] | None = None) -> CompletionOutput:
    """The sequence's output once its first num_tokens generated tokens are in `detok`; takes the text delta.
    `token_ids`: those tokens, when seq.token_ids may hold more than its own by now (drafts)."""
    delta = detok.take_delta(final=finished)
    logprobs = None
    if seq.params.logprobs is not None:  # a copy: the engine thread goes on appending to seq.logprobs
        logprobs = seq.logprobs[: len(seq.logprobs) if finished else detok.num_tokens_emitted]
    if token_ids is None:
        start = seq.num_prompt_tokens
        token_ids = seq.token_ids[start : start + num_tokens]
    return CompletionOutput(seq.index, detok.text[: detok.num_emitted], delta, token_ids, finish_reason,
                            stop_reason, logprobs)


def request_output(first: Sequence, outputs: list[CompletionOutput], finished: bool, num_cached_tokens: int,
                   first_token_time: float | None, prompt_logprobs: list | None) -> RequestOutput:
    """first: the request's first sequence (its prompt, arrival time, and what it holds for the request)."""
    return RequestOutput(first.request_id, first.prompt_token_ids, outputs, finished, num_cached_tokens,
                         {"arrival_time": first.arrival_time, "first_token_time": first_token_time}, prompt_logprobs)


class DeferredOutput:
    """A step's output of one request, resolved into its RequestOutput later (see the module docstring)."""

    __slots__ = ("_first_token_time", "_num_cached_tokens", "_parts", "_prompt_logprobs", "_seqs", "finish_reasons",
                 "finished", "num_generated_tokens", "prompt_token_ids", "request_id")

    def __init__(self, seqs: list[Sequence], parts: list[tuple], finished: bool, num_cached_tokens: int,
                 first_token_time: float | None, prompt_logprobs: list | None):
        """parts: per sequence (detokenizer, the tokens it has yet to see, generated tokens, finished, finish
        reason, stop reason, generated token ids or None), all as of the end of the step."""
        self.request_id = seqs[0].request_id
        self.prompt_token_ids = seqs[0].prompt_token_ids
        self.finished = finished
        self.num_generated_tokens = sum(p[2] for p in parts)
        self.finish_reasons = [p[4] for p in parts]
        self._seqs, self._parts = seqs, parts
        self._num_cached_tokens, self._first_token_time = num_cached_tokens, first_token_time
        self._prompt_logprobs = prompt_logprobs

    def feed(self) -> None:
        """Feeds the step's new tokens to the request's detokenizers, building no output (a later output of the
        request, resolved next, hands out their text)."""
        for detok, new, *_ in self._parts:
            for tok in new:
                detok.add(tok)

    def resolve(self) -> RequestOutput:
        self.feed()
        outs = [completion_output(seq, detok, num, finished, reason, stop, ids)
                for seq, (detok, _, num, finished, reason, stop, ids) in zip(self._seqs, self._parts)]
        return request_output(self._seqs[0], outs, self.finished, self._num_cached_tokens, self._first_token_time,
                              self._prompt_logprobs)


def resolve_run(outputs: list[DeferredOutput]) -> RequestOutput:
    """Consecutive deferred outputs of one request, in step order, as one RequestOutput: the last one's, its
    deltas holding all of their text (equal to resolving each and joining them with RequestOutput.add: without stop
    strings every output hands out all the text its tokens complete), built once instead of once per step."""
    for out in outputs[:-1]:
        out.feed()
    return outputs[-1].resolve()
