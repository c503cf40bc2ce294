"""The inference API on a real uvicorn server (127.0.0.1, started here) with the default model.

Expected texts come from `Engine.generate` running each prompt alone (greedy) before the server
starts, so every endpoint, stream and concurrent load is checked against an independent run.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from realm_server import http as api_http
from realm_server.app import create_app
from realm_server.errors import STATUS_BY_CODE, api_error
from realm_server.service import ApiSettings, ServedModel, Service, load_model
from realm_server.tenants import Limiter, Tenant, Tenants, TenantsConfigError, check_bind_host, hash_key, load_tenants
from realm_wasm.chat_template import PLAIN_STOP, ChatTemplate, ChatTemplateError
from realm_wasm.errors import ContextOverflow, RealmError
from realm_wasm.gpu.device import DeviceLost
from realm_wasm.model_files import default_model_path

MODEL = "gemma-3-270m-q4_k_m"
N_CTX = 512
MAX_TOKENS = 6
PROMPTS = ["Question: What is the capital of France?\nAnswer:", "Once upon a time", "The three primary colors are",
           "def fibonacci(n):", "The largest planet in the solar system is", "Water boils at"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
KEYS = {tenant: f"{tenant}-secret-key" for tenant in
        ("alpha", "beta", "delta", "epsilon", "gamma", "solo", "tiny")}
TENANTS_TOML = f"""
[[tenant]]
id = "alpha"
key_sha256 = "{hash_key(KEYS['alpha'])}"
share = 2

[[tenant]]
id = "beta"
key_sha256 = ["{hash_key(KEYS['beta'])}"]
models = ["{MODEL}"]

[[tenant]]
id = "delta"
key_sha256 = "{hash_key(KEYS['delta'])}"
max_concurrent = 16

[[tenant]]
id = "epsilon"
key_sha256 = "{hash_key(KEYS['epsilon'])}"

[[tenant]]
id = "gamma"
key_sha256 = "{hash_key(KEYS['gamma'])}"
models = ["some-other-model"]

[[tenant]]
id = "solo"
key_sha256 = "{hash_key(KEYS['solo'])}"
max_concurrent = 1

[[tenant]]
id = "tiny"
key_sha256 = "{hash_key(KEYS['tiny'])}"
tokens_per_minute = 40
"""


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 at a free port, on a thread (a context manager)."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5,
                                ws_max_size=ApiSettings().ws_max_bytes)  # as `realm serve` runs it
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(default_model_path(), backend="numpy", n_ctx=N_CTX, n_slots=8)


@pytest.fixture(scope="module")
def expected(served) -> dict[str, str]:
    """Greedy text of each prompt run alone (MAX_TOKENS tokens), and of the chat prompt."""
    engine = served.engine
    texts = {p: "".join(e.text for e in engine.generate(p, MAX_TOKENS)) for p in PROMPTS}
    rendered = "User: What is the capital of France?\nAssistant:"  # the documented plain template
    chat = "".join(e.text for e in engine.generate(rendered, MAX_TOKENS))
    texts["chat"] = chat.split(PLAIN_STOP[0])[0].lstrip()
    return texts


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tenants.toml"
    path.write_text(TENANTS_TOML)
    return path


@pytest.fixture(scope="module")
def live(served, expected, tenants_file):
    with LiveServer(create_app([served], load_tenants(tenants_file))) as server:
        yield server


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


def sse_events(response: httpx.Response) -> list:
    """The data of every server-sent event ("[DONE]" stays a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_idle(http: httpx.Client, timeout: float = 60) -> dict:
    """/health once nothing runs or waits any more."""
    deadline = time.monotonic() + timeout
    while True:
        stats = http.get("/health").json()["models"][MODEL]
        if stats["running"] == 0 and stats["queued"] == 0:
            return stats
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.1)


# --- endpoints -------------------------------------------------------------------------------------

def test_health_needs_no_key(http):
    body = http.get("/health").json()
    assert body["status"] == "ok"
    assert body["models"][MODEL]["slots"] == 8


def test_models_lists_what_the_tenant_may_use(http):
    models = http.get("/v1/models", headers=auth("beta")).json()["data"]
    assert [(m["id"], m["context_length"], m["chat_template"]) for m in models] == [(MODEL, N_CTX, "plain")]
    assert http.get("/v1/models", headers=auth("gamma")).json()["data"] == []
    assert http.get(f"/v1/models/{MODEL}", headers=auth("alpha")).json()["id"] == MODEL
    assert http.get(f"/v1/models/{MODEL}", headers=auth("gamma")).status_code == 403
    assert http.get("/v1/models/nope", headers=auth("alpha")).status_code == 404


def test_openapi_describes_the_api(http):
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    schema = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "speculation"}
    assert fields <= set(schema["properties"])
    assert schema["properties"]["speculation"]["properties"]["method"]["enum"] == ["lookup", "draft"]
    answer = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["application/json"]
    assert {"drafted_tokens", "accepted_tokens"} <= set(answer["schema"]["properties"]["usage"]["properties"])
    assert "429" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_completion_matches_the_engine_alone(http, expected):
    prompt = PROMPTS[0]
    r = http.post("/v1/completions", headers=auth("alpha"),
                  json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == expected[prompt]
    assert body["choices"][0]["finish_reason"] == "length"
    used = dict(body["usage"])
    cached = used.pop("prompt_tokens_details")["cached_tokens"]  # an earlier test may have left it in a slot
    assert used == {"prompt_tokens": 13, "completion_tokens": MAX_TOKENS, "total_tokens": 13 + MAX_TOKENS}
    assert cached in (0, 12)


def test_streamed_completion_matches_the_engine_alone(http, expected):
    prompt = PROMPTS[1]
    with http.stream("POST", "/v1/completions", headers=auth("beta"),
                     json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected[prompt]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == MAX_TOKENS


def test_chat_uses_the_plain_template(http, expected):
    r = http.post("/v1/chat/completions", headers=auth("alpha"),
                  json={"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": expected["chat"]}
    with http.stream("POST", "/v1/chat/completions", headers=auth("alpha"),
                     json={"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "stream": True}) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected["chat"]
    assert events[-1] == "[DONE]"


def test_stop_sequence_ends_the_text_before_it(http, expected):
    prompt = PROMPTS[0]  # " Paris\nQuestion: ..."
    r = http.post("/v1/completions", headers=auth("alpha"),
                  json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "stop": ["\n", "never"]})
    body = r.json()
    assert body["choices"][0] == {"index": 0, "text": expected[prompt].split("\n")[0], "logprobs": None,
                                  "finish_reason": "stop"}


def test_same_seed_same_sample(http):
    request = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 1.0, "top_k": 40, "seed": 7}
    first = http.post("/v1/completions", headers=auth("alpha"), json=request).json()["choices"][0]["text"]
    again = http.post("/v1/completions", headers=auth("beta"), json=request).json()["choices"][0]["text"]
    assert first == again


# --- speculative decoding ------------------------------------------------------------------------

COPY = "Copy this list exactly: red, green, blue, yellow, orange. Copy this list exactly: red, green, blue,"
LOOKUP = {"method": "lookup", "max_draft": 4}


def test_speculation_gives_the_same_text_and_counts_its_drafts(live, http):
    """Greedy with prompt lookup is plain greedy, over JSON, SSE and the WebSocket; the model copies
    the list, so the drafts from the prompt are tried and some accepted."""
    request = {"model": MODEL, "prompt": COPY, "max_tokens": 8, "temperature": 0}
    plain = http.post("/v1/completions", headers=auth("alpha"), json=request).json()
    assert set(plain["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                   "prompt_tokens_details"}  # no drafts: no counts
    body = http.post("/v1/completions", headers=auth("alpha"), json={**request, "speculation": LOOKUP}).json()
    assert body["choices"] == plain["choices"]
    used = body["usage"]
    assert used["completion_tokens"] == plain["usage"]["completion_tokens"] == 8
    assert used["drafted_tokens"] >= used["accepted_tokens"] > 0
    assert used["completion_tokens_details"] == {
        "accepted_prediction_tokens": used["accepted_tokens"],
        "rejected_prediction_tokens": used["drafted_tokens"] - used["accepted_tokens"]}
    with http.stream("POST", "/v1/completions", headers=auth("alpha"), json={
            **request, "speculation": LOOKUP, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == plain["choices"][0]["text"]
    assert events[-2]["usage"] == used
    with ws_connect(live, "alpha") as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(json.dumps({"type": "generate", "id": "s", **request, "speculation": LOOKUP}))
        messages = ws_read(ws)
    assert "".join(m["text"] for m in messages if m["type"] == "token") == plain["choices"][0]["text"]
    assert messages[-1]["usage"] == used


def test_a_stream_whose_writes_lag_sends_every_token_once_in_order(tmp_path):
    """While a write to the client is slow, the tokens made meanwhile go out together in the next
    one, still one event each: every token's text exactly once, in the engine's order."""
    from test_scheduler import N_CTX as TINY_CTX
    from test_scheduler import write_tiny_model

    from realm_wasm.engine import Engine

    path = tmp_path / "tiny.gguf"
    write_tiny_model(path)
    want = [e.text for e in Engine.load(path, backend="numpy", n_ctx=TINY_CTX).generate("Hello, world", 24) if e.text]
    service = Service([load_model(path, backend="numpy", n_ctx=TINY_CTX, n_slots=1)])
    writes = []

    async def slow_send(message: dict) -> None:
        if message["type"] == "http.response.body":
            writes.append(message["body"])
            await asyncio.sleep(0.02)

    async def stream() -> None:
        async with service.serving():
            tenant = service.authenticate("127.0.0.1", None)
            body = {"model": "tiny", "prompt": "Hello, world", "max_tokens": 24, "temperature": 0, "stream": True}
            generation = service.start(await service.prepare(tenant, body, "completion"), tenant)
            never_disconnects = asyncio.Event().wait
            response = api_http.EventStream(api_http.sse_events(generation), generation.cancel, generation.ready)
            await response({}, never_disconnects, slow_send)

    asyncio.run(stream())
    events = [e[6:] for e in b"".join(writes).decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [c["text"] for c in chunks[:-1]] == want and chunks[-1]["finish_reason"] in ("stop", "length")
    assert max(w.count(b"data: ") for w in writes) > 1  # some writes did carry several events


def test_a_server_draft_model_drafts_for_requests_that_ask(tmp_path, tenants_file):
    """The tiny model as its own draft model: greedy, every draft is accepted, and the text is the
    engine's alone without speculation."""
    from test_scheduler import N_CTX as TINY_CTX
    from test_scheduler import write_tiny_model

    from realm_wasm.engine import Engine

    path = tmp_path / "tiny.gguf"
    write_tiny_model(path)
    want = "".join(e.text for e in Engine.load(path, backend="numpy", n_ctx=TINY_CTX).generate("Hello, world", 12))
    served = load_model(path, backend="numpy", n_ctx=TINY_CTX, n_slots=2, draft=path)
    with TestClient(create_app([served], load_tenants(tenants_file))) as client:
        r = client.post("/v1/completions", headers=auth("alpha"), json={
            "model": "tiny", "prompt": "Hello, world", "max_tokens": 12, "temperature": 0,
            "speculation": {"method": "draft", "max_draft": 4}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want
    assert body["usage"]["accepted_tokens"] == body["usage"]["drafted_tokens"] > 0


# --- the official openai package -------------------------------------------------------------------

def test_official_openai_client(live, expected):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEYS["alpha"])
    assert [m.id for m in client.models.list()] == [MODEL]
    prompt = PROMPTS[2]
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == expected[prompt]
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected[prompt]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == expected["chat"]
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["chat"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)


# --- tenants: 401, 403, 429 ------------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": KEYS["alpha"]}, 401),
    ({"Authorization": f"Basic {KEYS['alpha']}"}, 401),
])
def test_requests_without_a_valid_key_get_401(http, headers, status):
    r = http.post("/v1/completions", headers=headers, json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == status
    assert r.json()["error"]["type"] == "authentication_error"
    assert http.get("/v1/models", headers=headers).status_code == status


@pytest.mark.parametrize("tenant, extra, status, param", [
    ("gamma", {}, 403, "model"),  # model not in its list
])
def test_models_the_tenant_may_not_use(http, tenant, extra, status, param):
    r = http.post("/v1/completions", headers=auth(tenant), json={"model": MODEL, "prompt": "hi", "max_tokens": 1,
                                                                 **extra})
    assert (r.status_code, r.json()["error"]["param"]) == (status, param)


def test_concurrency_limit_gives_429_with_retry_after(http):
    # the first request runs for the whole context (~30 s on a 2-core CPU) so that it is surely still
    # running when the second arrives
    request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": N_CTX - 8, "temperature": 0,
               "stream": True}
    with http.stream("POST", "/v1/completions", headers=auth("solo"), json=request) as first:
        assert first.status_code == 200, first.read()
        lines = first.iter_lines()
        next(lines)  # running now
        second = http.post("/v1/completions", headers=auth("solo"), json={**request, "stream": False})
        if second.status_code != 429:  # say how the first one ended, to tell a slow admission from an early end
            pytest.fail(f"second got {second.status_code}; the first ended with {list(lines)[-3:]}")
        assert int(second.headers["retry-after"]) >= 1
        assert "max_concurrent" in second.json()["error"]["message"]
        other = http.post("/v1/completions", headers=auth("beta"), json={"model": MODEL, "prompt": "hi",
                                                                          "max_tokens": 1})
        assert other.status_code == 200  # another tenant is unaffected
    wait_idle(http)
    again = http.post("/v1/completions", headers=auth("solo"), json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert again.status_code == 200


def test_token_rate_limit_gives_429_with_retry_after(http):
    ids = [2] + [1000 + i for i in range(29)]  # 30 prompt tokens + 2 = 32 of the 40 per minute
    request = {"model": MODEL, "prompt": ids, "max_tokens": 2, "temperature": 0}
    assert http.post("/v1/completions", headers=auth("tiny"), json=request).status_code == 200
    refused = http.post("/v1/completions", headers=auth("tiny"), json=request)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 36  # (32 - 8 left) tokens at 40 per minute, at most
    too_big = http.post("/v1/completions", headers=auth("tiny"), json={**request, "max_tokens": 20})
    assert (too_big.status_code, too_big.json()["error"]["param"]) == (400, "max_tokens")


# --- bad input: 4xx naming the field, never a 500 --------------------------------------------------

BAD = [
    (b"{", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe\x00", 400, None),
    (b"[" * 100_000, 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "../../etc/passwd", "prompt": "x"}, 404, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [2, 10**7]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [2, -1]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "word " * 2000}, 400, "prompt"),  # more tokens than the context
    ({"model": MODEL, "prompt": "a" * 600_000}, 400, "prompt"),  # refused before tokenizing
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": N_CTX}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": -1}, 400, "top_k"),
    ({"model": MODEL, "prompt": "x", "seed": "abc"}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop[0]"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "n": 17}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "min_p": 0.1}, 400, "min_p"),  # an unknown field is not ignored
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias.a"),
    ({"model": MODEL, "prompt": "x", "logprobs": 1, "speculation": {"method": "lookup"}}, 400, "speculation"),
    ({"model": MODEL, "prompt": "x", "speculation": "lookup"}, 400, "speculation"),
    ({"model": MODEL, "prompt": "x", "speculation": {"max_draft": 4}}, 400, "speculation.method"),
    ({"model": MODEL, "prompt": "x", "speculation": {"method": "medusa"}}, 400, "speculation.method"),
    ({"model": MODEL, "prompt": "x", "speculation": {"method": "draft"}}, 400, "speculation.method"),  # none loaded
    ({"model": MODEL, "prompt": "x", "speculation": {"method": "lookup", "max_draft": 0}}, 400,
     "speculation.max_draft"),
    ({"model": MODEL, "prompt": "x", "speculation": {"method": "lookup", "max_draft": 33}}, 400,
     "speculation.max_draft"),
    ({"model": MODEL, "prompt": "x", "speculation": {"method": "lookup", "ngram": 9}}, 400, "speculation.ngram"),
]
BAD_CHAT = [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type"),
    ({"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),  # gemma's plain template has no tool calling
    ({"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "pattern": "a+"}}}}, 400, "response_format.json_schema.schema"),
    ({"model": MODEL, "messages": CHAT, "grammar": "root ::= (", "max_tokens": 2}, 400, "grammar"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
]


@pytest.mark.parametrize("path, body, status, param", [("/v1/completions", *case) for case in BAD]
                         + [("/v1/chat/completions", *case) for case in BAD_CHAT])
def test_bad_input_is_a_4xx_naming_the_field(http, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, headers={**auth("alpha"), "Content-Type": "application/json"}, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_nan_is_not_a_number(http):
    r = http.post("/v1/completions", headers={**auth("alpha"), "Content-Type": "application/json"},
                  content=b'{"model": "%s", "prompt": "x", "temperature": NaN}' % MODEL.encode())
    assert (r.status_code, r.json()["error"]["param"]) == (400, "temperature")


def test_oversized_bodies_get_413(live, http):
    big = b'{"model": "m", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = http.post("/v1/completions", headers=auth("alpha"), content=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    # the same without Content-Length (chunked): stopped once past the limit
    r = http.post("/v1/completions", headers=auth("alpha"), content=iter([big[i:i + 65536]
                                                                          for i in range(0, len(big), 65536)]))
    assert r.status_code == 413


def test_unknown_routes_are_json_404s(http):
    r = http.post("/v1/audio/speech", headers=auth("alpha"), json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_slow_client_does_not_hold_up_others(live, http, expected):
    """A client that sends half a body and stalls: other requests go on; the server is not stuck."""
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as stalled:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                        b"Content-Type: application/json\r\n\r\n{\"model\"")
        r = http.post("/v1/completions", headers=auth("beta"),
                      json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.json()["choices"][0]["text"] == expected[PROMPTS[0]]


# --- cancellation frees slots ----------------------------------------------------------------------

def test_client_disconnect_mid_stream_frees_its_slot(http):
    before = wait_idle(http)
    with http.stream("POST", "/v1/completions", headers=auth("alpha"),
                     json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                           "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: the request holds a slot; now leave
    after = wait_idle(http)
    assert after["tokens_generated"] - before["tokens_generated"] < 100


def test_client_disconnect_while_waiting_for_a_whole_completion(live, http):
    before = wait_idle(http)
    with httpx.Client(base_url=live.url, timeout=httpx.Timeout(60, read=3)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", headers=auth("alpha"),
                           json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
    left = http.get("/health").json()["models"][MODEL]["tokens_generated"]  # just after the client left
    after = wait_idle(http)
    # how many tokens 3 s hold depends on the machine; that the request stops when its client
    # leaves, far short of its 400, does not
    assert after["tokens_generated"] - left < 20
    assert after["tokens_generated"] - before["tokens_generated"] < 400


# --- WebSocket -------------------------------------------------------------------------------------

def ws_connect(live, tenant: str | None = None):
    return connect(live.ws_url, additional_headers=auth(tenant) if tenant else None, open_timeout=30)


def ws_read(ws, until_type: str = "done", gen_id: str | None = None) -> list[dict]:
    messages = []
    while True:
        message = json.loads(ws.recv(timeout=120))
        messages.append(message)
        if message["type"] in (until_type, "error") and (gen_id is None or message["id"] == gen_id):
            return messages


def test_websocket_streams_tokens(live, expected):
    prompt = PROMPTS[3]
    with ws_connect(live) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": KEYS["beta"]}))  # browsers authenticate with a message
        ready = json.loads(ws.recv(timeout=30))
        assert ready == {"type": "ready", "tenant": "beta", "models": [MODEL]}
        ws.send(json.dumps({"type": "generate", "id": "a", "model": MODEL, "prompt": prompt,
                            "max_tokens": MAX_TOKENS, "temperature": 0}))
        messages = ws_read(ws)
    assert "".join(m["text"] for m in messages if m["type"] == "token") == expected[prompt]
    assert messages[-1] == {"type": "done", "id": "a", "finish_reason": "length",
                            "usage": {"prompt_tokens": 7, "completion_tokens": MAX_TOKENS,
                                      "total_tokens": 7 + MAX_TOKENS, "prompt_tokens_details": {"cached_tokens": 0}}}


def test_websocket_cancel_and_isolation(live, http, expected):
    with ws_connect(live, "alpha") as mine, ws_connect(live, "beta") as theirs:
        assert json.loads(mine.recv(timeout=30))["type"] == "ready"
        assert json.loads(theirs.recv(timeout=30))["type"] == "ready"
        mine.send(json.dumps({"type": "generate", "id": "long", "model": MODEL, "prompt": "Once upon a time",
                              "max_tokens": 400, "temperature": 0}))
        theirs.send(json.dumps({"type": "generate", "id": "short", "model": MODEL, "prompt": PROMPTS[4],
                                "max_tokens": MAX_TOKENS, "temperature": 0}))
        assert ws_read(mine, "token")[-1]["type"] == "token"
        # another connection cannot cancel it, even knowing its id
        theirs.send(json.dumps({"type": "cancel", "id": "long"}))
        theirs_messages = ws_read(theirs, gen_id="long")
        assert theirs_messages[-1]["status"] == 404
        mine.send(json.dumps({"type": "cancel", "id": "long"}))
        assert ws_read(mine)[-1]["finish_reason"] == "cancelled"
        if not any(m["type"] == "done" for m in theirs_messages):
            theirs_messages += ws_read(theirs, gen_id="short")
        assert "".join(m["text"] for m in theirs_messages if m["type"] == "token") == expected[PROMPTS[4]]
    wait_idle(http)


@pytest.mark.parametrize("message, status, param", [
    ("not json", 400, None),
    (json.dumps({"type": "dance"}), 400, "type"),
    (json.dumps({"type": "generate", "model": MODEL, "prompt": "x"}), 400, "id"),
    (json.dumps({"type": "generate", "id": "x", "model": MODEL}), 400, "prompt"),
    (json.dumps({"type": "generate", "id": "x", "model": MODEL, "prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    (json.dumps({"type": "generate", "id": "x", "model": "nope", "prompt": "x"}), 404, "model"),
    (json.dumps({"type": "cancel", "id": "never-started"}), 404, "id"),
])
def test_websocket_bad_messages_get_errors_and_the_connection_stays(live, message, status, param):
    with ws_connect(live, "alpha") as ws:
        json.loads(ws.recv(timeout=30))
        ws.send(message)
        error = json.loads(ws.recv(timeout=30))
        assert (error["type"], error["status"], error["error"]["param"]) == ("error", status, param)
        ws.send(json.dumps({"type": "generate", "id": "ok", "model": MODEL, "prompt": "hi", "max_tokens": 1}))
        assert ws_read(ws)[-1]["type"] == "done"


@pytest.mark.parametrize("first_message", [
    {"type": "generate", "id": "x", "model": MODEL, "prompt": "hi"},
    {"type": "auth", "api_key": "wrong"},
])
def test_websocket_without_a_valid_key_is_closed(live, first_message):
    with connect(live.ws_url, open_timeout=30) as ws:
        ws.send(json.dumps(first_message))
        error = json.loads(ws.recv(timeout=30))
        assert (error["type"], error["status"]) == ("error", 401)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        assert ws.close_code == 1008


# --- load: 32 concurrent streams from several tenants ----------------------------------------------

async def stream_one(client: httpx.AsyncClient, tenant: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    parts = []
    async with client.stream("POST", "/v1/completions", headers=auth(tenant), json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(parts)


def test_32_concurrent_streams_from_several_tenants_all_match_running_alone(live, http, expected):
    tenants = ["alpha", "beta", "delta", "epsilon"]
    jobs = [(tenants[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(32)]

    async def load():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.url, timeout=600, limits=limits) as client:
            streams = asyncio.gather(*(stream_one(client, t, p) for t, p in jobs))
            health = []
            while not streams.done():  # the server keeps answering while it is loaded
                r = await client.get("/health")
                health.append(r.status_code)
                bad = await client.post("/v1/completions", headers=auth("alpha"), json={"model": MODEL})
                health.append(bad.status_code)
                await asyncio.sleep(1)
            return await streams, health

    texts, health = asyncio.run(load())
    assert len(texts) == 32
    for (_, prompt), text in zip(jobs, texts, strict=True):
        assert text == expected[prompt]
    assert set(health) <= {200, 400} and 200 in health
    assert wait_idle(http)["running"] == 0


# --- open access without a tenants file ------------------------------------------------------------

def test_without_tenants_the_server_is_open_on_loopback_only(served, live, http, tenants_file):
    wait_idle(http)  # the open server below shares the engine: keep the tenant server idle meanwhile
    with LiveServer(create_app([served])) as open_server:
        with httpx.Client(base_url=open_server.url, timeout=120) as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
            assert r.status_code == 200
    # a client that is not on loopback (Starlette's test client calls itself "testclient")
    with TestClient(create_app([served]), base_url="http://localhost") as remote:
        assert remote.get("/v1/models").status_code == 403
    check_bind_host("127.0.0.1", Tenants.open_access())
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        check_bind_host("0.0.0.0", Tenants.open_access())
    check_bind_host("0.0.0.0", load_tenants(tenants_file))


# --- the tenants file and the limiter, without a server --------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("[[tenant]\n", "not valid TOML"),
    ("", "no [[tenant]] tables"),
    ('[[tenant]]\nid = "a"\n', "missing key_sha256"),
    (f'[[tenant]]\nid = "a"\nkey_sha256 = "{"0" * 64}"\nmax_concurent = 3\n', "unknown key 'max_concurent'"),
    ('[[tenant]]\nid = "a"\nkey_sha256 = "plaintext-key"\n', "64-digit hex"),
    (f'[[tenant]]\nid = "a"\nkey_sha256 = "{"0" * 64}"\nmax_concurrent = 0\n', "positive integer"),
    (f'[[tenant]]\nid = "a"\nkey_sha256 = "{"0" * 64}"\n[[tenant]]\nid = "a"\nkey_sha256 = "{"1" * 64}"\n',
     "duplicate id"),
    (f'[[tenant]]\nid = "a"\nkey_sha256 = "{"0" * 64}"\n[[tenant]]\nid = "b"\nkey_sha256 = "{"0" * 64}"\n',
     "also tenant 'a'"),
])
def test_a_bad_tenants_file_names_the_problem(tmp_path, text, message):
    path = tmp_path / "tenants.toml"
    path.write_text(text)
    with pytest.raises(TenantsConfigError, match=re.escape(message)):
        load_tenants(path)


def test_tenants_file_keys_are_hashed(tenants_file):
    tenants = load_tenants(tenants_file)
    assert tenants.authenticate(KEYS["alpha"]).id == "alpha"
    assert tenants.authenticate(hash_key(KEYS["alpha"])) is None  # the digest itself is no key
    assert KEYS["alpha"] not in tenants_file.read_text()


def test_limiter_refills_its_bucket_over_a_minute():
    now = [0.0]
    limiter = Limiter(Tenant("t", tokens_per_minute=60, max_concurrent=2), clock=lambda: now[0])
    assert limiter.try_acquire(50) is None
    wait, reason = limiter.try_acquire(30)
    assert wait == pytest.approx(20.0) and "tokens per minute" in reason
    now[0] = 20.0
    assert limiter.try_acquire(30) is None
    assert limiter.try_acquire(0)[1].endswith("(max_concurrent)")
    limiter.release(unused_tokens=25)  # what a request did not generate comes back
    assert limiter.try_acquire(25) is None


# --- chat templates from GGUF metadata -------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
            "{% endif %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_gguf_chat_template_renders_in_a_sandbox(served):
    template = ChatTemplate(served.engine.tokenizer, TEMPLATE)
    assert template.source == "gguf"
    prompt = template.render([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert prompt.text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert not prompt.add_bos and prompt.stop == ()
    ids = served.engine.tokenizer.encode(prompt.text, add_bos=prompt.add_bos)
    assert ids.count(served.engine.tokenizer.bos_id) == 1
    with pytest.raises(ChatTemplateError, match="no system"):
        template.render([{"role": "system", "content": "x"}])
    escape = ChatTemplate(served.engine.tokenizer, "{{ messages.__class__.__init__.__globals__ }}")
    with pytest.raises(ChatTemplateError):
        escape.render(CHAT)
    assert ChatTemplate(served.engine.tokenizer, "{% if %}").source == "plain"  # does not compile


# --- runtime errors: one table from code to HTTP status --------------------------------------------

def test_every_runtime_error_code_has_an_http_status():
    def subclasses(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

    codes = {cls.code for cls in subclasses(RealmError)}
    assert {"bad-request", "bad-model", "no-model", "device-lost", "unsupported-on-gpu"} <= codes  # all imported
    assert codes <= set(STATUS_BY_CODE)
    overflow, lost = api_error(ContextOverflow("too long"), "prompt"), api_error(DeviceLost("gone"))
    assert (overflow.status, overflow.param, overflow.body()["error"]["code"]) == (400, "prompt", "context-overflow")
    assert (lost.status, lost.message, lost.body()["error"]["type"]) == (503, "gone", "server_busy")
