"""The Python SDK (sync and async, HTTP and WebSocket) and the JavaScript SDK under Node, on a live server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from realm_client import (
    APIConnectionError,
    AsyncRealmClient,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RealmClient,
)
from test_server_api import CHAT, COPY, KEYS, LOOKUP, MAX_TOKENS, MODEL, N_CTX, PROMPTS, TENANTS_TOML, LiveServer

from realm_server.app import create_app
from realm_server.service import load_model
from realm_server.tenants import load_tenants
from realm_wasm.chat_template import PLAIN_STOP
from realm_wasm.model_files import default_model_path

JS_SDK = Path(__file__).resolve().parents[1] / "sdk" / "js" / "realm-client.mjs"
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}


@pytest.fixture(scope="module")
def served():
    return load_model(default_model_path(), backend="numpy", n_ctx=N_CTX, n_slots=4)


@pytest.fixture(scope="module")
def expected(served) -> dict[str, str]:
    engine = served.engine
    texts = {p: "".join(e.text for e in engine.generate(p, MAX_TOKENS)) for p in PROMPTS[:3]}
    chat = "".join(e.text for e in engine.generate("User: What is the capital of France?\nAssistant:", MAX_TOKENS))
    texts["chat"] = chat.split(PLAIN_STOP[0])[0].lstrip()
    return texts


@pytest.fixture(scope="module")
def live(served, expected, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tenants.toml"
    path.write_text(TENANTS_TOML)
    with LiveServer(create_app([served], load_tenants(path))) as server:
        yield server


@pytest.fixture
def client(live):
    with RealmClient(live.url, api_key=KEYS["alpha"]) as c:
        yield c


def wait_idle(client: RealmClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.health()["models"][MODEL]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- Python, sync ----------------------------------------------------------------------------------

def test_sync_http(client, expected):
    assert [(m.id, m.context_length) for m in client.models()] == [(MODEL, N_CTX)]
    done = client.complete(PROMPTS[0], **GREEDY)  # model left out: the first listed
    assert (done.text, done.finish_reason, done.model) == (expected[PROMPTS[0]], "length", MODEL)
    assert done.usage.completion_tokens == MAX_TOKENS
    with client.stream(PROMPTS[1], model=MODEL, **GREEDY) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == expected[PROMPTS[1]]
    assert chunks[-1].finish_reason == stream.finish_reason == "length"
    assert stream.usage.completion_tokens == MAX_TOKENS
    assert client.chat(CHAT, **GREEDY).text == expected["chat"]
    assert client.chat_stream(CHAT, **GREEDY).text() == expected["chat"]


def test_sync_speculation_keeps_the_text_and_counts_drafts(client):
    plain = client.complete(COPY, max_tokens=8, temperature=0)
    assert plain.usage.drafted_tokens is None
    done = client.complete(COPY, max_tokens=8, temperature=0, speculation=LOOKUP)
    assert done.text == plain.text and done.usage.drafted_tokens >= done.usage.accepted_tokens > 0


def test_sync_typed_errors(live, client):
    with pytest.raises(AuthenticationError) as e:
        RealmClient(live.url, api_key="wrong").models()
    assert e.value.status == 401
    with pytest.raises(PermissionDeniedError):
        RealmClient(live.url, api_key=KEYS["gamma"]).complete("hi", model=MODEL)
    with pytest.raises(BadRequestError) as e:
        client.complete("hi", max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(NotFoundError):
        client.stream("hi", model="nope")
    with pytest.raises(TypeError, match="max_token"):
        client.complete("hi", max_token=3)
    with RealmClient(live.url, api_key=KEYS["solo"]) as solo, \
            solo.stream("Once upon a time", max_tokens=300, temperature=0) as held:
        chunks = iter(held)  # keep the iterator: dropping it would close (cancel) the stream
        next(chunks)
        with pytest.raises(RateLimitError) as e:
            solo.complete("hi", max_tokens=1)
        assert e.value.retry_after >= 1
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(APIConnectionError):
        RealmClient(f"http://127.0.0.1:{port}").health()


def test_leaving_a_stream_early_cancels_it(client):
    before = client.health()["models"][MODEL]["tokens_generated"]
    with client.stream("Once upon a time", max_tokens=300, temperature=0) as stream:
        for _ in stream:
            break
    wait_idle(client)
    assert client.health()["models"][MODEL]["tokens_generated"] - before < 100


def test_sync_websocket(client, expected):
    with client.websocket() as ws:
        assert ws.models == [MODEL]
        first = ws.generate(PROMPTS[0], **GREEDY)
        second = ws.generate(messages=CHAT, **GREEDY)
        long = ws.generate("Once upon a time", max_tokens=300, temperature=0)
        # read them out of order: messages wait for their own reader
        assert second.text() == expected["chat"]
        assert first.text() == expected[PROMPTS[0]] and first.finish_reason == "length"
        next(iter(long))
        long.cancel()
        long.text()  # what came before the cancel took effect
        assert long.finish_reason == "cancelled" and long.usage.completion_tokens < 300
        with pytest.raises(BadRequestError) as e:
            ws.generate("hi", top_p=3).text()
        assert e.value.param == "top_p"


def test_sync_websocket_refuses_a_bad_key(live):
    with pytest.raises(AuthenticationError):
        RealmClient(live.url, api_key="wrong").websocket()


# --- Python, async ---------------------------------------------------------------------------------

def test_async_client(live, expected):
    async def run():
        async with AsyncRealmClient(live.url, api_key=KEYS["beta"]) as client:
            done, streamed, chat = await asyncio.gather(
                client.complete(PROMPTS[0], **GREEDY),
                (await client.stream(PROMPTS[1], **GREEDY)).text(),
                (await client.chat_stream(CHAT, **GREEDY)).text())
            async with client.websocket() as ws:
                gen = await ws.generate(PROMPTS[2], **GREEDY)
                long = await ws.generate("Once upon a time", max_tokens=300, temperature=0)
                ws_text = await gen.text()
                async for _ in long:
                    await long.cancel()
                    break
                await long.text()
            return done.text, streamed, chat, ws_text, long.finish_reason

    assert asyncio.run(run()) == (expected[PROMPTS[0]], expected[PROMPTS[1]], expected["chat"],
                                  expected[PROMPTS[2]], "cancelled")


# --- JavaScript under Node -------------------------------------------------------------------------

JS_SCRIPT = """
import { RealmClient, AuthenticationError, BadRequestError, PermissionDeniedError } from %(sdk)s;
const [url, key, gammaKey] = process.argv.slice(2);
const client = new RealmClient({ baseURL: url, apiKey: key });
const greedy = { max_tokens: %(max_tokens)d, temperature: 0 };
const out = {};
out.models = (await client.models()).map((m) => m.id);
out.complete = (await client.complete(%(p0)s, greedy)).text;
let streamed = "", last = null;
for await (const chunk of client.stream(%(p1)s, greedy)) { streamed += chunk.text; last = chunk; }
out.stream = streamed;
out.streamEnd = [last.finishReason, last.usage.completion_tokens];
out.chat = (await client.chat(%(chat)s, greedy)).text;
let chatText = "";
for await (const chunk of client.chatStream(%(chat)s, greedy)) chatText += chunk.text;
out.chatStream = chatText;
const ws = await client.connect();
const gen = ws.generate({ prompt: %(p2)s, ...greedy });
const long = ws.generate({ prompt: "Once upon a time", max_tokens: 300, temperature: 0 });
let wsText = "";
for await (const chunk of gen) wsText += chunk.text;
out.ws = wsText;
for await (const chunk of long) { if (!chunk.finishReason) long.cancel(); }
out.cancelled = long.finishReason;
ws.close();
const errors = {};
try { await new RealmClient({ baseURL: url, apiKey: "wrong" }).models(); }
catch (e) { errors.auth = [e instanceof AuthenticationError, e.status]; }
try { await client.complete("hi", { max_tokens: 0 }); }
catch (e) { errors.bad = [e instanceof BadRequestError, e.param]; }
try { await new RealmClient({ baseURL: url, apiKey: gammaKey }).complete("hi", { model: %(model)s }); }
catch (e) { errors.denied = e instanceof PermissionDeniedError; }
try { await new RealmClient({ baseURL: url, apiKey: "wrong" }).connect(); }
catch (e) { errors.wsAuth = e instanceof AuthenticationError; }
out.errors = errors;
console.log(JSON.stringify(out));
"""


def test_js_sdk_under_node(live, expected, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "sdk_check.mjs"
    script.write_text(JS_SCRIPT % {
        "sdk": json.dumps(JS_SDK.as_uri()), "max_tokens": MAX_TOKENS, "model": json.dumps(MODEL),
        "p0": json.dumps(PROMPTS[0]), "p1": json.dumps(PROMPTS[1]), "p2": json.dumps(PROMPTS[2]),
        "chat": json.dumps(CHAT)})
    # Node 20 has WebSocket behind a flag (on by default from Node 22)
    has_ws = subprocess.run([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]).returncode == 0
    flags = [] if has_ws else ["--experimental-websocket"]
    r = subprocess.run([node, *flags, str(script), live.url, KEYS["alpha"], KEYS["gamma"]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["models"] == [MODEL]
    assert out["complete"] == expected[PROMPTS[0]]
    assert out["stream"] == expected[PROMPTS[1]]
    assert out["streamEnd"] == ["length", MAX_TOKENS]
    assert out["chat"] == out["chatStream"] == expected["chat"]
    assert out["ws"] == expected[PROMPTS[2]]
    assert out["cancelled"] == "cancelled"
    assert out["errors"] == {"auth": [True, 401], "bad": [True, "max_tokens"], "denied": True, "wsAuth": True}


# --- logprobs, n, penalties, logit_bias, embeddings, tokens (the tiny model of test_scheduler) ----

TINY_JS_SCRIPT = """
import { RealmClient } from %(sdk)s;
const [url, key] = process.argv.slice(2);
const client = new RealmClient({ baseURL: url, apiKey: key });
const out = {};
const done = await client.complete(%(prompt)s, { max_tokens: 4, temperature: 0, logprobs: 2 });
out.logprobs = done.logprobs.map((e) => [e.token, e.logprob, e.top.length]);
const chat = await client.chat([{ role: "user", content: "abc" }], { max_tokens: 3, temperature: 0, logprobs: 1 });
out.chatLogprobs = chat.logprobs.map((e) => e.top.length);
const many = await client.complete(%(prompt)s, { max_tokens: 4, temperature: 1, seed: 10, n: 2 });
out.choices = many.choices.map((c) => [c.index, c.text]);
const single = await client.complete(%(prompt)s, { max_tokens: 4, temperature: 1, seed: 11 });
out.second = single.text;
out.biased = (await client.complete(%(prompt)s, { max_tokens: 4, temperature: 0, logit_bias: { 45: 100 } })).text;
out.penalized = (await client.complete(%(prompt)s, { max_tokens: 6, temperature: 0, presence_penalty: 1.5,
                                                     frequency_penalty: 2, repetition_penalty: 1.3,
                                                     repeat_last_n: 8, logit_bias: { 45: 20 } })).text;
let streamed = 0;
for await (const chunk of client.stream(%(prompt)s, { max_tokens: 4, temperature: 0, logprobs: 0 })) {
  streamed += chunk.logprobs?.length ?? 0;
}
out.streamedLogprobs = streamed;
out.embeddings = await client.embeddings([%(prompt)s, "zz"]);
out.tokens = await client.tokenize(%(prompt)s);
out.text = await client.detokenize(out.tokens);
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A live server of the tiny model, its key, an oracle engine of the same file, and its path."""
    from test_api_fields import KEYS as TINY_KEYS
    from test_api_fields import MODEL as TINY
    from test_scheduler import CHARS, write_tiny_model

    from realm_server.tenants import hash_key
    from realm_wasm.engine import Engine

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path, chars=CHARS + "\n")
    tenants = path.parent / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nid = "acme"\nkey_sha256 = "{hash_key(TINY_KEYS["acme"])}"\n')
    served_tiny = load_model(path, name=TINY, backend="numpy", n_ctx=96, n_slots=4)
    with LiveServer(create_app([served_tiny], load_tenants(tenants))) as server:
        yield server, TINY_KEYS["acme"], Engine.load(path, backend="numpy", n_ctx=96, n_slots=2)


def tiny_expectations(oracle) -> dict:
    """What the tiny model must answer, from the oracles of test_api_fields and test_logit_rules."""
    from test_api_fields import PROMPT, oracle_logprobs
    from test_logit_rules import oracle_generation

    from realm_wasm.sampling import LogitRules, SamplingParams
    from realm_wasm.scheduler import Scheduler

    ids = oracle.tokenizer.encode(PROMPT)
    greedy, _ = oracle_generation(oracle, ids, 4, LogitRules(), SamplingParams())
    penalized, _ = oracle_generation(oracle, ids, 6, LogitRules(((45, 20.0),), 1.5, 2.0, 1.3, 8), SamplingParams())
    vectors = []
    for text in (PROMPT, "zz"):
        mean = Scheduler(oracle, 1).hidden_states(oracle.tokenizer.encode(text)).mean(axis=0)
        vectors.append(mean / np.linalg.norm(mean))
    return {"prompt": PROMPT, "greedy": greedy, "logprobs": [lp[t] for lp, t in zip(
        oracle_logprobs(oracle, greedy), greedy, strict=True)], "penalized": oracle.tokenizer.decode(penalized),
        "biased": oracle.tokenizer.decode([45]) * 4, "embeddings": vectors, "tokens": oracle.tokenizer.encode(
            PROMPT, add_bos=False)}


def test_sdk_logprobs_choices_penalties_embeddings_and_tokens(tiny):
    server, key, oracle = tiny
    want = tiny_expectations(oracle)
    prompt = want["prompt"]
    with RealmClient(server.url, api_key=key) as client:
        done = client.complete(prompt, max_tokens=4, temperature=0, logprobs=2)
        assert [e.token for e in done.logprobs] == [oracle.tokenizer.decode([t]) for t in want["greedy"]]
        assert [e.logprob for e in done.logprobs] == pytest.approx(want["logprobs"], abs=1e-4)
        assert all(len(e.top) == 2 and e.top[0][0] == e.token for e in done.logprobs)  # greedy: the best
        chat = client.chat([{"role": "user", "content": "abc"}], max_tokens=3, temperature=0, logprobs=1)
        assert chat.logprobs and all(len(e.top) == 1 for e in chat.logprobs)
        many = client.complete(prompt, max_tokens=4, temperature=1, seed=10, n=2)
        assert [c.text for c in many.choices] == [client.complete(prompt, max_tokens=4, temperature=1, seed=s).text
                                                  for s in (10, 11)]
        assert client.complete(prompt, max_tokens=4, temperature=0, logit_bias={45: 100}).text == want["biased"]
        assert client.complete(prompt, max_tokens=6, temperature=0, presence_penalty=1.5, frequency_penalty=2,
                               repetition_penalty=1.3, repeat_last_n=8, logit_bias={45: 20}).text == want["penalized"]
        with client.stream(prompt, max_tokens=4, temperature=0, logprobs=0) as stream:
            assert sum(len(c.logprobs or ()) for c in stream) == 4
        np.testing.assert_allclose(client.embeddings([prompt, "zz"]), want["embeddings"], atol=1e-5)
        assert client.tokenize(prompt) == want["tokens"]
        assert client.detokenize(want["tokens"]) == prompt

    async def run():
        async with AsyncRealmClient(server.url, api_key=key) as client:
            return await client.embeddings(prompt), await client.tokenize(prompt, add_special=True)

    vectors, with_bos = asyncio.run(run())
    np.testing.assert_allclose(vectors[0], want["embeddings"][0], atol=1e-5)
    assert with_bos == oracle.tokenizer.encode(prompt)


def test_js_sdk_logprobs_choices_penalties_embeddings_and_tokens(tiny, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    server, key, oracle = tiny
    want = tiny_expectations(oracle)
    script = tmp_path / "sdk_tiny.mjs"
    script.write_text(TINY_JS_SCRIPT % {"sdk": json.dumps(JS_SDK.as_uri()), "prompt": json.dumps(want["prompt"])})
    r = subprocess.run([node, str(script), server.url, key], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [t for t, _, _ in out["logprobs"]] == [oracle.tokenizer.decode([t]) for t in want["greedy"]]
    assert [lp for _, lp, _ in out["logprobs"]] == pytest.approx(want["logprobs"], abs=1e-4)
    assert {k for _, _, k in out["logprobs"]} == {2} and set(out["chatLogprobs"]) == {1}
    assert [i for i, _ in out["choices"]] == [0, 1] and out["choices"][1][1] == out["second"]
    assert (out["biased"], out["penalized"]) == (want["biased"], want["penalized"])
    assert out["streamedLogprobs"] == 4
    np.testing.assert_allclose(out["embeddings"], want["embeddings"], atol=1e-5)
    assert out["tokens"] == want["tokens"] and out["text"] == want["prompt"]
