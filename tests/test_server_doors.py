"""Every door of the server under hostile input: malformed HTTP, bad Unicode, huge sizes, slow bodies,
foreign Host and Origin headers, the model route's limits, and the WebSocket's bad frames.

One open-mode uvicorn server (127.0.0.1, the default model on numpy) with a 1 s body timeout, a
default max_tokens of 3, an extra allowed Host and one CORS origin; raw sockets where a request must
be malformed. Each refusal is checked for its status, OpenAI's error shape and that it came in time.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_server_api import LiveServer
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from realm_server.app import create_app
from realm_server.cli import build_parser
from realm_server.doors import DoorPolicy, Doors
from realm_server.errors import ConfigError
from realm_server.schema import MAX_MESSAGES, MAX_PROMPT_TOKENS, MAX_STOP_CHARS
from realm_server.service import ApiSettings, load_model
from realm_server.static import StaticSettings
from realm_server.tenants import hash_key, load_tenants
from realm_wasm.model_files import default_model_path

MODEL = "gemma-3-270m-q4_k_m"
N_CTX = 256
DEFAULT_MAX_TOKENS = 3
BODY_TIMEOUT_S = 1.0
ALLOWED_HOST = "realm.test"
CORS_ORIGIN = "http://app.example:3000"
FOREIGN_ORIGIN = "http://evil.example"
GGUF = b"GGUF" + bytes(range(256)) * 8  # the model file the static routes serve (its bytes only matter)
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                    "cross-origin-opener-policy": "same-origin", "cross-origin-resource-policy": "same-origin"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("site")
    dirs = {name: root / name for name in ("web", "pyodide", "dist", "models")}
    for d in dirs.values():
        d.mkdir()
    (dirs["web"] / "index.html").write_text("<!doctype html><title>realm</title>")
    (dirs["models"] / "tiny.gguf").write_bytes(GGUF)
    (dirs["models"] / "notes.txt").write_text("beside the model, not a model")
    return dirs


def static_settings(site: dict[str, Path]) -> StaticSettings:
    return StaticSettings(web_dir=site["web"], pyodide_dir=site["pyodide"], dist_dir=site["dist"],
                          model_dirs=(site["models"],), default_model="tiny.gguf", on_request=lambda record: None)


@pytest.fixture(scope="module")
def live(site):
    served = load_model(default_model_path(), backend="numpy", n_ctx=N_CTX, n_slots=2)
    settings = ApiSettings(default_max_tokens=DEFAULT_MAX_TOKENS, body_timeout_s=BODY_TIMEOUT_S)
    app = create_app([served], settings=settings, static=static_settings(site), allowed_hosts=[ALLOWED_HOST],
                     cors_origins=[CORS_ORIGIN])
    with LiveServer(app) as server:
        server.port = int(server.url.rsplit(":", 1)[1])
        server.served = served
        yield server


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is a JSON error in OpenAI's shape with this status (and param); its error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


def raw_exchange(live, pieces: list[bytes], pause_s: float = 0.0, timeout_s: float = 15.0) -> tuple[int, bytes, float]:
    """Send `pieces` on one connection (`pause_s` apart, stopping once the server answers) and read
    until it closes: the status, the body and the seconds the answer took."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", live.port), timeout=timeout_s) as s:
        for piece in pieces:
            if select.select([s], [], [], 0)[0]:
                break  # answered already
            try:
                s.sendall(piece)
            except OSError:  # it closed on us mid-body: read what it said
                break
            time.sleep(pause_s)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body, time.monotonic() - t0


def request_bytes(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def tokens_generated(http: httpx.Client) -> int:
    return http.get("/health").json()["models"][MODEL]["tokens_generated"]


def wait_idle(http: httpx.Client, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = http.get("/health").json()["models"][MODEL]
        if stats["running"] == stats["queued"] == 0:
            return stats["tokens_generated"]
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.05)


# --- bodies: encoding, Unicode, sizes, pace ---------------------------------------------------------

def test_a_body_that_is_not_utf8_is_a_400_at_once(http):
    t0 = time.monotonic()
    r = http.post("/v1/completions", content=b'{"model": "%s", "prompt": "caf\xe9 \xff"}' % MODEL.encode(),
                  headers={"Content-Type": "application/json"})
    assert "not UTF-8" in assert_error(r, 400)["message"]
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "\\ud800"}}', "prompt"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok \\udfff"]}}', "prompt[0]"),
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi \\ud83d"}}]}}',
     "messages[0].content"),
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": '
     f'[{{"type": "text", "text": "\\udc00 x"}}]}}]}}', "messages[0].content[0].text"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "x", "user": "\\ud800"}}', "user"),
])
def test_an_unpaired_surrogate_is_a_400_naming_the_field(http, path, body, param):
    r = http.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert "surrogate" in assert_error(r, 400, param)["message"]


def test_a_surrogate_pair_is_text_like_any_other(http):
    r = http.post("/v1/completions", content=f'{{"model": "{MODEL}", "prompt": "I \\ud83d\\ude00 it", '
                  '"max_tokens": 1, "temperature": 0}'.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("declared", [str(2**64), str((1 << 20) + 1)])
def test_a_content_length_over_the_limit_is_a_413_before_any_body(live, declared):
    status, body, took = raw_exchange(live, [request_bytes("POST", "/v1/completions", content_length=declared,
                                                           content_type="application/json")])
    assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"
    assert took < 5


@pytest.mark.parametrize("declared", ["-1", "9" * 5000, str(10**30), "0x10"])
def test_a_content_length_that_is_no_number_is_refused_below_the_app(live, declared):
    # uvicorn's HTTP parser answers these (plain text, documented in doors.py): in time, and not a 500
    status, _, took = raw_exchange(live, [request_bytes("POST", "/v1/completions", content_length=declared)])
    assert status == 400 and took < 5


def test_a_body_trickled_slower_than_the_deadline_gets_408(live, http):
    body = f'{{"model": "{MODEL}", "prompt": "Once upon a time", "max_tokens": 1}}'.encode()
    head = request_bytes("POST", "/v1/completions", content_length=str(len(body)), content_type="application/json")
    status, answer, took = raw_exchange(live, [head, *(bytes([b]) for b in body)], pause_s=0.1)
    assert status == 408 and json.loads(answer)["error"]["type"] == "timeout_error"
    # the deadline is body_timeout_s + 1 s per MiB declared: the trickle (6 s in all) is cut at ~1 s
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 3
    assert http.get("/health").status_code == 200


def test_a_client_that_leaves_mid_body_leaves_no_traceback(live, http, server_log):
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(request_bytes("POST", "/v1/completions", content_length="1000") + b'{"model"')
        time.sleep(0.3)
    time.sleep(0.3)
    assert http.get("/health").status_code == 200
    assert server_log() == []


@pytest.mark.parametrize("field, value, param", [
    ("prompt", [1] * (MAX_PROMPT_TOKENS + 1), "prompt"),
    ("stop", "x" * (MAX_STOP_CHARS + 1), "stop"),
    ("stop", ["ok", "x" * (MAX_STOP_CHARS + 1)], "stop[1]"),
])
def test_untrusted_counts_have_bounds(http, field, value, param):
    body = {"model": MODEL, "prompt": "x", field: value}
    assert_error(http.post("/v1/completions", json=body), 400, param)


def test_a_conversation_has_a_bounded_number_of_turns(http):
    turns = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": turns}), 400, "messages")


# --- methods, ranges, errors below the routes -------------------------------------------------------

@pytest.mark.parametrize("method, path", [("GET", "/v1/completions"), ("OPTIONS", "/v1/completions"),
                                          ("DELETE", "/health"), ("BREW", "/v1/chat/completions"),
                                          ("POST", "/index.html"), ("PUT", "/models/tiny.gguf")])
def test_a_method_a_route_does_not_take_is_a_json_405(http, method, path):
    r = http.request(method, path)
    error = assert_error(r, 405)
    assert method in error["message"] and r.headers["allow"]


@pytest.mark.parametrize("path", ["/models/tiny.gguf", "/index.html"])
@pytest.mark.parametrize("header, status, span", [
    ("bytes=" + "9" * 5000 + "-", 416, None),  # starts past any file
    ("bytes=0-" + "9" * 5000, 206, (0, None)),  # ends past the file: all of it
    ("bytes=-" + "9" * 5000, 206, (0, None)),  # a suffix longer than the file: all of it
    ("bytes=" + "0" * 5000 + "1-2", 206, (1, 2)),  # leading zeros are still the number 1
])
def test_a_range_of_thousands_of_digits_is_answered_exactly(http, site, path, header, status, span):
    whole = (site["models"] / "tiny.gguf" if path.startswith("/models") else site["web"] / "index.html").read_bytes()
    r = http.get(path, headers={"Range": header})
    assert r.status_code == status
    if span is not None:
        assert r.content == whole[span[0]:None if span[1] is None else span[1] + 1]


# --- generation bounds and disconnects --------------------------------------------------------------

@pytest.mark.parametrize("bound", [{}, {"max_tokens": None}, {"max_completion_tokens": None}])
def test_without_max_tokens_the_server_default_bounds_the_generation(http, bound):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0,
            **bound}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= DEFAULT_MAX_TOKENS


def test_the_default_bound_is_cut_to_the_context_left_and_documented(live, http):
    ids = live.served.engine.tokenizer.encode("Once upon a time, " * 60, True)[:N_CTX - 2]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": None, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": N_CTX - 2, "completion_tokens": 2, "total_tokens": N_CTX,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
    doc = http.get("/openapi.json").json()
    schema = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert f"null: {DEFAULT_MAX_TOKENS} (the server's default_max_tokens)" in schema["properties"]["max_tokens"][
        "description"]


@pytest.fixture
def server_log():
    """The server's warnings, errors and tracebacks (uvicorn's, Starlette's, Realm's) while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING or record.exc_info:
                records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "realm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield lambda: [f"{r.name}: {r.getMessage()}" for r in records]
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_a_client_that_leaves_a_whole_completion_frees_its_slot_within_a_step(live, http, server_log):
    wait_idle(http)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(request_bytes("POST", "/v1/completions", body, content_type="application/json",
                                content_length=str(len(body))))
        before = tokens_generated(http)
        deadline = time.monotonic() + 60
        while tokens_generated(http) < before + 3:  # it runs
            assert time.monotonic() < deadline
            time.sleep(0.02)
        at_close = tokens_generated(http)
    after = wait_idle(http)
    # one step is one token for this one sequence; a few more for the reads around the close
    assert after - at_close <= 4, (at_close, after)
    time.sleep(0.2)  # the request's own end (its 499) is logged after the slot frees
    assert server_log() == []


# --- Host, Origin, CORS, security headers -----------------------------------------------------------

@pytest.mark.parametrize("host, status", [("127.0.0.1", 200), ("localhost:8000", 200), ("[::1]:1", 200),
                                          ("127.0.0.2:8000", 200), ("[0:0:0:0:0:0:0:1]", 200), ("10.0.0.1", 403),
                                          (ALLOWED_HOST, 200), ("REALM.test:99", 200),
                                          ("evil.example", 403), ("127.0.0.1.evil.example", 403),
                                          ("localhost.evil.example:80", 403)])
def test_open_mode_answers_loopback_and_allowed_host_names_only(http, host, status):
    for path in ("/health", "/v1/models", "/", "/config.json"):
        r = http.get(path, headers={"Host": host})
        assert r.status_code == status, (path, r.text)
        if status == 403:
            assert assert_error(r, 403)["code"] == "host_not_allowed"


def test_a_cross_origin_text_plain_post_is_refused_before_it_runs(live, http):
    before = wait_idle(http)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2})
    r = http.post("/v1/completions", content=body, headers={"Origin": FOREIGN_ORIGIN, "Content-Type": "text/plain"})
    assert assert_error(r, 403)["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    assert wait_idle(http) == before  # nothing was generated
    own = http.post("/v1/completions", content=body, headers={"Origin": live.url, "Content-Type": "text/plain"})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers  # same origin: no CORS


def test_a_listed_origin_gets_cors_headers_and_its_preflight_answered(http):
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"].split(", ")
    allowed_headers = preflight.headers["access-control-allow-headers"].lower().split(", ")
    assert {"authorization", "content-type"} <= set(allowed_headers)
    r = http.post("/v1/completions", headers={"Origin": CORS_ORIGIN},
                  json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    refused = http.options("/v1/completions",
                           headers={"Origin": FOREIGN_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert assert_error(refused, 403)["code"] == "origin_not_allowed"


def test_a_cross_origin_websocket_is_refused_at_the_handshake(live):
    with pytest.raises(InvalidStatus) as refused:
        connect(live.ws_url, origin=FOREIGN_ORIGIN, open_timeout=30)
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "origin_not_allowed"
    with connect(live.ws_url, origin=CORS_ORIGIN, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"


@pytest.mark.parametrize("method, path, headers", [
    ("GET", "/", {}), ("GET", "/config.json", {}), ("GET", "/models/tiny.gguf", {}), ("GET", "/nope", {}),
    ("GET", "/health", {}), ("GET", "/v1/models", {}), ("GET", "/v1/nope", {}), ("PATCH", "/health", {}),
    ("GET", "/health", {"Host": "evil.example"}), ("GET", "/models/tiny.gguf", {"Range": "bytes=99999-"}),
])
def test_every_answer_carries_the_security_headers(http, method, path, headers):
    r = http.request(method, path, headers=headers)
    assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, (r.status_code, dict(r.headers))


def test_a_failure_no_route_caught_is_still_a_json_500_with_the_headers():
    async def broken(scope, receive, send):
        raise RuntimeError("a bug below the doors")

    client = TestClient(Doors(broken, DoorPolicy.build(True)), base_url="http://127.0.0.1",
                        raise_server_exceptions=False)  # no `with`: no lifespan for this bare app
    r = client.get("/anything")
    assert assert_error(r, 500)["type"] == "server_error"
    assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS


def test_door_policy_refuses_what_is_not_a_host_or_an_origin():
    for bad in ("http://realm.test", "realm.test:80", "a/b", "[::1", "[foo]"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            DoorPolicy.build(True, allowed_hosts=[bad])
    for bad in ("app.example", "http://app.example/path", "ftp://app.example", "null"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            DoorPolicy.build(True, cors_origins=[bad])
    with pytest.raises(ConfigError, match="needs a tenants file"):
        DoorPolicy.build(True, cors_origins=["*"])
    assert DoorPolicy.build(False, cors_origins=["*"]).allows("https://anything.example")
    assert DoorPolicy.build(True, allowed_hosts=["::1", "fe80::1"]).hosts >= {"[::1]", "[fe80::1]"}
    assert DoorPolicy.build(False).hosts is None  # with tenants, any Host unless --allowed-host names some
    args = build_parser().parse_args(["serve", "--allowed-host", "a.test", "--allowed-host", "b.test",
                                      "--cors-origin", "https://app.example"])
    assert (args.allowed_host, args.cors_origin) == (["a.test", "b.test"], ["https://app.example"])


# --- the model route --------------------------------------------------------------------------------

def test_the_model_route_serves_only_listed_gguf_models(http):
    assert http.get("/models/tiny.gguf").content == GGUF
    assert "notes.txt" not in str(http.get("/config.json").json()["models"])
    assert_error(http.get("/models/notes.txt"), 404)  # in the model folder, but not a model
    assert_error(http.get("/no-such-page.html"), 404)


def test_with_tenants_model_files_need_a_key_of_a_tenant_that_may_use_them(site, tmp_path):
    keys = {"may": "key-of-may", "mayNot": "key-of-may-not"}
    (tmp_path / "tenants.toml").write_text(
        f'[[tenant]]\nid = "may"\nkey_sha256 = "{hash_key(keys["may"])}"\nmodels = ["tiny"]\n'
        f'[[tenant]]\nid = "mayNot"\nkey_sha256 = "{hash_key(keys["mayNot"])}"\nmodels = ["other"]\n')
    app = create_app(static=static_settings(site), tenants=load_tenants(tmp_path / "tenants.toml"))
    with TestClient(app) as client:
        assert_error(client.get("/models/tiny.gguf"), 401)
        assert_error(client.get("/models/tiny.gguf", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(client.get("/models/tiny.gguf", headers={"Authorization": f"Bearer {keys['mayNot']}"}), 403)
        assert_error(client.get("/models/notes.txt", headers={"Authorization": f"Bearer {keys['may']}"}), 404)
        r = client.get("/models/tiny.gguf", headers={"Authorization": f"Bearer {keys['may']}", "Range": "bytes=0-3"})
        assert (r.status_code, r.content) == (206, b"GGUF")
        # the page sends no key: config.json lists no server models (it loads models from a URL)
        config = client.get("/config.json").json()
        assert (config["models"], config["defaultModel"]) == ([], None)
        assert client.get("/", headers={"Host": "any.example"}).status_code == 200  # no Host check with tenants


# --- the WebSocket ----------------------------------------------------------------------------------

@pytest.mark.parametrize("frame, cid, param", [
    (json.dumps({"type": "generate", "id": "a", "model": MODEL, "prompt": "\ud800"}), "a", "prompt"),  # an escape
    ('{"type": "generate", "id": "\\ud800", "model": "MODEL", "prompt": "hi"}', None, "id"),
    ('{"type": "generate", "id": "b", "model": "MODEL", "prompt": "\\udc00"}', "b", "prompt"),
    ("{not json", None, None),
    (b'{"type": "generate"}', None, None),  # a binary frame
])
def test_a_bad_websocket_message_gets_an_error_and_the_connection_stays(live, frame, cid, param):
    with connect(live.ws_url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(frame.replace('"MODEL"', f'"{MODEL}"') if isinstance(frame, str) else frame)
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["status"], error["id"], error["error"]["param"]) == ("error", 400, cid, param)
        ws.send(json.dumps({"type": "generate", "id": "ok", "model": MODEL, "prompt": "hi", "max_tokens": 1}))
        while (message := json.loads(ws.recv(timeout=60)))["type"] == "token":
            pass
        assert (message["type"], message["id"]) == ("done", "ok")


def test_websocket_messages_over_the_limit_are_a_413_then_past_the_frame_limit_a_close(live):
    """Over max_body_bytes: a 413 error and the connection stays; a frame past ws_max_bytes (what
    such a message can take in UTF-8) is closed by uvicorn (1009), not buffered up to its 16 MiB."""
    limits = ApiSettings()
    with connect(live.ws_url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(json.dumps({"type": "cancel", "id": "x" * limits.max_body_bytes}))
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["status"]) == ("error", 413)
        ws.send("x" * (limits.ws_max_bytes + 1))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1009


def test_a_text_frame_that_is_not_utf8_ends_with_a_close_frame(live):
    with connect(live.ws_url, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(b'{"type": "cancel", "id": "\xff"}', text=True)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1007  # a close frame with its code: not a silent drop


def test_a_failed_websocket_auth_closes_with_a_code_and_a_reason(live, site, tmp_path):
    (tmp_path / "tenants.toml").write_text(f'[[tenant]]\nid = "t"\nkey_sha256 = "{hash_key("k")}"\n')
    with TestClient(create_app([live.served], load_tenants(tmp_path / "tenants.toml"))) as client:
        with client.websocket_connect("/ws") as ws:
            ws.send_text(json.dumps({"type": "auth", "api_key": "wrong"}))
            assert ws.receive_json()["status"] == 401
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
    assert closed.value.code == 1008 and "invalid API key" in closed.value.reason
