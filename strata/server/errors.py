"""The one OpenAI error shape used everywhere: `{"error": {"message", "type", "param", "code"}}`, as an HTTP
response or as an SSE event once a stream has started, and the mapping from Strata's exceptions to it."""

from __future__ import annotations

import json
import logging

from starlette.responses import JSONResponse

from strata.errors import InvalidRequestError, StrataError
from strata.server.request_stream import (
    EngineDeadError,
    EngineNotReadyError,
    OverloadedError,
    RequestFailedError,
    RequestTimeoutError,
)

log = logging.getLogger("strata.server")
# Raised by the engine or the request checks; each gets its own exception handler, so they never reach
# Starlette's ServerErrorMiddleware (which logs a traceback and makes uvicorn close the connection).
EXPECTED_ERRORS = (StrataError, OverloadedError, EngineNotReadyError, EngineDeadError, RequestTimeoutError,
                   RequestFailedError)
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        return f"data: {json.dumps(self.body(), ensure_ascii=False)}\n\n"


def to_api_error(e: BaseException) -> APIError:
    """Any exception raised while serving a request -> the APIError the client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return APIError(400, str(e), e.param, e.code)
    if isinstance(e, OverloadedError):
        return APIError(429, str(e), code="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(e, EngineNotReadyError):
        return APIError(503, "The model is still loading. Retry later.", code="model_loading",
                        headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, RequestTimeoutError):
        return APIError(504, str(e), code="request_timeout")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), code="generation_failed")
    if isinstance(e, StrataError):  # e.g. a chat template that raised: the request's fault
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


class CatchAllMiddleware:
    """Pure ASGI, innermost of the app's middlewares: an exception no handler took becomes the OpenAI error
    body here, with one traceback logged, so the keep-alive connection survives (an Exception handler would
    run inside ServerErrorMiddleware, which re-raises to uvicorn)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as e:
            if started:  # the response is already on its way; nothing sensible to add
                raise
            err = to_api_error(e)
            if err.status >= 500:
                log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            await err.response()(scope, receive, send)
