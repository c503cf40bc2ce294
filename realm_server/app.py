"""The Starlette app: the inference API (http.py, ws.py over one Service), the static site
(static.py), or both, as `realm serve` runs them.

    app = create_app([load_model(path, n_slots=8, n_ctx=2048)], load_tenants(cfg), static=StaticSettings())

API routes come first: the static routes end in a catch-all. With `static`, every finished HTTP
request is reported to its `on_request` hook (the request log). Every request passes the doors
(doors.py: Host, Origin and CORS, security headers, JSON errors); `allowed_hosts` and `cors_origins`
are `realm serve --allowed-host` and `--cors-origin`. The app's lifespan runs each model's stepping
thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from .doors import DoorPolicy, Doors, http_exception_as_json
from .http import http_routes
from .service import ApiSettings, ServedModel, Service
from .static import RequestLog, StaticSettings, static_routes
from .tenants import Tenants
from .ws import websocket_route


def create_app(models: Sequence[ServedModel] = (), tenants: Tenants | None = None,
               settings: ApiSettings | None = None, static: StaticSettings | None = None,
               allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = ()) -> Starlette:
    """The API for `models` (none: no API) and, with `static`, the page, Pyodide and model files.
    Without tenants the API is open to loopback clients only (`tenants.check_bind_host`), and answers
    loopback Host names and `allowed_hosts` only; cross-origin requests need their origin in `cors_origins`."""
    if not models and static is None:
        raise ValueError("nothing to serve: give models for the API, static settings for the page, or both")
    tenants = tenants or Tenants.open_access()
    routes, lifespan, middleware = [], None, []
    if models:
        service = Service(models, tenants, settings or ApiSettings())
        routes += [*http_routes(service), websocket_route(service)]

        def lifespan(app: Starlette) -> AbstractAsyncContextManager[None]:
            return service.serving()

    if static is not None:
        routes += static_routes(static, tenants)
        middleware.append(Middleware(RequestLog, hook=static.on_request))  # outermost: it logs refusals too
    middleware.append(Middleware(Doors, policy=DoorPolicy.build(tenants.open, allowed_hosts, cors_origins)))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                     exception_handlers={HTTPException: http_exception_as_json})
