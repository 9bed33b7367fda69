"""The one OpenAI error shape used everywhere: `{"error": {"message", "type", "param", "code"}}`, as an HTTP
response or as an SSE event once a stream has started, and the mapping from Strata's exceptions to it."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from strata.errors import InvalidRequestError, StrataError
from strata.server.async_engine import (
    EngineDeadError,
    EngineNotReadyError,
    OverloadedError,
    RequestFailedError,
    RequestTimeoutError,
)

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
