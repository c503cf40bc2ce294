"""Typed errors: one class per kind of refusal, all `RealmError`s carrying the server's fields."""

from __future__ import annotations

from typing import Any


class RealmError(Exception):
    """The server refused or failed a request. `param` names the offending field when it knows."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.retry_after = retry_after


class BadRequestError(RealmError):
    """400 or 413: the request itself is wrong (see `param`)."""


class AuthenticationError(RealmError):
    """401: missing or unknown API key."""


class PermissionDeniedError(RealmError):
    """403: the tenant may not use this model or setting."""


class NotFoundError(RealmError):
    """404: no such model or route."""


class RateLimitError(RealmError):
    """429: a tenant limit; `retry_after` says how many seconds to wait."""


class ServerError(RealmError):
    """5xx: the server failed or is overloaded (503 comes with `retry_after`)."""


class APIConnectionError(RealmError):
    """The server could not be reached, or the connection broke mid-request."""


ERRORS: dict[int, type[RealmError]] = {400: BadRequestError, 413: BadRequestError, 401: AuthenticationError,
                                        403: PermissionDeniedError, 404: NotFoundError, 429: RateLimitError}


def error_from(status: int, body: Any, retry_after: str | float | None = None) -> RealmError:
    """The typed error for a status and the server's JSON error body (or whatever came instead)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body)[:200] or f"HTTP {status}"}
    cls = ERRORS.get(status, ServerError if status >= 500 else RealmError)
    return cls(str(err.get("message")), status, err.get("type"), err.get("param"), err.get("code"),
               float(retry_after) if retry_after is not None else None)
