"""What every request passes before a route sees it: Host, Origin and CORS, security headers, and
JSON for the refusals Starlette itself makes.

    Host      open mode (no tenants file): loopback names only (localhost, 127.0.0.1, [::1] or another
              loopback address, any port) or those of `realm serve --allowed-host NAME`; this stops DNS
              rebinding, where a web page's own name comes to resolve to 127.0.0.1. With tenants, only
              when --allowed-host gives names. Anything else: 403.
    Origin    a request whose Origin header is not the server's own origin (scheme://Host) is
              refused with 403 unless `realm serve --cors-origin ORIGIN` lists it ("*": any, tenants
              mode only): browsers send Origin with every cross-origin fetch, form POST (text/plain
              ones too) and WebSocket handshake, so another site cannot use the API through a visitor.
    CORS      a listed origin's preflight (OPTIONS with Access-Control-Request-Method) gets 204 with
              the methods and the Authorization and Content-Type headers allowed; its other answers
              carry Access-Control-Allow-Origin.
    headers   every HTTP answer: SECURITY_HEADERS (nosniff, no referrer, no framing, same-origin
              opener and resources). No COEP: the page may load Pyodide from a CDN.
    errors    Starlette's own refusals (405 for a method a route does not take, 404 of routing) and
              failures no route caught become JSON in OpenAI's shape (errors.py).

Refusals below the app cannot be JSON: uvicorn's HTTP parser answers a malformed request (a
negative or non-numeric Content-Length, a bad request line) with its own plain-text 400, and its
WebSocket layer closes a frame that is not UTF-8 (1007) or over its size (1009).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, ConfigError

HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", re.ASCII)  # a DNS name or an IPv4 address
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
ANY_ORIGIN = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
CORS_METHODS = "GET, HEAD, POST, PUT, DELETE"
CORS_REQUEST_HEADERS = "Authorization, Content-Type, Range"
CORS_EXPOSED_HEADERS = "Retry-After, Content-Range, Content-Length, ETag"
CORS_MAX_AGE_S = 600


def bearer(conn: HTTPConnection) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, if there is one."""
    scheme, _, key = conn.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def host_name(host: str) -> str:
    """The name part of a Host header or URL authority, lower-cased: "[::1]:8000" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def normal_origin(origin: str) -> str | None:
    """An origin as "scheme://host:port" with its port spelled out, or None when it is not one
    (a path, no host, another scheme, the opaque "null")."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number, or out of range
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or \
            parts.query or parts.fragment or parts.username is not None:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{name}:{port}"


@dataclass(frozen=True)
class DoorPolicy:
    """Which Host names and which other origins the server answers."""

    hosts: frozenset[str] | None  # Host names answered (None: any)
    cors_origins: frozenset[str]  # normalized origins allowed besides the server's own; ANY_ORIGIN: every one

    @classmethod
    def build(cls, open_mode: bool, allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> DoorPolicy:
        """The policy of `realm serve`: open mode answers loopback names and `allowed_hosts`;
        with tenants, only `allowed_hosts` when some are given. ConfigError for a bad name or origin."""
        names = set()
        for name in allowed_hosts:
            bare = name.strip().lower()
            inner = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
            try:  # an IPv6 address: a Host header has it in brackets
                bare = f"[{ipaddress.IPv6Address(inner)}]"
            except ValueError:
                if not HOST_NAME.fullmatch(bare):
                    raise ConfigError(f"--allowed-host {name!r} is not a host name (no scheme, port or path)") from None
            names.add(bare)
        origins = set()
        for origin in cors_origins:
            if origin.strip() == ANY_ORIGIN:
                if open_mode:
                    raise ConfigError("--cors-origin '*' needs a tenants file: in open mode it would let any web "
                                      "page use this server through its visitors' browsers")
                origins.add(ANY_ORIGIN)
                continue
            normal = normal_origin(origin)
            if normal is None:
                raise ConfigError(f"--cors-origin {origin!r} is not an origin (scheme://host[:port], e.g. "
                                  "https://app.example)")
            origins.add(normal)
        hosts = LOOPBACK_HOSTS | names if open_mode else (frozenset(names) or None)
        return cls(hosts, frozenset(origins))

    def refusal(self, conn: HTTPConnection) -> ApiError | None:
        """Why the server does not answer this request (Host or Origin), or None."""
        host = conn.headers.get("host")
        if self.hosts is not None and host is not None and not self.answers(host_name(host)):
            return ApiError(403, f"this server does not answer to Host {host!r} (allowed: "
                            f"{', '.join(sorted(self.hosts))}; add names with realm serve --allowed-host NAME)",
                            code="host_not_allowed")
        origin = conn.headers.get("origin")
        if origin is not None and not self.same_origin(conn, origin) and not self.allows(origin):
            return ApiError(403, f"cross-origin requests from {origin!r} are not allowed (realm serve "
                            "--cors-origin ORIGIN allows one)", code="origin_not_allowed")
        return None

    def answers(self, name: str) -> bool:
        """A Host name it answers: a listed one, or (open mode) any loopback address, such as 127.0.0.2
        (an address literal cannot be rebound, only a DNS name can)."""
        if self.hosts is None or name in self.hosts:
            return True
        if not LOOPBACK_HOSTS <= self.hosts:
            return False
        try:
            return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
        except ValueError:
            return False

    @staticmethod
    def same_origin(conn: HTTPConnection, origin: str) -> bool:
        scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
        host = conn.headers.get("host")
        own = normal_origin(f"{scheme}://{host}") if host else None
        return own is not None and normal_origin(origin) == own

    def allows(self, origin: str) -> bool:
        return ANY_ORIGIN in self.cors_origins or normal_origin(origin) in self.cors_origins


class Doors:
    """ASGI middleware applying a DoorPolicy to HTTP and WebSocket requests, answering CORS
    preflights and adding the security headers to every HTTP answer."""

    def __init__(self, app: ASGIApp, policy: DoorPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        refused = self.policy.refusal(conn)
        if scope["type"] == "websocket":
            if refused is not None:
                await refuse_websocket(scope, send, refused)
            else:
                await self.app(scope, receive, send)
            return
        origin = conn.headers.get("origin")
        cors = {}
        if origin is not None and refused is None and not self.policy.same_origin(conn, origin):
            cors = {"access-control-allow-origin": origin, "vary": "Origin",
                    "access-control-expose-headers": CORS_EXPOSED_HEADERS}
        if refused is not None:
            response: Response | None = error_response(refused)
        elif scope["method"] == "OPTIONS" and cors and "access-control-request-method" in conn.headers:
            response = Response(status_code=204, headers={
                **cors, "access-control-allow-methods": CORS_METHODS,
                "access-control-allow-headers": CORS_REQUEST_HEADERS, "access-control-max-age": str(CORS_MAX_AGE_S)})
        else:
            response = None
        extra = [(k.encode(), v.encode("latin-1")) for k, v in {**SECURITY_HEADERS, **cors}.items()]  # as ASGI
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", ())}
                message = {**message, "headers": [*message.get("headers", ()),
                                                  *((k, v) for k, v in extra if k not in present)]}
            await send(message)

        if response is not None:
            await response(scope, receive, send_with_headers)
            return
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:  # a bug below: still a JSON answer (Starlette's error middleware logs and re-raises)
            if not started:
                await error_response(ApiError(500, "internal error"))(scope, receive, send_with_headers)
            raise


async def refuse_websocket(scope: Scope, send: Send, error: ApiError) -> None:
    """Refuse a WebSocket handshake: an HTTP 403 with the JSON error where the server supports
    that (ASGI's websocket.http.response), else a plain 403 (a close before accept)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await error_response(error)(scope, _nothing_to_receive, send)  # Starlette sends it as a denial
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})


async def _nothing_to_receive() -> Message:
    raise RuntimeError("a denial response reads nothing")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


async def http_exception_as_json(request: Request, exc: Exception) -> Response:
    """Starlette's HTTPException (405, routing's 404) in OpenAI's error shape, its headers kept."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else exc.detail
    return error_response(ApiError(exc.status_code, message, headers=dict(exc.headers or {})))
