"""`realm build-site`: the static folder's layout and config.json; the bundled models' table.
(e2e/test_embed.py serves a real build with `python -m http.server` and chats with it.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from realm_server.site import MARKER, build_site
from realm_server.static import StaticSettings
from realm_wasm.errors import InvalidRequest, ModelNotFound
from realm_wasm.model_files import BUNDLED, CHAT_MODEL, cache_dir, resolve_model


@pytest.fixture
def settings(tmp_path: Path) -> StaticSettings:
    web, pyodide, dist = tmp_path / "web", tmp_path / "pyodide", tmp_path / "dist"
    for d in (web, pyodide, dist, web / "vendor"):
        d.mkdir()
    (web / "index.html").write_text("<!doctype html><title>realm</title>")
    (web / "worker.js").write_text("// worker")
    (web / "vendor" / "nested.txt").write_text("not part of the site")  # folders are not copied
    (pyodide / "pyodide.mjs").write_text("export {}")
    (pyodide / ".vendored.json").write_text("{}")  # hidden files are not copied
    (pyodide / "jinja2-3.1.6-py3-none-any.whl").write_bytes(b"PK wheel")
    (pyodide / "realm-python-packages.json").write_text('["jinja2-3.1.6-py3-none-any.whl"]')
    (dist / "realm_wasm.zip").write_bytes(b"PK zip")
    return StaticSettings(web_dir=web, pyodide_dir=pyodide, dist_dir=dist)


def model(tmp_path: Path, name: str, content: bytes = b"GGUF model") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_the_site_has_the_page_pyodide_the_bundle_the_models_and_relative_urls(tmp_path, settings):
    out = tmp_path / "site"
    chat = model(tmp_path, CHAT_MODEL, b"GGUF chat")
    config = build_site(out, [chat, model(tmp_path, "other.gguf")], settings=settings)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [MARKER, "config.json", "dist/realm_wasm.zip", "index.html", "models/other.gguf",
                     f"models/{CHAT_MODEL}", "pyodide/jinja2-3.1.6-py3-none-any.whl", "pyodide/pyodide.mjs",
                     "pyodide/realm-python-packages.json", "worker.js"]
    assert (out / "models" / CHAT_MODEL).read_bytes() == b"GGUF chat"
    assert json.loads((out / "config.json").read_text()) == config == {
        "pyodideBaseUrl": "pyodide/",
        "pythonPackages": ["jinja2-3.1.6-py3-none-any.whl"],
        "bundleUrl": "dist/realm_wasm.zip",
        "defaultModel": f"models/{CHAT_MODEL}",  # the first model given
        "models": [
            {"name": CHAT_MODEL, "url": f"models/{CHAT_MODEL}", "size": 9, "label": "SmolLM2-135M-Instruct Q4_1",
             "chat": True},
            {"name": "other.gguf", "url": "models/other.gguf", "size": 10},
        ],
    }


def test_a_split_model_is_copied_shard_by_shard_and_listed_once(tmp_path, settings):
    shards = [model(tmp_path, f"big-0000{i}-of-00003.gguf", b"GGUF" + bytes(i)) for i in (1, 2, 3)]
    config = build_site(tmp_path / "site", shards[:1], settings=settings)
    assert sorted(p.name for p in (tmp_path / "site" / "models").iterdir()) == [p.name for p in shards]
    assert config["models"] == [{"name": shards[0].name, "url": f"models/{shards[0].name}", "size": 18, "files": 3}]
    shards[2].unlink()
    with pytest.raises(InvalidRequest, match="big-00003-of-00003.gguf is missing"):
        build_site(tmp_path / "site", shards[:1], settings=settings)


def test_a_cdn_pyodide_and_no_models(tmp_path, settings):
    out = tmp_path / "site"
    config = build_site(out, [], pyodide_base_url="https://cdn.example/pyodide/v0.27.7/full/", settings=settings)
    assert not (out / "pyodide").exists() and not (out / "models").exists()
    assert config["pythonPackages"] == ["jinja2"]  # a full Pyodide distribution has its own build
    assert (config["defaultModel"], config["models"]) == (None, [])


def test_a_rebuild_replaces_its_folder_but_another_folder_is_refused(tmp_path, settings):
    out = tmp_path / "site"
    build_site(out, [model(tmp_path, "a.gguf")], settings=settings)
    build_site(out, [], settings=settings)
    assert not (out / "models").exists()  # nothing of the first build is left

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(InvalidRequest, match="not empty and was not written by `realm build-site`"):
        build_site(foreign, [], settings=settings)
    assert (foreign / "thesis.tex").read_text() == "precious"

    with pytest.raises(InvalidRequest, match="two models with one file name"):
        build_site(tmp_path / "dup", [model(tmp_path, "a.gguf"), model(tmp_path / "mine", "a.gguf")],
                   settings=settings)


def test_build_site_with_a_missing_model_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "realm_server", "build-site", str(tmp_path / "site"),
                        "--model", str(tmp_path / "nope.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "model file not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "site").exists()


def test_bundled_models_resolve_by_name(tmp_path):
    assert set(BUNDLED) == {"gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"}
    assert [m.chat for m in BUNDLED.values()] == [False, True]
    assert resolve_model("smollm2-135m-instruct-q4_1") == cache_dir() / CHAT_MODEL
    with pytest.raises(ModelNotFound, match="or name a bundled model: gemma-3-270m-q4_k_m, smollm2"):
        resolve_model(tmp_path / "missing.gguf")
