"""Chat and text completions: request -> token ids + SamplingParams -> engine streams (the responses are
built in responses.py).

One flow serves both endpoints: a request becomes one engine request per prompt (chat has one; completions
may batch several), choice index = prompt_index * n + sequence index.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from strata.engine.admission import check_request_fits, check_token_ids
from strata.engine.sampling_params import SamplingParams
from strata.errors import InvalidRequestError, StrataError
from strata.server.async_engine import AsyncEngine
from strata.server.errors import APIError, to_api_error
from strata.server.protocol import ChatCompletionRequest, CompletionRequest
from strata.server.request_checks import check_text_length
from strata.server.request_stream import RequestStream
from strata.server.responses import RequestContext, SSEResponse
from strata.server.structured import checked_params, structured_source, tool_mode
from strata.server.tool_calls import template_messages
from strata.tokenizer import GIL_FREE_CHARS


class Serving:
    def __init__(self, engine: AsyncEngine, served_model_name: str):
        self.engine = engine
        self.model_name = served_model_name
        self._token_text: dict[int, str] = {}
        self.tool_call_parser: str | None = None  # --tool-call-parser
        self.enable_auto_tool_choice = False  # --enable-auto-tool-choice

    # ---- request -> engine inputs ---------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def chat_prompt(self, messages, add_generation_prompt: bool = True, kwargs: dict | None = None,
                    tools=None) -> list[int]:
        msgs = template_messages(messages)
        kwargs = dict(kwargs or {})
        for reserved in ("self", "messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token", "template"):
            if reserved in kwargs:
                raise APIError(400, f"chat_template_kwargs may not set {reserved!r}", "chat_template_kwargs")
        try:
            if tools:
                kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
            return self.tokenizer.encode_chat(msgs, add_generation_prompt=add_generation_prompt, **kwargs)
        except StrataError as e:
            raise APIError(400, f"{e} (serve a model whose tokenizer_config.json has a chat_template, or use "
                                "/v1/completions)", "messages") from None

    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)  # an empty prompt starts from BOS, as OpenAI's does
        if not ids:
            raise APIError(400, "the prompt is empty and the tokenizer has no BOS token", param)
        vocab = self.engine.engine.model_config.vocab_size
        if max(ids) >= vocab:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {max(ids)}", param)

    def check_context(self, num_prompt: int, max_tokens: int | None, param: str) -> None:
        check_request_fits(num_prompt, max_tokens, self.engine.engine.max_model_len, param)

    @staticmethod
    def sampling_params(req, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        kw = {k: getattr(req, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                           "frequency_penalty", "repetition_penalty") if getattr(req, k) is not None}
        if req.seed is not None:
            kw["seed"] = req.seed % 2**63
        try:
            bias = {int(k): v for k, v in (req.logit_bias or {}).items()} or None
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        try:
            return SamplingParams(n=req.n, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
                                  max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=bias,
                                  skip_special_tokens=req.skip_special_tokens, **kw)
        except InvalidRequestError as e:
            raise APIError(400, str(e), e.param) from None

    # ---- logprobs -------------------------------------------------------------------------------
    def token_text(self, tid: int) -> str:
        t = self._token_text.get(tid)
        if t is None:
            t = self._token_text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return t

    def chat_logprobs(self, entries: list[dict]) -> dict:
        def one(tid, lp):
            t = self.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(i, v) for i, v in e["top"]]}
                            for e in entries]}

    def completion_logprobs(self, entries: list[dict], offset: int) -> dict:
        """OpenAI's legacy shape; each top_logprobs dict holds the top tokens and the chosen one, as OpenAI
        documents. An entry with logprob None (a prompt's first token) has top_logprobs None."""
        tokens, offsets, tops = [], [], []
        for e in entries:
            offsets.append(offset)
            tokens.append(self.token_text(e["token_id"]))
            offset += len(tokens[-1])
            if e["logprob"] is None:
                tops.append(None)
            else:
                top = {self.token_text(i): v for i, v in e["top"]}
                top.setdefault(tokens[-1], e["logprob"])
                tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    @staticmethod
    def echo_entries(prompt_ids: list[int], prompt_logprobs: list[dict | None]) -> list[dict]:
        """Prompt logprobs as logprob entries, the first token's with logprob None."""
        return [{"token_id": prompt_ids[0], "logprob": None, "top": None}, *prompt_logprobs[1:]]

    def vllm_prompt_logprobs(self, prompt_logprobs: list[dict | None]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} holding the prompt token and the top ones."""
        out: list[dict | None] = []
        for e in prompt_logprobs:
            if e is None:
                out.append(None)
                continue
            d = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": self.token_text(i)}
                 for r, (i, v) in enumerate(e["top"])}
            d[str(e["token_id"])] = {"logprob": e["logprob"], "rank": e["rank"],
                                     "decoded_token": self.token_text(e["token_id"])}
            out.append(d)
        return out

    # ---- the shared flow ------------------------------------------------------------------------
    async def create(self, req: ChatCompletionRequest | CompletionRequest, raw: Request):
        is_chat = isinstance(req, ChatCompletionRequest)
        self.check_model(req.model)
        parser, enforced = tool_mode(req, self.tool_call_parser, self.enable_auto_tool_choice) if is_chat \
            else (None, None)
        source = structured_source(req, enforced)
        # a thread only for the costly work (grammar compilation, long texts): a hop costs the event loop more
        # than tokenizing a short prompt or rendering a short chat does
        structured = None if source is None else await asyncio.to_thread(checked_params, *source)
        if not self.engine.is_ready:
            raise to_api_error(self.engine_state_error())
        if is_chat:
            if req.top_logprobs is not None and not req.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            prompt_logprobs = req.prompt_logprobs
            max_tokens = req.max_completion_tokens or req.max_tokens
            param = "messages"
            num_chars = sum(len(m.text()) for m in req.messages)
            check_text_length(num_chars, self.engine.engine.max_model_len, param)
            chat_args = (req.messages, req.add_generation_prompt, req.chat_template_kwargs, req.tools)
            ids = self.chat_prompt(*chat_args) if num_chars <= GIL_FREE_CHARS and not req.tools \
                else await asyncio.to_thread(self.chat_prompt, *chat_args)
            prompts, texts = [ids], [None]
        else:
            logprobs, max_tokens, param = req.logprobs, req.max_tokens, "prompt"
            wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
            prompt_logprobs = max(wanted) if wanted else None
            p = req.prompt
            raw_prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
            for x in raw_prompts:
                check_text_length(len(x) if isinstance(x, str) else 0, self.engine.engine.max_model_len, param)
            if sum(len(x) for x in raw_prompts if isinstance(x, str)) <= GIL_FREE_CHARS:
                prompts = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in raw_prompts]
            else:
                prompts = [await asyncio.to_thread(self.tokenizer.encode, x) if isinstance(x, str) else list(x)
                           for x in raw_prompts]
            texts = [x if isinstance(x, str) else self.tokenizer.decode(x) for x in raw_prompts] if req.echo \
                else [None] * len(prompts)
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(400, "prompt_logprobs is not supported with stream (use echo with logprobs on "
                                "/v1/completions)", "prompt_logprobs")
        for ids in prompts:
            self._check_ids(ids, param)
            self.check_context(len(ids), max_tokens, param)
        params = self.sampling_params(req, max_tokens, logprobs, prompt_logprobs)
        check_token_ids(params, self.engine.engine.model_config.vocab_size)
        params.structured_outputs = structured
        if parser is not None and parser.needs_special_tokens:
            params.skip_special_tokens = False  # the parser reads the format's special tokens in the text
        streams: list[RequestStream] = []
        try:
            for ids in prompts:
                streams.append(self.engine.add_request(ids, params, req.request_id, req.priority))
        except Exception:
            for s in streams:
                s.abort()
            raise
        ctx = RequestContext(self, req, is_chat, prompts, texts, streams)
        ctx.tool_parser = parser
        if req.stream:
            return SSEResponse(ctx.sse(), on_close=ctx.abort_all)
        return await ctx.collect(raw)

    def engine_state_error(self) -> Exception:
        from strata.server.request_stream import EngineDeadError, EngineNotReadyError

        if self.engine.dead_reason is not None:
            return EngineDeadError(f"the engine loop has stopped: {self.engine.dead_reason}")
        return EngineNotReadyError("loading")
