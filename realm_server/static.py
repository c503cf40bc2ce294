"""Static part of the server: the page, Pyodide, the runtime bundle and model files.

URL layout (what web/ expects):
    /                 web/index.html, and the rest of web/ by name
    /config.json      settings the page reads at start (`page_config`: Pyodide base URL, the wheels
                      it loads besides numpy, bundle URL, models with size and kind)
    /pyodide/<file>   web/vendor/pyodide/ (filled by scripts/vendor_pyodide.py)
    /dist/<file>      web/dist/ (scripts/build_bundle.py writes realm_wasm.zip there)
    /models/<name>    a .gguf model of config.json's list: the first configured model directory
                      that holds <name>; with tenants, behind a key (Authorization: Bearer KEY) of
                      a tenant that may use the model, and config.json lists none (the page sends
                      no key: it is for open mode, or for models from a URL)

Every file answers GET and HEAD with an ETag (If-None-Match gives 304), one byte range at a time
(206; 416 when the range is malformed or outside the file; several ranges get the whole file, which
RFC 9110 allows) and an explicit Content-Type: Chromium compiles wasm while it streams only when it
is `application/wasm`, and module workers need a JavaScript type.

Paths never leave their root: `..`, absolute paths, backslashes and symlinks that point outside
all answer 404. The ASGI server hands us the percent-decoded path, so `%2e%2e` is caught the same.
Refusals are JSON in the API's error shape (errors.py).
`app.create_app(static=StaticSettings(...))` serves these routes (`realm serve` adds the API).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realm_wasm.gguf import SPLIT_NAME, model_files, model_name
from realm_wasm.model_files import BUNDLED, CHAT_MODEL, cache_dir

from .doors import bearer, error_response
from .errors import ApiError
from .tenants import Tenants

ROOT = Path(__file__).resolve().parent.parent
READ_CHUNK = 1 << 20
BUNDLE_URL = "/dist/realm_wasm.zip"
# scripts/vendor_pyodide.py lists the wheels it vendored besides numpy (jinja2, markupsafe) here
PYTHON_PACKAGES_FILE = "realm-python-packages.json"
# a full Pyodide distribution (a CDN) has its own jinja2 build, and markupsafe as its dependency
CDN_PYTHON_PACKAGES = ["jinja2"]

# Explicit rather than `mimetypes`, whose answers depend on the host's /etc/mime.types.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".zip": "application/zip",
    ".whl": "application/zip",
    ".py": "text/x-python; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_BYTE_RANGE = re.compile(r"(\d*)-(\d*)", re.ASCII)

log = logging.getLogger("realm.server")


@dataclass(frozen=True)
class RequestRecord:
    """One finished HTTP request, as the request-log hook sees it."""

    method: str
    path: str
    status: int
    body_bytes: int  # body bytes actually sent: fewer than planned when the client went away
    range: str | None  # the Range header the client sent


def log_request(record: RequestRecord) -> None:
    asked = f" range={record.range}" if record.range else ""
    log.info("%s %s %d %d bytes%s", record.method, record.path, record.status, record.body_bytes, asked)


@dataclass(frozen=True)
class StaticSettings:
    web_dir: Path = ROOT / "web"
    pyodide_dir: Path = ROOT / "web" / "vendor" / "pyodide"
    dist_dir: Path = ROOT / "web" / "dist"
    model_dirs: tuple[Path, ...] = field(default_factory=lambda: (cache_dir(),))
    default_model: str = CHAT_MODEL  # the page's preselected model: the bundled chat model
    pyodide_base_url: str | None = None  # e.g. a CDN; None means the vendored copy at /pyodide/
    on_request: Callable[[RequestRecord], None] = log_request


class RequestLog:
    """ASGI middleware reporting every finished HTTP request (status, body bytes sent) to a hook."""

    def __init__(self, app: ASGIApp, hook: Callable[[RequestRecord], None]) -> None:
        self.app, self.hook = app, hook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, sent = 0, 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status = status or 500
            raise
        finally:
            asked = dict(scope["headers"]).get(b"range")
            self.hook(RequestRecord(scope["method"], scope["path"], status, sent,
                                    asked.decode("latin-1") if asked is not None else None))


def resolve_inside(root: Path, rel: str) -> Path | None:
    """The regular file `rel` names under `root`, or None when it is missing or would leave `root`."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return None
    if ".." in rel.split("/"):
        return None
    try:
        base = root.resolve(strict=True)
        target = (base / rel).resolve(strict=True)  # follows symlinks, so their targets are checked
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


class RangeNotSatisfiable(ValueError):
    """The Range header is malformed or lies outside the file: answer 416."""


def _position(digits: str, size: int) -> int:
    """A Range number, as exact as it matters: one with more digits than any file size is taken as
    just past the end (int() of thousands of digits is slow, and refused past 4300)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(size)) else size + 1


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte span a `Range` header asks for, or None to send the whole file.

    None covers other units and multi-range requests (a server may ignore Range).
    """
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    m = _BYTE_RANGE.fullmatch(spec.strip())
    if m is None or m.group(1) == m.group(2) == "":
        raise RangeNotSatisfiable(header)
    first, last = m.groups()
    if first:
        start = _position(first, size)
        if start >= size or (last and _position(last, size) < start):
            raise RangeNotSatisfiable(header)
        return start, min(_position(last, size), size - 1) if last else size - 1
    suffix = _position(last, size)
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(header)
    return max(0, size - suffix), size - 1


def etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match compares weakly: `W/` prefixes are ignored and `*` matches any file."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _read_span(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while length > 0:
            block = f.read(min(READ_CHUNK, length))
            if not block:  # the file shrank while we served it
                return
            length -= len(block)
            yield block


def file_response(request: Request, path: Path) -> Response:
    """Serve one file with conditional (ETag) and single-range support."""
    st = path.stat()
    size = st.st_size
    etag = f'"{size:x}-{st.st_mtime_ns:x}"'
    last_modified = formatdate(st.st_mtime, usegmt=True)
    # no-cache = revalidate every time: cheap with the ETag, and edits to web/ show up at once
    headers = {"ETag": etag, "Last-Modified": last_modified, "Accept-Ranges": "bytes",
               "Cache-Control": "no-cache"}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)

    start, end, status = 0, size - 1, 200
    asked = request.headers.get("range")
    # If-Range: a resumed download whose file changed meanwhile gets the whole new file
    if asked is not None and request.headers.get("if-range", etag) in (etag, last_modified):
        try:
            span = parse_range(asked, size)
        except RangeNotSatisfiable:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if span is not None:
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1
    headers["Content-Type"] = content_type(path)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read_span(path, start, length), status_code=status, headers=headers)


def list_models(model_dirs: tuple[Path, ...]) -> dict[str, Path]:
    """GGUF files servable at /models/<name> (a split model's every shard); on a name clash the
    earlier directory wins."""
    found: dict[str, Path] = {}
    for d in model_dirs:
        if not d.is_dir():
            continue
        for entry in sorted(d.glob("*.gguf")):
            path = resolve_inside(d, entry.name)
            if path is not None:
                found.setdefault(entry.name, path)
    return found


def is_later_shard(name: str) -> bool:
    """A split model's shard after the first: the page loads the model from its first."""
    m = SPLIT_NAME.match(name)
    return m is not None and int(m["no"]) != 1


def python_packages(pyodide_dir: Path, pyodide_base_url: str | None) -> list[str]:
    """What the worker loads besides numpy: the vendored wheels' file names, or a CDN's package names."""
    if pyodide_base_url is not None:
        return list(CDN_PYTHON_PACKAGES)
    try:
        return json.loads((pyodide_dir / PYTHON_PACKAGES_FILE).read_text())
    except (OSError, ValueError):
        return list(CDN_PYTHON_PACKAGES)  # not vendored yet: the worker's boot error will say what is missing


def page_config(pyodide_base_url: str, python_packages: list[str], bundle_url: str, models: dict[str, Path],
                models_url: str, default_model: str) -> dict:
    """What the page reads from config.json (the server's route and `realm build-site` write the same)."""

    def entry(name: str, path: Path) -> dict:
        files = [f for f in model_files(path) if f.is_file()]  # a split model's shards
        listed = {"name": name, "url": f"{models_url}{quote(name)}", "size": sum(f.stat().st_size for f in files)}
        if len(files) > 1:
            listed["files"] = len(files)
        bundled = BUNDLED.get(name.removesuffix(".gguf"))
        if bundled is not None:  # the page shows what kind of model it is before loading it
            listed.update(label=bundled.label, chat=bundled.chat)
        return listed

    return {
        "pyodideBaseUrl": pyodide_base_url,
        "pythonPackages": python_packages,
        "bundleUrl": bundle_url,
        "defaultModel": f"{models_url}{quote(default_model)}" if default_model in models else None,
        "models": [entry(name, path) for name, path in models.items() if not is_later_shard(name)],
    }


def not_found(message: str) -> JSONResponse:
    return error_response(ApiError(404, message))


def static_routes(settings: StaticSettings, tenants: Tenants | None = None) -> list[BaseRoute]:
    """Routes for the page, Pyodide, the bundle and models; put API routes before these. With
    `tenants` (not open), model files need a tenant's key and config.json lists none."""
    tenants = tenants or Tenants.open_access()

    def serve_from(root: Path) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            rel = request.path_params["path"]
            if rel == "" or rel.endswith("/"):
                rel += "index.html"
            path = resolve_inside(root, rel)
            return file_response(request, path) if path else not_found(f"no file {request.url.path}")

        return endpoint

    def model(request: Request) -> Response:
        name = request.path_params["name"]
        tenant = tenants.authenticate(bearer(request))
        if tenant is None:
            return error_response(ApiError(401, "model files need an API key (Authorization: Bearer KEY)",
                                           headers={"WWW-Authenticate": "Bearer"}))
        path = list_models(settings.model_dirs).get(name)  # only the .gguf files config.json lists
        if path is None:
            return not_found(f"no model named {name!r}")
        if not tenant.may_use_model(model_name(Path(name))):
            return error_response(ApiError(403, f"tenant {tenant.id!r} may not use model {name!r}"))
        return file_response(request, path)

    def config(request: Request) -> Response:
        models = list_models(settings.model_dirs) if tenants.open else {}
        return JSONResponse(
            page_config(pyodide_base_url=settings.pyodide_base_url or "/pyodide/",
                        python_packages=python_packages(settings.pyodide_dir, settings.pyodide_base_url),
                        bundle_url=BUNDLE_URL, models=models, models_url="/models/",
                        default_model=settings.default_model),
            headers={"Cache-Control": "no-cache"},
        )

    return [
        Route("/config.json", config),
        Route("/pyodide/{path:path}", serve_from(settings.pyodide_dir)),
        Route("/dist/{path:path}", serve_from(settings.dist_dir)),
        Route("/models/{name}", model),
        Route("/{path:path}", serve_from(settings.web_dir)),
    ]
