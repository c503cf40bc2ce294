"""The static server: files, content types, Range, ETag, path containment, models, request log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from realm_server.app import create_app
from realm_server.static import RequestRecord, StaticSettings

MODEL = bytes(range(256)) * 40  # 10240 bytes whose every slice is recognisable


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    web = tmp_path / "web"
    pyodide = tmp_path / "vendor"
    dist = tmp_path / "dist"
    models_a = tmp_path / "models_a"
    models_b = tmp_path / "models_b"
    for d in (web, pyodide, dist, models_a, models_b):
        d.mkdir()
    (web / "index.html").write_text("<!doctype html><title>realm</title>")
    (web / "app.js").write_text("console.log('page')")
    (web / "style.css").write_text("body{}")
    (pyodide / "pyodide.mjs").write_text("export {}")
    (pyodide / "pyodide.asm.wasm").write_bytes(b"\0asm\1\0\0\0")
    (pyodide / "pyodide-lock.json").write_text("{}")
    (dist / "realm_wasm.zip").write_bytes(b"PK\5\6" + bytes(18))
    (models_a / "tiny.gguf").write_bytes(MODEL)
    (models_a / "shared.gguf").write_bytes(b"from a")
    (models_b / "shared.gguf").write_bytes(b"from b")
    (models_b / "other.gguf").write_bytes(b"GGUF b")
    (models_b / "notes.txt").write_text("not a model")
    (tmp_path / "secret.txt").write_text("outside every root")
    return {"root": tmp_path, "web": web, "pyodide": pyodide, "dist": dist, "a": models_a, "b": models_b}


@pytest.fixture
def records() -> list[RequestRecord]:
    return []


def make_client(site: dict[str, Path], records: list[RequestRecord], **overrides) -> TestClient:
    options = {"default_model": "tiny.gguf", **overrides}
    settings = StaticSettings(web_dir=site["web"], pyodide_dir=site["pyodide"], dist_dir=site["dist"],
                              model_dirs=(site["a"], site["b"]), on_request=records.append, **options)
    return TestClient(create_app(static=settings), base_url="http://127.0.0.1")  # open mode answers loopback names


@pytest.fixture
def client(site: dict[str, Path], records: list[RequestRecord]) -> TestClient:
    return make_client(site, records)


@pytest.mark.parametrize(
    ("url", "body", "content_type"),
    [
        ("/", b"<!doctype html><title>realm</title>", "text/html; charset=utf-8"),
        ("/index.html", b"<!doctype html><title>realm</title>", "text/html; charset=utf-8"),
        ("/app.js", b"console.log('page')", "text/javascript; charset=utf-8"),
        ("/style.css", b"body{}", "text/css; charset=utf-8"),
        ("/pyodide/pyodide.mjs", b"export {}", "text/javascript; charset=utf-8"),
        ("/pyodide/pyodide.asm.wasm", b"\0asm\1\0\0\0", "application/wasm"),
        ("/pyodide/pyodide-lock.json", b"{}", "application/json"),
        ("/dist/realm_wasm.zip", b"PK\5\6" + bytes(18), "application/zip"),
        ("/models/tiny.gguf", MODEL, "application/octet-stream"),
    ],
)
def test_serves_files_with_their_content_type(client: TestClient, url: str, body: bytes,
                                              content_type: str) -> None:
    r = client.get(url)
    assert r.status_code == 200
    assert r.content == body
    assert r.headers["content-type"] == content_type
    assert r.headers["content-length"] == str(len(body))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"].startswith('"')


def test_head_sends_headers_without_body(client: TestClient) -> None:
    r = client.head("/models/tiny.gguf")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(MODEL))
    assert r.content == b""


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=100-", 100, len(MODEL) - 1),
        ("bytes=-16", len(MODEL) - 16, len(MODEL) - 1),
        ("bytes=10000-99999", 10000, len(MODEL) - 1),  # an end past the file is clamped
        ("bytes=-99999", 0, len(MODEL) - 1),  # a suffix longer than the file is the whole file
        ("Bytes = 5-5", 5, 5),
    ],
)
def test_single_range_gives_206_with_the_slice(client: TestClient, header: str, start: int,
                                               end: int) -> None:
    r = client.get("/models/tiny.gguf", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == MODEL[start:end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(MODEL)}"
    assert r.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize(
    "header",
    ["bytes=10240-", "bytes=20000-20001", "bytes=9-5", "bytes=-0", "bytes=abc", "bytes=-", "bytes=1-2-3"],
)
def test_bad_range_gives_416(client: TestClient, header: str) -> None:
    r = client.get("/models/tiny.gguf", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(MODEL)}"
    assert r.content == b""


@pytest.mark.parametrize("header", ["items=0-5", "bytes=0-1,4-5"])
def test_other_units_and_multi_range_get_the_whole_file(client: TestClient, header: str) -> None:
    r = client.get("/models/tiny.gguf", headers={"Range": header})
    assert r.status_code == 200
    assert r.content == MODEL


def test_etag_revalidation(client: TestClient, site: dict[str, Path]) -> None:
    etag = client.get("/app.js").headers["etag"]
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = client.get("/app.js", headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == etag
    assert client.get("/app.js", headers={"If-None-Match": '"nope"'}).status_code == 200

    path = site["web"] / "app.js"
    path.write_text("console.log('changed')")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    r = client.get("/app.js", headers={"If-None-Match": etag})
    assert r.status_code == 200
    assert r.text == "console.log('changed')"
    assert r.headers["etag"] != etag


def test_if_range_with_a_stale_etag_sends_the_whole_file(client: TestClient) -> None:
    etag = client.head("/models/tiny.gguf").headers["etag"]
    fresh = client.get("/models/tiny.gguf", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert fresh.status_code == 206
    stale = client.get("/models/tiny.gguf", headers={"Range": "bytes=0-3", "If-Range": '"old"'})
    assert stale.status_code == 200
    assert stale.content == MODEL


@pytest.mark.parametrize(
    "url",
    [
        "/pyodide/%2e%2e/secret.txt",  # decodes to ../secret.txt
        "/pyodide/%2E%2E/secret.txt",
        "/pyodide/..%2fsecret.txt",
        "/pyodide/..%5csecret.txt",  # backslash
        "/pyodide/%252e%252e/secret.txt",  # double-encoded: a literal name that does not exist
        "/pyodide//" + "%2F".join(["", "etc", "passwd"]),  # absolute path
        "/models/..%2fsecret.txt",
        "/models/%2e%2e",
        "/dist/%2e%2e/%2e%2e/etc/passwd",
        "/%2e%2e/secret.txt",
        "/pyodide/pyodide.mjs%00.txt",
    ],
)
def test_paths_cannot_leave_their_root(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    assert b"outside every root" not in r.content
    assert b"root:" not in r.content


def test_symlinks_are_followed_only_inside_the_root(client: TestClient, site: dict[str, Path]) -> None:
    (site["pyodide"] / "escape.txt").symlink_to(site["root"] / "secret.txt")
    (site["a"] / "escape.gguf").symlink_to(site["root"] / "secret.txt")
    (site["pyodide"] / "alias.mjs").symlink_to(site["pyodide"] / "pyodide.mjs")
    assert client.get("/pyodide/escape.txt").status_code == 404
    assert client.get("/models/escape.gguf").status_code == 404
    r = client.get("/pyodide/alias.mjs")
    assert r.status_code == 200
    assert r.content == b"export {}"
    assert "escape.gguf" not in [m["name"] for m in client.get("/config.json").json()["models"]]


def test_models_come_from_the_first_directory_that_has_them(client: TestClient) -> None:
    assert client.get("/models/shared.gguf").content == b"from a"
    assert client.get("/models/other.gguf").content == b"GGUF b"
    r = client.get("/models/missing.gguf")
    assert r.status_code == 404
    assert "missing.gguf" in r.text


def test_config_json_lists_models_and_pyodide_location(client: TestClient, site: dict[str, Path],
                                                       records: list[RequestRecord]) -> None:
    (site["pyodide"] / "realm-python-packages.json").write_text('["jinja2-3.1.6-py3-none-any.whl"]')
    (site["b"] / "smollm2-135m-instruct-q4_1.gguf").write_bytes(b"GGUF chat")  # a bundled model's name
    config = client.get("/config.json").json()
    assert config == {
        "pyodideBaseUrl": "/pyodide/",
        "pythonPackages": ["jinja2-3.1.6-py3-none-any.whl"],
        "bundleUrl": "/dist/realm_wasm.zip",
        "defaultModel": "/models/tiny.gguf",
        "models": [
            {"name": "shared.gguf", "url": "/models/shared.gguf", "size": 6},
            {"name": "tiny.gguf", "url": "/models/tiny.gguf", "size": len(MODEL)},
            {"name": "other.gguf", "url": "/models/other.gguf", "size": 6},
            {"name": "smollm2-135m-instruct-q4_1.gguf", "url": "/models/smollm2-135m-instruct-q4_1.gguf", "size": 9,
             "label": "SmolLM2-135M-Instruct Q4_1", "chat": True},
        ],
    }
    # a CDN's Pyodide has jinja2 in its own lock file
    cdn = "https://cdn.example/pyodide/v0.27.7/full/"
    other = make_client(site, records, pyodide_base_url=cdn, default_model="absent.gguf").get("/config.json")
    assert other.json()["pyodideBaseUrl"] == cdn
    assert other.json()["pythonPackages"] == ["jinja2"]
    assert other.json()["defaultModel"] is None
    # the bundled chat model is the page's default when it is there
    chat = make_client(site, records, default_model="smollm2-135m-instruct-q4_1.gguf").get("/config.json")
    assert chat.json()["defaultModel"] == "/models/smollm2-135m-instruct-q4_1.gguf"


def test_request_log_counts_statuses_bytes_and_ranges(client: TestClient,
                                                      records: list[RequestRecord]) -> None:
    client.get("/models/tiny.gguf")
    client.get("/models/tiny.gguf", headers={"Range": "bytes=0-99"})
    etag = client.head("/models/tiny.gguf").headers["etag"]
    client.get("/models/tiny.gguf", headers={"If-None-Match": etag})
    client.get("/models/tiny.gguf", headers={"Range": "bytes=99999-"})
    client.get("/models/nope.gguf")
    client.post("/models/tiny.gguf")
    seen = [(r.method, r.path, r.status, r.body_bytes, r.range) for r in records]
    assert seen[:5] == [
        ("GET", "/models/tiny.gguf", 200, len(MODEL), None),
        ("GET", "/models/tiny.gguf", 206, 100, "bytes=0-99"),
        ("HEAD", "/models/tiny.gguf", 200, 0, None),
        ("GET", "/models/tiny.gguf", 304, 0, None),
        ("GET", "/models/tiny.gguf", 416, 0, "bytes=99999-"),
    ]
    assert seen[5][:3] == ("GET", "/models/nope.gguf", 404)
    assert seen[6][:3] == ("POST", "/models/tiny.gguf", 405)
