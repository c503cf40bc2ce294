"""Python side of the browser worker (web/worker.js): model download sinks and generation.

worker.js writes this file into Pyodide next to the unpacked realm_wasm bundle, imports it and
talks to the single `HOST` object. Everything here runs inside Pyodide.

Model sink interface (what worker.js drives while a model file streams in):
    sink = await HOST.open_model(url, backend)   # backend "auto" | "webgpu" | "numpy"
    sink.begin(total_size)   # int, or None when the server sent no Content-Length
    sink.feed(chunk)         # once per network/cache chunk, in order; `chunk` is the JS Uint8Array
                             # itself (a JsProxy, valid only during the call)
    await sink.end()         # -> LoadedModel, after the last chunk
    sink.abort()             # instead of end() when the download failed or was stopped
Any exception from these methods ends the download; GGUFError means a bad model file.

Where the weights go depends on the executor. WebGPU: the header is parsed from the first bytes,
then every chunk is copied once, transiently, out of JS and written into device buffers
(`StreamedWeights`): the model never sits in the wasm heap. numpy: the file's bytes are kept in the
heap (that executor computes from them).

Generation (`HOST.generate`) is an async generator: worker.js awaits each event, which lets the
WebGPU device block on its read-backs through JSPI (see realm_wasm/gpu/browser.py).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import realm_wasm
from realm_wasm.cpu import CpuExecutor
from realm_wasm.engine import PREFILL_CHUNK, Engine, Executor, Model
from realm_wasm.gguf import GGUFError, GGUFHeader, GGUFNeedMoreData, parse_header
from realm_wasm.gpu.device import DeviceLost, GPUUnavailable
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.gpu.weights import StreamedWeights
from realm_wasm.sampling import SamplingParams

N_CTX = 2048  # context of the page's engine (the KV cache is sized for it at load)
EAGER_LIMIT = 64 << 20  # numpy: weights above this many f32 bytes stay quantized (the 671 MB embedding)


class NoModel(RuntimeError):
    """Generation was asked for before any model finished loading."""


@dataclass(frozen=True)
class Backend:
    """Which executor runs the model, on what, and why."""

    executor: str  # "webgpu" | "numpy"
    note: str  # what the page says about the choice
    device: Any = None  # the BrowserDevice when executor == "webgpu"


@dataclass(frozen=True)
class LoadedModel:
    header: GGUFHeader
    size: int  # bytes received
    engine: Engine
    backend: Backend

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
            "backend": self.backend.executor,
            "backendNote": self.backend.note,
            "nCtx": self.engine.n_ctx,
        }

    def close(self) -> None:
        if self.backend.device is not None:
            self.backend.device.close()


async def choose_backend(asked: str) -> Backend:
    """`asked`: "webgpu" or "numpy" force one; "auto" takes WebGPU unless the adapter is a CPU
    fallback (SwiftShader), where the numpy executor decodes faster (bench/bench_browser.py)."""
    if asked == "numpy":
        return Backend("numpy", "numpy executor on the CPU (asked for)")
    if asked not in ("auto", "webgpu"):
        raise ValueError(f"unknown backend {asked!r} (auto, webgpu or numpy)")
    from realm_wasm.gpu.browser import BrowserDevice  # imports `js`: Pyodide only

    try:
        device = await BrowserDevice.create()
    except GPUUnavailable as e:
        if asked == "webgpu":
            raise
        return Backend("numpy", f"no WebGPU ({e}): numpy executor on the CPU")
    if asked == "auto" and device.is_fallback_adapter:
        device.close()
        return Backend("numpy", f"WebGPU adapter is a CPU fallback ({device.name}): using the numpy executor")
    return Backend("webgpu", f"WebGPU on {device.name}", device)


class WeightKeeper(Protocol):
    """Where a sink puts the file's bytes, and the executor it builds from them."""

    def begin(self, total: int | None) -> None:
        """The file's size, when the response said it."""

    def take(self, chunk: Any, start: int, end: int) -> None:
        """Bytes [start, end) of the file: `chunk`, a JS Uint8Array."""

    def prefix(self) -> memoryview:
        """The bytes taken so far, at least while the header is not parsed."""

    def header_parsed(self, header: GGUFHeader) -> None: ...

    async def executor(self, model: Model, n_ctx: int) -> Executor: ...

    def release(self) -> None:
        """Free what was kept (a failed or stopped load)."""


class DeviceWeights:
    """WebGPU: tensor bytes go into device buffers as they arrive; only the header's prefix stays."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.head = bytearray()
        self.store: StreamedWeights | None = None

    def begin(self, total: int | None) -> None:
        pass  # device buffers are sized from the header

    def take(self, chunk: Any, start: int, end: int) -> None:
        data = chunk.to_bytes()  # the one copy out of JS, freed once written to the device
        if self.store is None:
            self.head += data
        else:
            self.store.feed(start, data)

    def prefix(self) -> memoryview:
        return memoryview(self.head)

    def header_parsed(self, header: GGUFHeader) -> None:
        self.store = StreamedWeights(self.device, header)
        self.store.feed(0, self.head)
        self.head = bytearray()

    async def executor(self, model: Model, n_ctx: int) -> Executor:
        # the page decodes one sequence: 8 logit rows (8 MiB for a 262k vocab) rather than 256 MiB
        executor = GpuExecutor(model.plan, self.store, n_ctx=n_ctx, device=self.device, max_tokens=PREFILL_CHUNK,
                               max_logit_rows=8)
        await self.device.settle()  # out-of-memory and validation errors of the load surface here
        return executor

    def release(self) -> None:
        self.store, self.head = None, bytearray()
        self.device.close()


class HeapWeights:
    """numpy: the whole file stays in the wasm heap, where the executor reads its weights."""

    def __init__(self) -> None:
        self.data = bytearray()

    def begin(self, total: int | None) -> None:
        self.data = bytearray(total or 0)  # allocated once when the size is known

    def take(self, chunk: Any, start: int, end: int) -> None:
        if end > len(self.data):  # no (or a wrong) Content-Length: grow
            self.data += bytes(end - len(self.data))
        chunk.assign_to(memoryview(self.data)[start:end])

    def prefix(self) -> memoryview:
        return memoryview(self.data)

    def header_parsed(self, header: GGUFHeader) -> None:
        pass  # the bytes stay where they are

    async def executor(self, model: Model, n_ctx: int) -> Executor:
        data = np.frombuffer(self.data, np.uint8)
        return CpuExecutor(model.plan, lambda t: data[t.offset:t.offset + t.nbytes], n_ctx=n_ctx,
                           eager_limit=EAGER_LIMIT)

    def release(self) -> None:
        self.data = bytearray()


class ModelSink:
    """Parses the GGUF header from the first bytes and checks the file's length; the keeper keeps
    the bytes and builds the executor."""

    def __init__(self, backend: Backend, keeper: WeightKeeper) -> None:
        self.backend, self.keeper = backend, keeper
        self.total: int | None = None
        self.received = 0
        self.needed = 0  # parse again once this many bytes have arrived
        self.header: GGUFHeader | None = None

    def begin(self, total_size: int | None) -> None:
        self.total = total_size
        self.keeper.begin(total_size)

    def feed(self, chunk: Any) -> None:
        start, self.received = self.received, self.received + chunk.length
        self.keeper.take(chunk, start, self.received)
        if self.header is None and self.received >= self.needed:
            try:
                self.header = parse_header(self.keeper.prefix()[:self.received], file_size=self.total)
            except GGUFNeedMoreData as e:
                self.needed = e.needed
                return
            self.keeper.header_parsed(self.header)

    async def end(self) -> LoadedModel:
        if self.header is None:
            raise GGUFError(f"the file ended after {self.received} bytes, before its GGUF header did "
                            f"(at least {self.needed} bytes needed): truncated or not a model")
        if self.total is not None and self.received != self.total:
            raise GGUFError(f"download ended after {self.received} of {self.total} bytes")
        if self.received < self.header.data_size:
            raise GGUFError(f"truncated GGUF: tensor data runs to byte {self.header.data_size} "
                            f"but the file has {self.received} bytes")
        model = Model.from_header(self.header)
        n_ctx = min(N_CTX, model.plan.n_ctx_train)
        engine = Engine(model, await self.keeper.executor(model, n_ctx), n_ctx)
        return LoadedModel(self.header, self.received, engine, self.backend)

    def abort(self) -> None:
        self.keeper.release()


class WorkerHost:
    """The one object worker.js talks to: versions, model loading, generation."""

    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None

    def versions(self) -> dict[str, str]:
        return {"realm": realm_wasm.__version__, "python": sys.version.split()[0],
                "numpy": np.__version__}

    def unload(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    async def open_model(self, url: str, backend: str = "auto") -> ModelSink:
        self.unload()  # the previous model goes away whether or not this one loads
        chosen = await choose_backend(backend)
        keeper = DeviceWeights(chosen.device) if chosen.device is not None else HeapWeights()
        return ModelSink(chosen, keeper)

    def model_ready(self, loaded: LoadedModel) -> dict[str, Any]:
        self.loaded = loaded
        return loaded.describe()

    async def generate(self, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
                       seed: int) -> AsyncIterator[dict[str, Any]]:
        """Token events for worker.js: {"tokenId": int | None, "text": str}."""
        if self.loaded is None:
            raise NoModel("load a model before generating")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        try:
            for event in self.loaded.engine.generate(prompt, max_tokens=max_tokens, sampling=sampling):
                yield {"tokenId": event.token_id, "text": event.text}
        except DeviceLost:
            self.unload()  # its buffers went with the device: the model has to be loaded again
            raise


HOST = WorkerHost()
