"""The Python API: `LLM(path).generate(prompts, SamplingParams(...))`, plus `stream()` and `chat()`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import fields

from strata.config import EngineConfig
from strata.engine.llm_engine import LLMEngine, RequestOutput
from strata.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, progress: bool = True, **engine_kwargs):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_kwargs) - known
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), progress=progress)
        self.tokenizer = self.engine.tokenizer
        self.last_stats: dict = {}
        self.generation_defaults = self._generation_defaults(self.engine.model_path)

    @staticmethod
    def _generation_defaults(model_path: str) -> dict:
        """Sampling defaults from generation_config.json (read once): temperature, top_p, top_k, penalty."""
        path = os.path.join(model_path, "generation_config.json")
        gen = {}
        if os.path.exists(path):
            with open(path) as f:
                gen = json.load(f)
        kw = {}
        if gen.get("do_sample") is False:
            kw["temperature"] = 0.0
        else:
            for k in ("temperature", "top_p", "top_k"):
                if gen.get(k) is not None:
                    kw[k] = gen[k]
        if gen.get("repetition_penalty") is not None:
            kw["repetition_penalty"] = gen["repetition_penalty"]
        return kw

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams from the model's generation_config.json defaults, then the overrides."""
        kw = dict(self.generation_defaults)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**kw)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs all prompts batched together; returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.default_sampling_params()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        results: dict[str, RequestOutput] = {}
        t0 = time.perf_counter()
        gen0 = self.engine.stats["generation_tokens"]
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        self._record(time.perf_counter() - t0, self.engine.stats["generation_tokens"] - gen0)
        return [results[i] for i in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one completion as tokens arrive."""
        rid = self.engine.add_request(prompt, sampling_params or self.default_sampling_params())
        t0 = time.perf_counter()
        gen0 = self.engine.stats["generation_tokens"]
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid and out.outputs[0].delta:
                        yield out.outputs[0].delta
        finally:
            self.engine.abort_request(rid)
            self._record(time.perf_counter() - t0, self.engine.stats["generation_tokens"] - gen0)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None, **template_kwargs) -> str:
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True, **template_kwargs)
        return self.generate([ids], sampling_params)[0].outputs[0].text

    def _record(self, seconds: float, num_tokens: int) -> None:
        self.last_stats = {
            "generated_tokens": num_tokens,
            "elapsed_s": seconds,
            "tokens_per_s": num_tokens / seconds if seconds > 0 else 0.0,
        }
