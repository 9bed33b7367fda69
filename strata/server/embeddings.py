"""`/v1/embeddings`: the mean of the model's final-norm hidden states over the input's tokens, L2-normalized
(the usual pooling for a decoder without an embedding head), as floats or base64 little-endian float32.

Any loaded model serves it; the forward runs in the engine thread between two generation steps and does not
use the KV cache."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter

from strata.server.errors import APIError, to_api_error
from strata.server.protocol import EmbeddingRequest


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai SDK asks for by default and decodes with numpy.frombuffer(float32)
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embeddings_router(serving) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        serving.check_model(req.model)
        if not serving.engine.is_ready:
            raise to_api_error(serving.engine_state_error())
        engine = serving.engine.engine
        hidden = engine.model_config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"dimensions: this model's embeddings have {hidden} dimensions, got "
                                f"{req.dimensions} (shortening is not supported)", "dimensions")
        raw = req.input
        items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)
        prompts = []
        for i, item in enumerate(items):
            ids = (await asyncio.to_thread(serving.tokenizer.encode, item, req.add_special_tokens)
                   if isinstance(item, str) else list(item))
            param = "input" if len(items) == 1 else f"input[{i}]"
            if not ids:
                raise APIError(400, f"{param} is empty", "input")
            if max(ids) >= engine.model_config.vocab_size:
                raise APIError(400, f"{param}: token ids must be in [0, {engine.model_config.vocab_size}), got "
                                    f"{max(ids)}", "input")
            if len(ids) > engine.max_model_len:
                raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. "
                                    f"However, {param} has {len(ids)} tokens. Please reduce its length.",
                               "input", "context_length_exceeded")
            prompts.append(ids)
        vectors = await serving.engine.call(lambda eng: eng.embed(prompts))
        num_tokens = sum(len(p) for p in prompts)
        return {"object": "list", "model": serving.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}

    return router
