"""SpeculativeConfig: what `--speculative-config` / `LLM(speculative_config=...)` ask for (vLLM's keys).

    {"model": PATH, "num_speculative_tokens": 4}                                a draft model
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}    prompt lookup, no draft

Accepted as a JSON string, a dict or a SpeculativeConfig; every bad field is one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from strata.errors import ConfigError

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
FLAG = "--speculative-config"


@dataclass
class SpeculativeConfig:
    method: str = "draft_model"  # "ngram" (prompt lookup) or "draft_model"; "model" alone implies draft_model
    model: str | None = None  # draft model folder (same tokenizer as the target)
    num_speculative_tokens: int = 4  # k: tokens drafted per step (the most, with "adaptive")
    prompt_lookup_max: int = 4  # ngram: longest suffix n-gram looked up in the sequence
    prompt_lookup_min: int = 1  # ngram: shortest
    adaptive: bool = False  # choose k per step from the measured acceptance (policy.py)

    @classmethod
    def from_value(cls, value) -> SpeculativeConfig | None:
        if value is None or value == "" or isinstance(value, cls):
            return value or None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{FLAG}: invalid JSON ({e.msg} at column {e.colno}), got {value!r}"
                ) from None
        if not isinstance(value, dict):
            raise ConfigError(f"{FLAG}: expected a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"{FLAG}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
            )
        kw = dict(value)
        if "method" not in kw:
            kw["method"] = "draft_model" if kw.get("model") else ""
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"{FLAG}: 'method' must be one of {', '.join(METHODS)} (or give 'model'), got {self.method!r}"
            )
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"{FLAG}: 'num_speculative_tokens' must be an integer in 1..{MAX_SPECULATIVE_TOKENS}, "
                f"got {k!r}"
            )
        if self.method == "draft_model" and not isinstance(self.model, str):
            raise ConfigError(
                f"{FLAG}: method draft_model needs 'model' (a draft model folder), got {self.model!r}"
            )
        if self.method == "ngram":
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
                raise ConfigError(
                    f"{FLAG}: need integers 1 <= 'prompt_lookup_min' <= 'prompt_lookup_max', "
                    f"got {lo!r} and {hi!r}"
                )
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"{FLAG}: 'adaptive' must be true or false, got {self.adaptive!r}")
