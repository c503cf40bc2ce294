"""Realm's errors: one base class whose `code` every host maps the same way.

A `RealmError` is something a user can act on (a bad file, a bad request, a GPU that is missing or
gone); its message names the problem. Hosts map by `code`, not by class or message: the CLI prints
one line, the API picks an HTTP status (`realm_server/errors.py`), the page's worker shows a
titled banner (`web/app.js`). Anything else that escapes is a bug and keeps its traceback.

The classes live next to what raises them (`gguf.GGUFError`, `gpu.device.DeviceLost`, ...); the
ones shared by several layers are here. Each also subclasses the built-in exception it refines
(ValueError, RuntimeError, MemoryError), so callers that catch those keep working.
"""

from __future__ import annotations


class RealmError(Exception):
    """Base of every error a user can act on; `code` is stable across releases and hosts."""

    code = "runtime"


class InvalidRequest(RealmError, ValueError):
    """Arguments that cannot work: an empty prompt, max_tokens < 1, a top_p outside (0, 1], ..."""

    code = "bad-request"


class ContextOverflow(InvalidRequest):
    """The prompt plus the requested tokens do not fit the context."""

    code = "context-overflow"


class BadModel(RealmError, ValueError):
    """A model file that cannot be used: malformed, truncated, or with metadata Realm cannot run."""

    code = "bad-model"


class ModelNotFound(RealmError, FileNotFoundError):
    """No model file at the path, URL or name given."""

    code = "no-model"


# code -> one-line title, for hosts that show errors to a person (the page, the CLI's usage text)
TITLES: dict[str, str] = {
    "runtime": "Runtime error.",
    "bad-request": "Invalid request.",
    "context-overflow": "The prompt does not fit the context.",
    "bad-model": "This is not a usable model file.",
    "no-model": "No model is loaded.",
    "bad-adapter": "This LoRA adapter does not fit the model.",
    "no-adapter": "No such LoRA adapter is loaded.",
    "adapter-conflict": "The LoRA adapter cannot be loaded now.",
    "no-webgpu": "WebGPU is not available.",
    "unsupported-on-gpu": "This model cannot run on the GPU.",
    "gpu": "WebGPU reported an error.",
    "out-of-memory": "Out of memory.",
    "device-lost": "The GPU device was lost.",
}


def error_code(error: BaseException) -> str:
    """The code of a RealmError; "internal" for anything else (a bug)."""
    return error.code if isinstance(error, RealmError) else "internal"
