"""Structured output: response_format (json_object, json_schema) and llama-server's GBNF `grammar`
enforced while sampling, through the API with the bundled SmolLM2 instruct model on numpy.

Oracles: json.loads and a check of each schema written here; for the wiring, the masked argmax
recomputed from position 0 (`Engine.prefill`) with a matcher of its own (the mask itself is held
to a brute-force oracle in test_grammar.py); a request without a grammar in the same batch is
unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from realm_server.http import http_routes
from realm_server.service import Service, load_model
from realm_server.tenants import hash_key, load_tenants
from realm_wasm.engine import Engine
from realm_wasm.grammar import Grammar, GrammarEngine, TokenVocabulary
from realm_wasm.model_files import chat_model_path
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import Request, Scheduler

MODEL = "smol"
KEY = "acme-secret-key"
N_CTX = 256
ASK = [{"role": "user", "content": "Describe a small red ball as JSON."}]
SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]},
    "round": {"type": "boolean"},
    "name": {"type": "string", "maxLength": 12}},
    "required": ["color", "round", "name"]}


def follows_schema(value) -> bool:
    return (isinstance(value, dict) and list(value) == ["color", "round", "name"]
            and value["color"] in ("red", "green", "blue") and isinstance(value["round"], bool)
            and isinstance(value["name"], str) and len(value["name"]) <= 12)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(chat_model_path(), backend="numpy", n_ctx=N_CTX, n_slots=2)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tenants = tmp_path_factory.mktemp("cfg") / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nid = "acme"\nkey_sha256 = "{hash_key(KEY)}"\n')
    service = Service([load_model(chat_model_path(), name=MODEL, backend="numpy", n_ctx=N_CTX, n_slots=4)],
                      load_tenants(tenants))
    app = Starlette(routes=http_routes(service), lifespan=lambda app: service.serving())
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def chat(client, **fields) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 60, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("seed", range(4))
def test_sampled_output_follows_its_json_schema(client, seed):
    choice = chat(client, temperature=1.0, seed=seed,
                  response_format={"type": "json_schema", "json_schema": {"name": "ball", "schema": SCHEMA}})
    assert choice["finish_reason"] == "stop", choice
    assert follows_schema(json.loads(choice["message"]["content"])), choice


def test_json_object_output_is_an_object_and_streams_the_same(client):
    asked = {"temperature": 0, "response_format": {"type": "json_object"}, "max_tokens": 120,
             "messages": [{"role": "user", "content": 'Reply with {"color": ...}: the color of the sky.'}]}
    choice = chat(client, **asked)
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    with client.stream("POST", "/v1/chat/completions", json={"model": MODEL, "stream": True, **asked}) as r:
        pieces = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces) == choice["message"]["content"]


def test_a_gbnf_grammar_chooses_among_its_sentences(client):
    for seed in range(3):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Is the sky blue? Answer:",
                                                  "grammar": 'root ::= " " ("yes" | "no") "."',
                                                  "temperature": 1.0, "seed": seed, "max_tokens": 10})
        choice = r.json()["choices"][0]
        assert choice["text"] in (" yes.", " no.") and choice["finish_reason"] == "stop", choice


def test_bad_grammars_and_schemas_are_400s_naming_the_field(client):
    cases = [({"grammar": "root ::= [a-"}, "grammar"),
             ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": []}}}},
              "response_format.json_schema.schema"),
             ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
             ({"grammar": 'root ::= "a"', "speculation": {"method": "lookup"}}, "speculation")]
    for fields, param in cases:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4, **fields})
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text


def test_masked_greedy_is_the_argmax_over_the_allowed_tokens_and_leaves_its_neighbour_alone(engine):
    grammar = GrammarEngine(Grammar.from_json_schema(SCHEMA), TokenVocabulary.from_tokenizer(engine.tokenizer))
    prompt = engine.tokenizer.encode("A ball as JSON:")
    oracle, matcher, tokens = [], grammar.matcher(), list(prompt)
    for _ in range(8):  # recompute from position 0, mask with a matcher of its own, argmax
        row = list(engine.prefill(tokens, slot=1))[-1][-1]
        token = int(np.argmax(np.where(matcher.allowed_tokens(), row, -np.inf)))
        assert matcher.advance_token(token)
        oracle.append(token)
        tokens.append(token)
    plain_request = Request(prompt, 8, SamplingParams(), stop_at_eos=False)
    results = {}

    def sink(name):
        return lambda event: results.setdefault(name, []).append(event)

    scheduler = Scheduler(engine, n_slots=2)
    scheduler.submit(Request(prompt, 8, SamplingParams(), stop_at_eos=False, grammar=grammar), sink("masked"))
    scheduler.submit(plain_request, sink("plain"))
    while scheduler.busy:
        scheduler.step()
    ids = {name: [e.token_id for e in events if getattr(e, "token_id", None) is not None]
           for name, events in results.items()}
    assert ids["masked"] == oracle
    alone = [e.token_id for e in engine.generate(prompt, 8, stop_at_eos=False) if e.token_id is not None]
    assert ids["plain"] == alone and alone != oracle
