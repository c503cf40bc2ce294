"""Every field of OpenAI's completions and chat requests is honoured or refused by name; logprobs, n,
penalties, logit_bias and seeds over HTTP; /v1/embeddings, /tokenize, /detokenize and /metrics.

The server runs the tiny random llama of test_scheduler (one character per token) on numpy, in
process (Starlette's TestClient with the app's lifespan). Oracles: the same GGUF loaded again and
run from position 0 for every token (`Engine.prefill`), log_softmax and pooling written here.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from test_logit_rules import oracle_generation
from test_scheduler import CHARS, N_CTX, write_tiny_model

from realm_server.http import http_routes
from realm_server.schema import openapi_document
from realm_server.service import Service, load_model
from realm_server.tenants import hash_key, load_tenants
from realm_wasm.engine import Engine, Model
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.sampling import LogitRules, SamplingParams
from realm_wasm.scheduler import Scheduler

MODEL = "tiny"
KEYS = {"acme": "acme-secret-key", "other": "other-secret-key", "single": "single-secret-key"}
LIMITS = {"single": "max_concurrent = 1\ntokens_per_minute = 200\n"}
PROMPT = "abcab"  # 5 one-character tokens after BOS
CHAT = [{"role": "user", "content": "abc"}]

# OpenAI's request fields (API reference, completions and chat completions) -> a value that asks for
# something. Each must be honoured (200, and its own test below says how) or a 400 naming it.
COMPLETION_FIELDS = {
    "best_of": 2, "echo": True, "frequency_penalty": 0.5, "logit_bias": {"40": 5}, "logprobs": 2,
    "max_tokens": 3, "n": 2, "presence_penalty": 0.5, "seed": 7, "stop": ["zz"], "stream": False,
    "stream_options": {"include_usage": True}, "suffix": "tail", "temperature": 0.7, "top_p": 0.9, "user": "u-1",
}
CHAT_FIELDS = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}], "logit_bias": {"40": 5}, "logprobs": True,
    "max_completion_tokens": 3, "max_tokens": 3, "metadata": {"k": "v"}, "modalities": ["text", "audio"],
    "n": 2, "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": 0.5, "prompt_cache_key": "k", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "s-1", "seed": 7, "service_tier": "flex",
    "stop": "zz", "store": True, "stream": False, "stream_options": {"include_usage": True}, "temperature": 0.7,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "u-1", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}
# asked-for values Realm cannot do although the field itself is implemented (400 naming the field);
# the tiny model's plain template has no tool calling (test_tool_calls.py serves one that has)
OUT_OF_REACH = {"best_of", "echo", "suffix", "service_tier", "store", "tools", "tool_choice", "parallel_tool_calls"}
COMPANIONS = {"top_logprobs": {"logprobs": True}}  # what a field needs beside it


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path, chars=CHARS + "\n")  # the plain chat template's turns end in newlines
    return path


@pytest.fixture(scope="module")
def oracle(model_path) -> Engine:
    return Engine.load(model_path, backend="numpy", n_ctx=N_CTX, n_slots=2)


@pytest.fixture(scope="module")
def service(model_path, tmp_path_factory) -> Service:
    tenants = tmp_path_factory.mktemp("cfg") / "tenants.toml"
    tenants.write_text("".join(f'[[tenant]]\nid = "{t}"\nkey_sha256 = "{hash_key(k)}"\n{LIMITS.get(t, "")}\n'
                               for t, k in KEYS.items()))
    return Service([load_model(model_path, name=MODEL, backend="numpy", n_ctx=N_CTX, n_slots=4)],
                   load_tenants(tenants))


@pytest.fixture(scope="module")
def client(service):
    """The app's routes over `service` (as create_app builds them), with its lifespan."""
    app = Starlette(routes=http_routes(service), lifespan=lambda app: service.serving())
    with TestClient(app) as c:
        yield c


def post(client, path: str, body: dict, tenant: str = "acme"):
    return client.post(path, json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def complete(client, **fields) -> dict:
    r = post(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def prompt_ids(oracle: Engine) -> list[int]:
    return oracle.tokenizer.encode(PROMPT)


# --- no silent ignoring --------------------------------------------------------------------------

@pytest.mark.parametrize("path,base,fields", [
    ("/v1/completions", {"prompt": PROMPT}, COMPLETION_FIELDS),
    ("/v1/chat/completions", {"messages": CHAT}, CHAT_FIELDS),
], ids=["completions", "chat"])
def test_every_openai_field_is_honoured_or_refused_by_name(client, path, base, fields):
    schema = openapi_document()["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    implemented, refused = set(schema["properties"]), set(schema["x-refused"])
    for name, value in fields.items():
        r = post(client, path, {"model": MODEL, **base, "max_tokens": 2, **COMPANIONS.get(name, {}), name: value})
        if r.status_code == 200:
            assert name in implemented and name not in refused, name
            continue
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == name, (name, r.text)
        assert (name in refused) != (name in OUT_OF_REACH and name in implemented), name
    honoured = {n for n in fields if n in implemented and n not in OUT_OF_REACH}
    assert {"logprobs", "n", "presence_penalty", "frequency_penalty", "logit_bias", "seed"} <= honoured


def test_what_realm_does_anyway_is_accepted_and_unknown_fields_are_refused(client):
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    for accepted in ({"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"store": False},
                     {"service_tier": "auto"}, {"tools": None}, {"modalities": ["text"]}):
        assert post(client, "/v1/chat/completions", {**chat, **accepted}).status_code == 200, accepted
    r = post(client, "/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    r = post(client, "/v1/chat/completions", {**chat, "min_p": 0.1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_p"
    assert "unknown field" in r.json()["error"]["message"]
    r = post(client, "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "a", "x": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].x"


# --- logprobs, n, penalties, logit_bias, seeds --------------------------------------------------

def log_softmax(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64)
    return z - z.max() - math.log(np.exp(z - z.max()).sum())


def oracle_logprobs(oracle: Engine, generated: list[int]) -> list[np.ndarray]:
    """log_softmax of the model's logits before each generated token, recomputed from position 0."""
    ids = prompt_ids(oracle)
    return [log_softmax(list(oracle.prefill(ids + generated[:i], slot=1))[0][-1]) for i in range(len(generated))]


def test_completion_logprobs_are_the_models_log_softmax(client, oracle):
    body = complete(client, logprobs=3, temperature=0.8, seed=4)
    lp = body["choices"][0]["logprobs"]
    tokenizer = oracle.tokenizer
    generated = [tokenizer.encode(t, add_bos=False, parse_special=False)[0] for t in lp["tokens"]]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    # the answer decoded token by token, the oracle prefilled from 0: f32 sums in other orders, which
    # move a log-probability of -11 by ~1e-4 (relative 1e-5), so the tolerance is relative as well
    for i, logp in enumerate(oracle_logprobs(oracle, generated)):
        assert lp["token_logprobs"][i] == pytest.approx(logp[generated[i]], rel=1e-4, abs=1e-4)
        best = np.argsort(-logp, kind="stable")[:3]
        assert list(lp["top_logprobs"][i]) == [tokenizer.decode([t]) for t in best]
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(logp[best], rel=1e-4, abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_streamed_logprobs_equal_the_answers(client):
    whole = complete(client, logprobs=2, temperature=0.8, seed=4)["choices"][0]["logprobs"]
    r = post(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "logprobs": 2,
                                         "temperature": 0.8, "seed": 4, "stream": True})
    chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
    import json
    pieces = [json.loads(c)["choices"][0]["logprobs"] for c in chunks]
    pieces = [p for p in pieces if p]
    assert [t for p in pieces for t in p["tokens"]] == whole["tokens"]
    assert [o for p in pieces for o in p["text_offset"]] == whole["text_offset"]


def test_chat_logprobs_have_openais_content_shape(client, oracle):
    r = post(client, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4,
                                              "temperature": 0, "logprobs": True, "top_logprobs": 2})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content).strip() == choice["message"]["content"]
    for e in content:
        assert bytes(e["bytes"]).decode() == e["token"]
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"]  # greedy: the best
        assert e["logprob"] == e["top_logprobs"][0]["logprob"] <= 0
    r = post(client, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_n_choices_are_the_single_requests_with_seed_plus_index(client):
    body = complete(client, n=3, temperature=1.0, seed=10)
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [complete(client, temperature=1.0, seed=10 + i)["choices"][0]["text"] for i in range(3)]
    assert len(set(texts)) > 1
    assert body["usage"]["completion_tokens"] == sum(complete(client, temperature=1.0, seed=10 + i)["usage"][
        "completion_tokens"] for i in range(3))
    assert body["usage"]["prompt_tokens"] == len(PROMPT) + 1


def test_usage_counts_the_prompt_tokens_read_from_the_kv_cache(client):
    long = "abcab" * 6  # past MIN_REUSE tokens
    first = complete(client, prompt=long, n=2, temperature=1.0, seed=3)
    again = complete(client, prompt=long, temperature=0)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # choice 0 read it
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": len(long)}  # all but its last token


def test_n_choices_take_one_request_of_the_tenants_limits_and_give_back_what_they_did_not_use(client, service):
    limiter = service.limiters["single"]
    a = str(service.models[MODEL].engine.tokenizer.encode("a", add_bos=False)[0])
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": "a", "logit_bias": {a: 100}}
    for _ in range(3):  # 3 x 3 x (6 + 20) > 200 tokens: passes only if each gave back 3 x 19 unused
        r = post(client, "/v1/completions", {**body, "n": 3}, tenant="single")
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == ["", "", ""]  # stopped at their first token
        assert limiter.in_flight == 0  # one request of max_concurrent 1, released once
    r = post(client, "/v1/completions", {**body, "n": 16, "max_tokens": 20}, tenant="single")
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 16 x 26 > 200: never fits
    r = post(client, "/v1/embeddings", {"model": MODEL, "input": "a" * 250}, tenant="single")
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_penalties_and_bias_over_http_follow_the_oracle(client, oracle):
    fields = {"presence_penalty": 1.5, "frequency_penalty": 2.0, "repetition_penalty": 1.3, "repeat_last_n": 8,
              "logit_bias": {"45": 20}}
    rules = LogitRules(((45, 20.0),), 1.5, 2.0, 1.3, 8)
    want, _ = oracle_generation(oracle, prompt_ids(oracle), 6, rules, SamplingParams())
    got = complete(client, temperature=0, **fields)["choices"][0]["text"]
    assert got == oracle.tokenizer.decode(want)
    assert got != complete(client, temperature=0)["choices"][0]["text"]
    banned = complete(client, temperature=0, logit_bias={"45": 100})["choices"][0]["text"]
    assert banned == oracle.tokenizer.decode([45]) * 6  # +100 forces it, as OpenAI documents
    r = post(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "logit_bias": {"99999": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias.99999"


def test_a_seed_repeats_its_text(client):
    first, again = (complete(client, temperature=1.0, seed=123)["choices"][0]["text"] for _ in range(2))
    assert first == again != complete(client, temperature=1.0, seed=124)["choices"][0]["text"]


# --- tokens, embeddings, metrics ----------------------------------------------------------------

def test_tokenize_and_detokenize_as_llama_server(client, oracle):
    r = post(client, "/tokenize", {"content": PROMPT})
    assert r.json() == {"tokens": oracle.tokenizer.encode(PROMPT, add_bos=False)}
    with_bos = post(client, "/tokenize", {"content": PROMPT, "add_special": True, "with_pieces": True}).json()
    assert [t["id"] for t in with_bos["tokens"]] == oracle.tokenizer.encode(PROMPT)
    assert "".join(t["piece"] for t in with_bos["tokens"]) == PROMPT
    assert post(client, "/detokenize", {"tokens": r.json()["tokens"]}).json() == {"content": PROMPT}
    assert post(client, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert client.post("/tokenize", json={"content": "a"}).status_code == 401


def test_embeddings_are_the_normalized_mean_of_the_final_hidden_states(client, oracle, model_path):
    r = post(client, "/v1/embeddings", {"model": MODEL, "input": [PROMPT, "zz"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    for item, text in zip(data, [PROMPT, "zz"], strict=True):
        ids = oracle.tokenizer.encode(text)
        states = Scheduler(oracle, 1).hidden_states(ids)
        # the last state is what the output head reads: it gives the model's logits
        [logits] = list(oracle.prefill(ids, slot=1))
        head = oracle.executor.w[next(op.weights[0] for op in oracle.model.plan.ops if op.out == "logits")]
        np.testing.assert_allclose(states[-1] @ np.asarray(head).T, logits[-1], rtol=1e-4, atol=1e-4)
        mean = states.mean(axis=0)
        np.testing.assert_allclose(item["embedding"], mean / np.linalg.norm(mean), atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == len(PROMPT) + 1 + 3
    packed = post(client, "/v1/embeddings", {"model": MODEL, "input": PROMPT, "encoding_format": "base64"}).json()
    unpacked = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(unpacked, data[0]["embedding"], atol=1e-6)
    assert post(client, "/v1/embeddings", {"model": MODEL, "input": "a", "dimensions": 3}).status_code == 400


def test_hidden_states_agree_on_the_gpu(oracle, model_path, gpu):
    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    engine = Engine(model, GpuExecutor(model.plan, f.tensor_bytes, n_slots=1, n_ctx=N_CTX, device=gpu, max_tokens=32),
                    N_CTX)
    ids = oracle.tokenizer.encode(PROMPT * 8)  # more tokens than one GPU step holds: two chunks
    np.testing.assert_allclose(Scheduler(engine, 1).hidden_states(ids), Scheduler(oracle, 1).hidden_states(ids),
                               atol=2e-2)


def test_metrics_count_each_tenants_requests_in_prometheus_text(client):
    before = metric(client, "acme", 'realm_requests_total{endpoint="completion",finish_reason="length",model="tiny",'
                                    'tenant="acme"}')
    complete(client, temperature=0)
    text = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS['acme']}"}).text
    assert metric(client, "acme", 'realm_requests_total{endpoint="completion",finish_reason="length",model="tiny",'
                                  'tenant="acme"}') == before + 1
    for name in ("realm_prompt_tokens_total", "realm_completion_tokens_total",
                 "realm_time_to_first_token_seconds_bucket", "realm_request_latency_seconds_count",
                 'realm_queue_depth{model="tiny"}'):
        assert name in text, name
    other = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS['other']}"}).text
    assert 'tenant="acme"' not in other and "realm_queue_depth" in other
    assert client.get("/metrics").status_code == 401


def metric(client, tenant: str, series: str) -> float:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[tenant]}"}).text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def test_a_prompt_the_vocabulary_cannot_spell_is_a_400_naming_it(tmp_path):
    """The plain chat template ends turns in newlines; a vocabulary without one cannot spell it."""
    path = tmp_path / "no-newline.gguf"
    write_tiny_model(path)  # CHARS only: no "\n"
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nid = "acme"\nkey_sha256 = "{hash_key(KEYS["acme"])}"\n')
    service = Service([load_model(path, name=MODEL, backend="numpy", n_ctx=N_CTX, n_slots=1)], load_tenants(tenants))
    app = Starlette(routes=http_routes(service), lifespan=lambda app: service.serving())
    with TestClient(app) as c:
        r = post(c, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "messages"), r.text
        assert "cannot be tokenized" in r.json()["error"]["message"]
        assert post(c, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
