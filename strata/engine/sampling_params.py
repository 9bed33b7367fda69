"""SamplingParams: how one request is decoded (vLLM names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strata.errors import InvalidRequestError

MIN_TEMPERATURE = 0.01
MAX_PENALTY = 100.0  # repetition_penalty in [1 / MAX_PENALTY, MAX_PENALTY]


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's names): exactly one of a JSON schema (dict or JSON text), a
    regex, a list of choices, a grammar (Lark or GBNF/EBNF), or any JSON object."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None  # JSON only: allowed whitespace between tokens (default: none)

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError("structured_outputs needs exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {given or 'none'}", param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of strings",
                                      param="structured_outputs.choice")

    @property
    def kind(self) -> str:
        return next((k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None), "json_object")

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16  # None = up to the model's context
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0 = only the sampled one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (computed in prefill)
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

        def check(ok: bool, param: str, what: str):
            if not ok:
                raise InvalidRequestError(f"{param} must be {what}, got {getattr(self, param)!r}", param=param)

        def number(v) -> bool:  # NaN fails every comparison below, so it is refused too
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        # Below MIN_TEMPERATURE the logits / temperature overflow to inf and the probabilities become NaN.
        check(number(self.temperature) and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100),
              "temperature", f"0 (greedy) or in [{MIN_TEMPERATURE}, 100]")
        check(number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1, 0 or a positive integer")
        check(number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(number(self.repetition_penalty) and 1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY,
              "repetition_penalty", f"in [{1 / MAX_PENALTY}, {MAX_PENALTY}]")
        check(number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "in [-2, 2]")
        check(self.logit_bias is None or all(isinstance(k, int) and number(v) and -100 <= v <= 100
                                             for k, v in self.logit_bias.items()),
              "logit_bias", "a map of token ids to biases in [-100, 100]")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "token ids (integers >= 0)")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "an integer >= 1")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              "logprobs", "an integer in [0, 20]")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", "an integer in [0, 20]")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
