"""The API's errors: OpenAI's error shape, and the one table from a runtime error's code to HTTP.

Every refusal is JSON `{"error": {"message", "type", "param", "code"}}`, with `param` naming the
request field at fault. Over HTTP it is the response (http.py), over the WebSocket an error message
(ws.py). The service raises `ApiError` for what only the API knows (keys, tenants, fields); a
`RealmError` from the runtime becomes one through `STATUS_BY_CODE`, by its code, never its class.
"""

from __future__ import annotations

from typing import Any

from realm_wasm.errors import RealmError

# HTTP status -> OpenAI's error "type"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
               413: "request_too_large", 429: "rate_limit_error",
               500: "server_error", 503: "server_busy"}

# RealmError.code -> HTTP status: who can act on it
STATUS_BY_CODE = {
    # the request: the caller fixes it
    "bad-request": 400,
    "context-overflow": 400,
    "no-model": 404,
    "bad-adapter": 400,  # an adapter the caller uploaded or asked for that does not fit the model
    "no-adapter": 404,
    "adapter-conflict": 409,  # the adapter id is taken, or every adapter slot is in use
    # the server cannot run it now (its GPU is missing, full or gone): retry later or elsewhere
    "no-webgpu": 503,
    "unsupported-on-gpu": 503,  # the server picked the backend at load, not the caller
    "out-of-memory": 503,
    "device-lost": 503,
    # the server's own fault: nothing the caller can do
    "bad-model": 500,
    "bad-config": 500,
    "gpu": 500,
    "runtime": 500,
    "internal": 500,
}


class ConfigError(RealmError, ValueError):
    """The server's configuration cannot work: a bad tenants file, open access on a public address."""

    code = "bad-config"


class ApiError(Exception):
    """A request the API refuses: becomes an HTTP error response or a WebSocket error message."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def api_error(error: RealmError, param: str | None = None) -> ApiError:
    """The refusal for a runtime error, its status looked up by code (500 for a code not in the table)."""
    return ApiError(STATUS_BY_CODE.get(error.code, 500), str(error), param, code=error.code)
