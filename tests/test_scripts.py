"""scripts/tools.py: npm packages fetched from a registry's HTTP API without npm, their digests checked."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARBALL = b"a package's bytes"
SHA512 = base64.b64encode(hashlib.sha512(TARBALL).digest()).decode()  # as npm's "integrity" writes it


@pytest.fixture(scope="module")
def tools():
    spec = importlib.util.spec_from_file_location("tools", ROOT / "scripts" / "tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def registry(tools, monkeypatch):
    """A registry on 127.0.0.1 that lists pkg@1.0.0 with SHA512 and serves `served[0]` as its tarball."""
    served = [TARBALL]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            base = f"http://127.0.0.1:{server.server_port}"
            body = {"/pkg/1.0.0": json.dumps({"dist": {"integrity": f"sha512-{SHA512}",
                                                       "tarball": f"{base}/pkg/-/pkg-1.0.0.tgz"}}).encode(),
                    "/pkg/-/pkg-1.0.0.tgz": served[0]}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tools, "NPM_REGISTRY", f"http://127.0.0.1:{server.server_port}/")
    yield served
    server.shutdown()


def test_an_npm_tarball_is_downloaded_when_its_digest_is_the_registrys(tools, registry, tmp_path):
    path = tools.npm_tarball("pkg@1.0.0", tmp_path, sha512=SHA512)
    assert path == tmp_path / "pkg-1.0.0.tgz" and path.read_bytes() == TARBALL


def test_a_tampered_tarball_or_an_unpinned_digest_is_refused(tools, registry, tmp_path):
    with pytest.raises(tools.ToolError, match="expected"):
        tools.npm_tarball("pkg@1.0.0", tmp_path, sha512=base64.b64encode(b"\0" * 64).decode())
    registry[0] = b"other bytes"
    with pytest.raises(tools.ToolError, match="the registry says"):
        tools.npm_tarball("pkg@1.0.0", tmp_path)
    with pytest.raises(tools.ToolError, match="pkg/9.9.9: HTTP Error 404"):
        tools.npm_tarball("pkg@9.9.9", tmp_path)
    assert list(tmp_path.iterdir()) == []
