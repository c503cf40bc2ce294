"""What the asset scripts share: running a tool, the tools cache, and npm packages fetched without npm.

An npm package is a tarball the registry describes at `<registry>/<name>/<version>` (JSON:
`dist.tarball`, its URL, and `dist.integrity`, "sha512-<base64>"): plain HTTPS, so Python fetches
it and checks the digest itself, and a machine needs neither npm nor Node to vendor Pyodide.
The registry is npm's own, or the one `npm_config_registry` names (as npm reads it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's realm_wasm, installed or not

from realm_wasm.model_files import cache_dir  # noqa: E402 - after the path above

NPM_REGISTRY = os.environ.get("npm_config_registry") or "https://registry.npmjs.org/"
TIMEOUT_S = 60


class ToolError(RuntimeError):
    """A tool is missing or failed, or a download is not what was pinned."""


def tools_dir() -> Path:
    """Tools the scripts keep between runs (wabt), beside the models' cache."""
    return cache_dir().parent / "tools"


def run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ToolError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})") from None
    if done.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        raise ToolError(f"could not download {url}: {e}") from None


def npm_tarball(spec: str, dest: Path, sha512: str | None = None) -> Path:
    """Download npm package `spec` ("name@version") into `dest` as name-version.tgz, checked against
    the registry's integrity digest and, when given, the pinned `sha512` (base64, as npm writes it)."""
    name, version = spec.rsplit("@", 1)
    try:
        dist = json.loads(_get(f"{NPM_REGISTRY.rstrip('/')}/{name}/{version}"))["dist"]
        listed = dist["integrity"].removeprefix("sha512-")
        url = dist["tarball"]
    except (ValueError, KeyError, TypeError):
        raise ToolError(f"the npm registry {NPM_REGISTRY} has no usable entry for {spec}") from None
    if sha512 is not None and listed != sha512:
        raise ToolError(f"the registry lists {spec} with sha512 {listed}, expected {sha512}: refusing it")
    data = _get(url)
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != listed:
        raise ToolError(f"{url} has sha512 {digest}, the registry says {listed}: refusing it")
    path = dest / f"{name.rsplit('/', 1)[-1]}-{version}.tgz"
    path.write_bytes(data)
    return path
