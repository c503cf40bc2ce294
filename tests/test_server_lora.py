"""LoRA adapters over the API: per request, per-tenant defaults and allow-lists, tenants' own adapters.

A tiny random llama and adapters written for it (test_lora's helpers); the expected texts come from
`Engine.generate` with the same adapters on another engine, before the server starts.
"""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient
from test_lora import all_projections, make_adapter
from test_scheduler import N_CTX, write_tiny_model

from realm_server.app import create_app
from realm_server.errors import ConfigError
from realm_server.service import Service, load_model
from realm_server.tenants import Tenants, TenantsConfigError, hash_key, load_tenants
from realm_wasm.engine import Engine
from realm_wasm.gguf import read_gguf
from realm_wasm.models import build_plan

MODEL = "tiny"
PROMPT = "Hello, world"
KEYS = {t: f"{t}-key" for t in ("acme", "beta", "gamma", "delta")}
TENANTS = f"""
[[tenant]]
id = "acme"
key_sha256 = "{hash_key(KEYS['acme'])}"
lora = "style"
lora_allowed = ["style", "terse"]

[[tenant]]
id = "beta"
key_sha256 = "{hash_key(KEYS['beta'])}"
lora_upload = true

[[tenant]]
id = "gamma"
key_sha256 = "{hash_key(KEYS['gamma'])}"
lora = [{{id = "terse", scale = 0.5}}, "style"]
lora_allowed = ["*"]

[[tenant]]
id = "delta"
key_sha256 = "{hash_key(KEYS['delta'])}"
"""


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-api")
    write_tiny_model(folder / f"{MODEL}.gguf")
    plan = build_plan(read_gguf(folder / f"{MODEL}.gguf").header)
    rng = np.random.default_rng(31)
    make_adapter(folder / "style.gguf", plan, all_projections(plan, range(plan.kv.n_layers)), 4, rng, alpha=8.0)
    make_adapter(folder / "terse.gguf", plan, all_projections(plan, [0]), 8, rng)
    make_adapter(folder / "mine.gguf", plan, all_projections(plan, [1]), 4, rng, alpha=4.0)
    make_adapter(folder / "other-arch.gguf", plan, all_projections(plan, [1]), 4, rng, arch="gemma3")
    (folder / "tenants.toml").write_text(TENANTS)
    return folder


@pytest.fixture(scope="module")
def expected(files) -> dict:
    """The text of PROMPT under each combination of adapters the tests ask for."""
    engine = Engine.load(files / f"{MODEL}.gguf", backend="numpy", n_ctx=N_CTX, max_adapters=3,
                         adapters={name: files / f"{name}.gguf" for name in ("style", "terse", "mine")})
    combos = {"none": (), "style": (("style", 1.0),), "terse 0.5 + style": (("terse", 0.5), ("style", 1.0)),
              "mine": (("mine", 1.0),), "style 0.5": (("style", 0.5),)}
    texts = {key: "".join(e.text for e in engine.generate(PROMPT, 8, stop_at_eos=False, lora=lora))
             for key, lora in combos.items()}
    assert len(set(texts.values())) == len(texts)  # every adapter changes the text
    return texts


def served(files, max_adapters: int = 3):
    return load_model(files / f"{MODEL}.gguf", backend="numpy", n_ctx=N_CTX, n_slots=2, max_adapters=max_adapters,
                      adapters={"style": files / "style.gguf", "terse": files / "terse.gguf"})


@pytest.fixture(scope="module")
def client(files, expected):
    with TestClient(create_app([served(files)], load_tenants(files / "tenants.toml"))) as c:
        yield c


def complete(client, tenant: str, **extra):
    return client.post("/v1/completions", headers=auth(tenant), json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra})


def test_a_request_chooses_its_adapters_and_the_answer_says_which(client, expected):
    r = complete(client, "gamma", lora=[{"id": "style", "scale": 0.5}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected["style 0.5"]
    assert r.json()["lora"] == [{"id": "style", "scale": 0.5}]
    r = complete(client, "delta")
    assert r.json()["choices"][0]["text"] == expected["none"] and "lora" not in r.json()


def test_a_tenants_default_adapters_apply_unless_the_request_names_others(client, expected):
    assert complete(client, "acme").json()["choices"][0]["text"] == expected["style"]
    body = complete(client, "gamma").json()
    assert (body["choices"][0]["text"], body["lora"]) == (expected["terse 0.5 + style"],
                                                         [{"id": "terse", "scale": 0.5}, {"id": "style", "scale": 1.0}])
    assert complete(client, "acme", lora=[]).json()["choices"][0]["text"] == expected["none"]


def test_streams_and_websockets_take_adapters_too(client, expected):
    with client.stream("POST", "/v1/completions", headers=auth("acme"), json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["style"]
    assert chunks[-1]["lora"] == [{"id": "style", "scale": 1.0}] and events[-1] == "[DONE]"
    with client.websocket_connect("/ws", headers=auth("gamma")) as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "generate", "id": "g1", "model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                      "temperature": 0, "lora": [{"id": "style", "scale": 0.5}]})
        text, message = "", ws.receive_json()
        while message["type"] == "token":
            text, message = text + message["text"], ws.receive_json()
    assert (message["type"], text, message["lora"]) == ("done", expected["style 0.5"], [{"id": "style", "scale": 0.5}])


@pytest.mark.parametrize("tenant,lora,status,param", [
    ("delta", [{"id": "style"}], 403, "lora"),  # not in its lora_allowed
    ("acme", [{"id": "nope"}], 404, "lora"),
    ("acme", "style", 400, "lora"),
    ("acme", [{"scale": 1.0}], 400, "lora[0].id"),
    ("acme", [{"id": "style"}] * 5, 400, "lora"),
    ("acme", [{"id": "style", "scale": "big"}], 400, "lora[0].scale"),
    ("acme", [{"id": "style"}, {"id": "style"}], 400, None),  # the scheduler refuses a duplicate
])
def test_adapters_a_request_cannot_use_are_refused_naming_the_field(client, tenant, lora, status, param):
    r = complete(client, tenant, lora=lora)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_a_tenants_own_adapters_are_its_alone(client, files, expected):
    data = (files / "mine.gguf").read_bytes()
    r = client.put("/v1/adapters/mine", headers=auth("beta"), content=data)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "mine", "object": "adapter", "model": MODEL, "owned_by": "beta", "rank": 4,
                        "alpha": 4.0, "tensors": 7}
    assert [a["id"] for a in client.get("/v1/adapters", headers=auth("beta")).json()["data"]] == ["mine"]
    assert sorted(a["id"] for a in client.get("/v1/adapters", headers=auth("acme")).json()["data"]) == ["style",
                                                                                                        "terse"]
    assert complete(client, "beta", lora=[{"id": "mine"}]).json()["choices"][0]["text"] == expected["mine"]
    assert complete(client, "gamma", lora=[{"id": "mine"}]).status_code == 404  # gamma may use "*" of the server's
    assert complete(client, "gamma", lora=[{"id": "beta/mine"}]).status_code == 404
    assert client.put("/v1/adapters/mine", headers=auth("beta"), content=data).status_code == 409
    assert client.delete("/v1/adapters/mine", headers=auth("gamma")).status_code == 404
    assert client.delete("/v1/adapters/style", headers=auth("beta")).status_code == 404  # not its own
    assert client.delete("/v1/adapters/mine", headers=auth("beta")).json()["deleted"] is True
    assert complete(client, "beta", lora=[{"id": "mine"}]).status_code == 404


def test_loading_adapters_is_for_tenants_allowed_to_and_files_that_fit(client, files):
    data = (files / "mine.gguf").read_bytes()
    assert client.put("/v1/adapters/x", headers=auth("acme"), content=data).status_code == 403
    r = client.put("/v1/adapters/x", headers=auth("beta"), content=(files / "other-arch.gguf").read_bytes())
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad-adapter")
    assert "architecture 'gemma3'" in r.json()["error"]["message"]
    assert client.put("/v1/adapters/x", headers=auth("beta"), content=b"GGUF\x03").json()["error"]["code"] == (
        "bad-adapter")
    assert client.put("/v1/adapters/a b", headers=auth("beta"), content=data).json()["error"]["param"] == "id"
    # 3 slots: style, terse and one more
    assert client.put("/v1/adapters/one", headers=auth("beta"), content=data).status_code == 200
    r = client.put("/v1/adapters/two", headers=auth("beta"), content=data)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "adapter-conflict")
    assert client.delete("/v1/adapters/one", headers=auth("beta")).status_code == 200
    assert client.put("/v1/adapters/two", headers=auth("beta"), content=data).status_code == 200
    assert client.delete("/v1/adapters/two", headers=auth("beta")).status_code == 200


def test_without_tenants_the_open_tenant_manages_the_servers_adapters(files, expected):
    with TestClient(create_app([served(files)]), client=("127.0.0.1", 50000), base_url="http://127.0.0.1") as c:
        ids = sorted(a["id"] for a in c.get("/v1/adapters").json()["data"])
        assert ids == ["style", "terse"]
        assert c.put("/v1/adapters/mine", content=(files / "mine.gguf").read_bytes()).json()["owned_by"] == "server"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                            "lora": [{"id": "mine"}]})
        assert r.json()["choices"][0]["text"] == expected["mine"]
        assert c.delete("/v1/adapters/style").status_code == 200
        assert sorted(a["id"] for a in c.get("/v1/adapters").json()["data"]) == ["mine", "terse"]


def test_openapi_describes_the_adapter_endpoints(client):
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]["/v1/adapters/{id}"]) == {"put", "delete"}
    assert "lora" in doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]


@pytest.mark.parametrize("text,message", [
    ('lora = "x"\nlora_allowed = ["y"]', r"lora \['x'\] not in lora_allowed"),
    ("lora = 3", "lora must be an adapter id"),
    ('lora = [{id = "x", scale = "big"}]', "lora must be an adapter id"),
    ("lora_allowed = 'x'", "lora_allowed must be a list"),
    ("lora_upload = 1", "lora_upload must be true or false"),
])
def test_bad_lora_settings_in_the_tenants_file_are_named(tmp_path, text, message):
    path = tmp_path / "t.toml"
    path.write_text(f'[[tenant]]\nid = "t"\nkey_sha256 = "{hash_key("k")}"\n{text}\n')
    with pytest.raises(TenantsConfigError, match=message):
        load_tenants(path)


def test_a_default_adapter_the_server_lacks_is_a_config_error(files, tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(f'[[tenant]]\nid = "t"\nkey_sha256 = "{hash_key("k")}"\nlora = "missing"\n')
    with pytest.raises(ConfigError, match=r"tenant 't': default adapter\(s\) \['missing'\] are not loaded"):
        Service([served(files, max_adapters=2)], load_tenants(path))
    assert Tenants.open_access().by_id["local"].lora_upload
