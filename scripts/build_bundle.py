"""Zip the runtime for the browser: web/dist/realm_wasm.zip, unpacked by the worker into Pyodide.

Layout inside the zip: the repository's own, so code that finds shaders relative to its file
(realm_wasm/gpu/compose.py: `parents[2] / "shaders"`) works unchanged once the worker extracts the
zip into a folder on sys.path (/realm):
    realm_wasm/**/*.py   the runtime
    shaders/*.wgsl       the WGSL sources

Deterministic: entries are sorted and carry a fixed timestamp and mode, so the same sources give
the same bytes (and the same ETag from the server).

    python scripts/build_bundle.py [--out web/dist/realm_wasm.zip]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "web" / "dist" / "realm_wasm.zip"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def bundle_entries(root: Path) -> list[tuple[str, Path]]:
    """(name inside the zip, source file) for every runtime module and shader, sorted by name."""
    package = root / "realm_wasm"
    if not (package / "__init__.py").is_file():
        raise FileNotFoundError(f"{package} is not a Python package (no __init__.py)")
    entries = [
        (path.relative_to(root).as_posix(), path)
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    ]
    entries += [(path.relative_to(root).as_posix(), path) for path in (root / "shaders").glob("*.wgsl")]
    return sorted(entries)


def build_zip(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, path in bundle_entries(root):
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes(), compresslevel=9)
    return buf.getvalue()


def build(out: Path, root: Path = ROOT) -> tuple[int, int, str, bool]:
    """Write the bundle if its bytes changed; return (entries, size, sha256, written)."""
    data = build_zip(root)
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
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "wrote" if written else "unchanged"
    print(f"{state} {args.out}: {count} files, {size} bytes, sha256 {digest[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
