"""The FastAPI app: routes, the API-key and body-size guard, and error handlers that turn every failure
(validation, unknown route, engine state) into the OpenAI error object with the right status."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

import strata
from strata.errors import ConfigError
from strata.server.async_engine import AsyncEngine
from strata.server.embeddings import embeddings_router
from strata.server.errors import EXPECTED_ERRORS, APIError, CatchAllMiddleware, to_api_error
from strata.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    MigrateRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from strata.server.request_checks import check_text_length, has_lone_surrogate, origin_error
from strata.server.serving import Serving
from strata.server.tool_parsers import get_tool_parser

DEFAULT_MAX_BODY_BYTES = 2 * 2**20
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to receive a whole request body
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/admin/")


class GuardMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would break disconnect detection): Host and Origin checks (DNS
    rebinding, cross-site posts), bearer key on the /v1 routes, and a body size limit checked on
    Content-Length and on the bytes actually received, within a time limit. Only the API routes' bodies are
    read here; any other path is answered by the router without reading its body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: list[str] | None = None,
                 allowed_origins: list[str] | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes
        self.allowed_hosts, self.allowed_origins, self.body_timeout = allowed_hosts, allowed_origins, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = origin_error(headers, self.allowed_hosts, self.allowed_origins)
        if refused is not None:
            return await refused.response()(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        too_big = APIError(413, f"Request body larger than {self.limit} bytes.", code="request_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH") or not scope["path"].startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        body, more = b"", True
        try:
            async with asyncio.timeout(self.body_timeout):  # a client that stalls mid-body holds memory
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > self.limit:
                        return await too_big.response()(scope, receive, send)
        except TimeoutError:
            slow = APIError(408, f"Request body not received within {self.body_timeout:g} s.", code="request_timeout")
            return await slow.response()(scope, receive, send)
        if has_lone_surrogate(body):
            err = APIError(400, "Invalid body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff); send "
                                "valid Unicode", code="invalid_unicode")
            return await err.response()(scope, receive, send)
        # Every POST route takes JSON; `curl -d` sends form-urlencoded, so read the body as JSON regardless.
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


PROMPT_SHAPES = ("prompt must be a string, a list of strings, a list of token ids (integers >= 0), or a list "
                 "of non-empty lists of token ids (at most 64 prompts)")


def _validation_error(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    e = errs[0] if errs else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return APIError(400, f"Invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "extra_forbidden" and loc:
        return APIError(400, f"Unrecognized request argument supplied: {loc[-1]}", ".".join(loc),
                        "unsupported_parameter")
    # prompt is a union: pydantic's first error names one arm ("prompt.str"), not the shapes allowed
    if len(loc) > 1 and loc[0] == "prompt" and not loc[1].isdigit():
        return APIError(400, PROMPT_SHAPES, "prompt", "invalid_value")
    param = ".".join(loc) or None
    first = param or "body"
    return APIError(400, f"{first}: {e.get('msg', 'invalid value')}", param, "invalid_value")


def create_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 30.0,
               allowed_origins: list[str] | None = None, tool_call_parser: str | None = None,
               enable_auto_tool_choice: bool = False, allowed_hosts: list[str] | None = None,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    serving = Serving(engine, served_model_name)
    if tool_call_parser is not None:
        get_tool_parser(tool_call_parser)  # an unknown name fails at start, not on the first request
    elif enable_auto_tool_choice:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral)")
    serving.tool_call_parser, serving.enable_auto_tool_choice = tool_call_parser, enable_auto_tool_choice
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start(asyncio.get_running_loop())
        yield
        # uvicorn has stopped accepting connections and waited for in-flight requests (its graceful
        # shutdown); give the engine a last chance to finish anything still tracked, then stop it.
        deadline = time.monotonic() + drain_timeout
        while engine.num_unfinished and engine.dead_reason is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="Strata", version=strata.__version__ if hasattr(strata, "__version__") else "0",
                  lifespan=lifespan, responses={400: {"model": ErrorResponse}})
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                       allowed_origins=allowed_origins, body_timeout=body_timeout)
    if allowed_origins:  # off by default: a page in the user's browser may not call a local server
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = f"{request.method} {request.url.path}: not found" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, msg).response()

    async def _expected(request, exc: Exception):
        return to_api_error(exc).response()

    for exc_type in EXPECTED_ERRORS:
        app.add_exception_handler(exc_type, _expected)

    @app.get("/health")
    async def health():
        if engine.dead_reason is not None:
            return JSONResponse({"error": {"code": 503, "message": f"Engine stopped: {engine.dead_reason}",
                                           "type": "unavailable_error"}}, status_code=503)
        if not engine.is_ready:
            return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                status_code=503, headers={"Retry-After": "5"})
        return engine.health()

    if hasattr(engine, "migrate"):  # replicas (strata/replicas/router.py): live migration on demand
        @app.post("/admin/migrate")
        async def migrate(req: MigrateRequest):
            """Move a running request (`request_id`, else one of the busiest replica's) with its KV to replica
            `to` (else the least loaded), live (pre-copy stages) unless max_stages is 1; its client's stream goes
            on."""
            return await engine.migrate(req.request_id, req.to, req.max_stages)

    @app.get("/version")
    async def version():
        return {"version": getattr(strata, "__version__", "0.1.0"), "model": served_model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        max_len = engine.engine.max_model_len if engine.engine is not None else None
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "strata",
                "root": served_model_name, "max_model_len": max_len}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str):
        serving.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await serving.create(req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await serving.create(req, request)

    def _need_engine():
        if not engine.is_ready:
            raise to_api_error(serving.engine_state_error())

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        serving.check_model(req.model)
        _need_engine()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        texts = [m.text() for m in req.messages] if req.messages is not None else [req.prompt]
        check_text_length(sum(map(len, texts)), engine.engine.max_model_len, "prompt")
        if req.messages is not None:
            ids = serving.chat_prompt(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        else:
            ids = serving.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        serving.check_model(req.model)
        _need_engine()
        vocab = engine.engine.model_config.vocab_size
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's tokenizer description; lm-evaluation-harness's remote tokenizer reads it."""
        _need_engine()
        tok = serving.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
                "eos_token": tok.eos_token, "pad_token": tok.pad_token, "chat_template": tok.chat_template,
                "add_bos_token": tok.add_bos_token, "model_max_length": engine.engine.max_model_len}

    app.include_router(embeddings_router(serving))
    app.state.serving = serving
    app.state.engine = engine
    return app
