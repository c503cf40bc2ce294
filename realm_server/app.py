"""The Starlette app: the inference API (http.py, ws.py over one Service), the static site
(static.py), or both, as `realm serve` runs them.

    app = create_app([load_model(path, n_slots=8, n_ctx=2048)], load_tenants(cfg), static=StaticSettings())

API routes come first: the static routes end in a catch-all. With `static`, every finished HTTP
request is reported to its `on_request` hook (the request log). The app's lifespan runs each
model's stepping thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from .http import http_routes
from .service import ApiSettings, ServedModel, Service
from .static import RequestLog, StaticSettings, static_routes
from .tenants import Tenants
from .ws import websocket_route


def create_app(models: Sequence[ServedModel] = (), tenants: Tenants | None = None,
               settings: ApiSettings | None = None, static: StaticSettings | None = None) -> Starlette:
    """The API for `models` (none: no API) and, with `static`, the page, Pyodide and model files.
    Without tenants the API is open to loopback clients only (`tenants.check_bind_host`)."""
    if not models and static is None:
        raise ValueError("nothing to serve: give models for the API, static settings for the page, or both")
    routes, lifespan, middleware = [], None, []
    if models:
        service = Service(models, tenants, settings or ApiSettings())
        routes += [*http_routes(service), websocket_route(service)]

        def lifespan(app: Starlette) -> AbstractAsyncContextManager[None]:
            return service.serving()

    if static is not None:
        routes += static_routes(static)
        middleware.append(Middleware(RequestLog, hook=static.on_request))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
