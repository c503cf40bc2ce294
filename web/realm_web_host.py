"""Python side of the browser worker (web/worker.js): model download sink and generation driver.

worker.js writes this file into Pyodide next to the unpacked realm_wasm bundle, imports it and
talks to the single `HOST` object. Everything here runs inside Pyodide.

Model sink interface (what worker.js drives while a model file streams in):
    sink = HOST.open_model(url)
    sink.begin(total_size)   # int, or None when the server sent no Content-Length
    sink.feed(chunk)         # once per network/cache chunk, in order; `chunk` is the JS Uint8Array
                             # itself (a JsProxy, valid only during the call): a GPU loader can hand
                             # it to queue.writeBuffer without copying it into the wasm heap. May
                             # return an awaitable; the worker awaits it before the next chunk
                             # (that is the back-pressure).
    sink.end()               # -> LoadedModel, after the last chunk
    sink.abort()             # instead of end() when the download failed or was stopped
Any exception from these methods ends the download; GGUFError means a bad model file.

The sink here only parses the GGUF header (it keeps the prefix the header needs and counts the
rest); the real engine plugs in by returning its own sink from `open_model`, whose `end()` gives a
`LoadedModel` with an engine whose `generate(prompt, max_tokens=, sampling=)` yields events with
`token_id` and `text`, like `realm_wasm.engine.Engine.generate`.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import realm_wasm
from realm_wasm.gguf import GGUFError, GGUFHeader, GGUFNeedMoreData, parse_header
from realm_wasm.sampling import SamplingParams


class EngineMissing(RuntimeError):
    """The loaded model cannot generate: this build of the page only reads model headers."""


class NoModel(RuntimeError):
    """Generation was asked for before any model finished loading."""


class TextEngine(Protocol):
    def generate(self, prompt: str, max_tokens: int, sampling: SamplingParams) -> Iterator[Any]: ...


@dataclass(frozen=True)
class LoadedModel:
    header: GGUFHeader
    size: int  # bytes received
    engine: TextEngine | None  # None: header only, no generation

    def describe(self) -> dict[str, Any]:
        meta = self.header.metadata
        return {
            "architecture": self.header.architecture,
            "name": meta.get("general.name"),
            "tensorCount": len(self.header.tensors),
            "metadataCount": len(meta),
            "ggufVersion": self.header.version,
            "tensorTypes": dict(Counter(t.type_name for t in self.header.tensors.values())),
            "bytes": self.size,
            "canGenerate": self.engine is not None,
        }


class HeaderSink:
    """Keeps only the prefix the GGUF header needs, parses it, and checks the file's length."""

    def __init__(self) -> None:
        self.prefix = bytearray()
        self.needed = 0  # parse again once the prefix is at least this long
        self.total: int | None = None
        self.received = 0
        self.header: GGUFHeader | None = None

    def begin(self, total_size: int | None) -> None:
        self.total = total_size

    def feed(self, chunk: Any) -> None:
        self.received += chunk.length
        if self.header is not None:
            return  # tensor data: this sink has nowhere to put it
        self.prefix += chunk.to_bytes()
        if len(self.prefix) >= self.needed:
            self._try_parse()

    def _try_parse(self) -> None:
        try:
            self.header = parse_header(self.prefix, file_size=self.total)
        except GGUFNeedMoreData as e:
            self.needed = e.needed
            return
        self.prefix = bytearray()  # the header is parsed: free the copy

    def end(self) -> LoadedModel:
        if self.header is None:
            raise GGUFError(f"the file ended after {self.received} bytes, before its GGUF header did "
                            f"(at least {self.needed} bytes needed): truncated or not a model")
        if self.total is not None and self.received != self.total:
            raise GGUFError(f"download ended after {self.received} of {self.total} bytes")
        if self.received < self.header.data_size:
            raise GGUFError(f"truncated GGUF: tensor data runs to byte {self.header.data_size} "
                            f"but the file has {self.received} bytes")
        return LoadedModel(self.header, self.received, engine=None)

    def abort(self) -> None:
        self.prefix = bytearray()


class WorkerHost:
    """The one object worker.js talks to: versions, model loading, generation."""

    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None

    def versions(self) -> dict[str, str]:
        return {"realm": realm_wasm.__version__, "python": sys.version.split()[0],
                "numpy": np.__version__}

    def open_model(self, url: str) -> HeaderSink:
        self.loaded = None  # the previous model goes away whether or not this one loads
        return HeaderSink()

    def model_ready(self, loaded: LoadedModel) -> dict[str, Any]:
        self.loaded = loaded
        return loaded.describe()

    def generate(self, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                 seed: int) -> Iterator[dict[str, Any]]:
        """Token events for worker.js: {"tokenId": int | None, "text": str}."""
        if self.loaded is None:
            raise NoModel("load a model before generating")
        if self.loaded.engine is None:
            raise EngineMissing("this page build reads the model header only; text generation is "
                                "not connected to the browser runtime yet")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        for event in self.loaded.engine.generate(prompt, max_tokens=max_tokens, sampling=sampling):
            yield {"tokenId": event.token_id, "text": event.text}


HOST = WorkerHost()
