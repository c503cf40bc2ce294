"""`realm build-site OUT/`: the page as a folder that any static file host serves, no Python server.

    OUT/index.html app.js style.css     the chat page
    OUT/worker.js realm_web_host.py     the Web Worker and its Python side
    OUT/realm-engine.mjs realm-chat.mjs markdown.mjs   the engine API and the <realm-chat> element
    OUT/example.html embed.html         sample pages using them
    OUT/pyodide/                        Pyodide 0.27.7, numpy, jinja2, markupsafe (scripts/vendor_pyodide.py)
    OUT/dist/realm_wasm.zip             the runtime bundle (scripts/build_bundle.py)
    OUT/models/<name>.gguf              the models asked for, if any (a split model's every shard)
    OUT/config.json                     what the page reads at start, with relative URLs only, so the
                                        folder works under any path (https://host/some/prefix/)

The folder is written afresh each time; a folder that is not empty and was not written by this
command is refused rather than overwritten.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from realm_wasm.errors import InvalidRequest
from realm_wasm.gguf import model_files

from .static import StaticSettings, page_config, python_packages

MARKER = ".realm-site"  # says a folder was written by build-site (so a rebuild may replace it)


def _copy_files(source: Path, target: Path) -> list[str]:
    """Copy the regular, non-hidden files directly inside `source`; return their names."""
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, target / path.name)
            names.append(path.name)
    return names


def prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidRequest(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise InvalidRequest(f"{out} is not empty and was not written by `realm build-site`: choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `realm build-site`; the next build replaces this folder\n")


def build_site(out: Path, models: Sequence[Path], pyodide_base_url: str | None = None,
               settings: StaticSettings | None = None) -> dict:
    """Write the site into `out`; returns its config.json. `models` are GGUF files to include (the
    first is the page's default); with `pyodide_base_url` (a CDN) Pyodide is not copied."""
    settings = settings or StaticSettings()
    for path in (settings.web_dir / "index.html", settings.dist_dir / "realm_wasm.zip"):
        if not path.is_file():
            raise InvalidRequest(f"{path} is missing (run scripts/build_bundle.py; build-site runs from a checkout)")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"two models with one file name: {', '.join(names)}")
    prepare_out(out)
    _copy_files(settings.web_dir, out)
    if pyodide_base_url is None:
        if not (settings.pyodide_dir / "pyodide.mjs").is_file():
            raise InvalidRequest(f"{settings.pyodide_dir} has no Pyodide (run scripts/vendor_pyodide.py)")
        _copy_files(settings.pyodide_dir, out / "pyodide")
    (out / "dist").mkdir()
    shutil.copyfile(settings.dist_dir / "realm_wasm.zip", out / "dist" / "realm_wasm.zip")
    copied: dict[str, Path] = {}
    for model in models:
        (out / "models").mkdir(exist_ok=True)
        for file in model_files(model):  # a split model's every shard
            if not file.is_file():
                raise InvalidRequest(f"{file} is missing (a shard of the split model {model.name})")
            shutil.copyfile(file, out / "models" / file.name)
        copied[model.name] = out / "models" / model.name
    config = page_config(pyodide_base_url=pyodide_base_url or "pyodide/",
                         python_packages=python_packages(settings.pyodide_dir, pyodide_base_url),
                         bundle_url="dist/realm_wasm.zip", models=copied, models_url="models/",
                         default_model=names[0] if names else "")
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return config

