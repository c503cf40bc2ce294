"""Zip the runtime for the browser: web/dist/realm_wasm.zip, unpacked by the worker into Pyodide.

Layout inside the zip: the repository's own, so code that finds shaders relative to its file
(realm_wasm/gpu/compose.py: `parents[2] / "shaders"`) works unchanged once the worker extracts the
zip into a folder on sys.path (/realm):
    realm_wasm/**/*.py   the runtime
    shaders/*.wgsl       the WGSL sources
    kernels/*.wasm       the WebAssembly kernels, built from web/kernels/*.wat (realm_wasm/wasm_kernels.py)

A kernel is assembled and validated by wabt's wat2wasm (npm `wabt`, pinned, its tarball fetched
from the npm registry by scripts/tools.py with its sha512 checked, kept in ~/.cache/realm/tools,
never in the repository), which needs Node (not npm). Built kernels are kept beside the bundle, named by the
hash of their source (web/dist/kernels/matvec-<hash>.wasm): an unchanged .wat needs neither Node
nor wabt again, so a machine given web/dist (the GPU machine's kit, offline) rebuilds the
bundle as before.

Deterministic: entries are sorted and carry a fixed timestamp and mode, so the same sources give
the same bytes (and the same ETag from the server).

    python scripts/build_bundle.py [--out web/dist/realm_wasm.zip]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/, also when imported by file (the tests)
from tools import ToolError, npm_tarball, run, tools_dir  # noqa: E402 - after the path above

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "web" / "dist" / "realm_wasm.zip"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold

# wabt's wat2wasm, from npm, and the registry's sha512 ("integrity") of its tarball
WABT = "wabt@1.0.39"
WABT_SHA512 = "ba+dRL/75VQQY7RkU/CgriGbkoWAfS8TDyUlJfJhJ8KhtXgMl5dhNvoPNUcQ9IWRhW8u41glMSuZeTvsYq2rRg=="


class BuildError(ToolError):
    """A tool the bundle needs is missing or failed, or a download is not what was pinned."""


def wat2wasm() -> Path:
    """wabt's wat2wasm (one self-contained Node script), unpacked into the tools cache on first use."""
    name, version = WABT.split("@")
    home = tools_dir() / f"{name}-{version}"
    tool = home / "package" / "bin" / "wat2wasm"
    if tool.is_file():
        return tool
    with tempfile.TemporaryDirectory(prefix="realm-tools-") as tmp:
        tgz = npm_tarball(WABT, Path(tmp), sha512=WABT_SHA512)
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tgz) as tar:  # only the tool
            tar.extractall(unpacked, members=[tar.getmember("package/bin/wat2wasm")], filter="data")
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.move(unpacked, home)
    return tool


def assemble(wat: Path, built: Path = DEFAULT_OUT.parent / "kernels") -> bytes:
    """The binary of a WAT kernel, from the folder `built` when this source was built before
    (where it keeps only the latest build of each kernel)."""
    key = hashlib.sha256(wat.read_bytes() + WABT.encode()).hexdigest()[:20]
    cached = built / f"{wat.stem}-{key}.wasm"
    if not cached.is_file():
        if shutil.which("node") is None:
            raise BuildError(f"node is not installed: it runs wabt's wat2wasm, which builds {wat.name}")
        built.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".part")
        run(["node", str(wat2wasm()), str(wat), "-o", str(partial)])
        for old in built.glob(f"{wat.stem}-*.wasm"):
            old.unlink()
        partial.replace(cached)
    return cached.read_bytes()


def bundle_entries(root: Path) -> list[tuple[str, Path]]:
    """(name inside the zip, source file) for every runtime module, shader and kernel, sorted by name."""
    package = root / "realm_wasm"
    if not (package / "__init__.py").is_file():
        raise FileNotFoundError(f"{package} is not a Python package (no __init__.py)")
    entries = [
        (path.relative_to(root).as_posix(), path)
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    entries += [(path.relative_to(root).as_posix(), path) for path in (root / "shaders").glob("*.wgsl")]
    entries += [(f"kernels/{path.stem}.wasm", path) for path in (root / "web" / "kernels").glob("*.wat")]
    return sorted(entries)


def build_zip(root: Path, built_kernels: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, path in bundle_entries(root):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            data = assemble(path, built_kernels) if path.suffix == ".wat" else path.read_bytes()
            zf.writestr(info, data, compresslevel=9)
    return buf.getvalue()


def build(out: Path, root: Path = ROOT) -> tuple[int, int, str, bool]:
    """Write the bundle if its bytes changed; return (entries, size, sha256, written)."""
    data = build_zip(root, out.parent / "kernels")
    written = not out.is_file() or out.read_bytes() != data
    if written:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return len(bundle_entries(root)), len(data), hashlib.sha256(data).hexdigest(), written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="zip to write")
    args = parser.parse_args()
    try:
        count, size, digest, written = build(args.out)
    except (FileNotFoundError, ToolError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "wrote" if written else "unchanged"
    print(f"{state} {args.out}: {count} files, {size} bytes, sha256 {digest[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
