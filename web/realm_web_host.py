"""Python side of the browser worker (web/worker.js): model download sinks and generation.

worker.js writes this file into Pyodide next to the unpacked realm_wasm bundle, imports it and
talks to the single `HOST` object. Everything here runs inside Pyodide.

Model sink interface (what worker.js drives while a model file streams in):
    sink = await HOST.open_model(url, backend)   # backend "auto" | "webgpu" | "numpy"
    for each file (the model's one, or a split model's shards in order):
        sink.begin(total_size)   # int, or None when the server sent no Content-Length
        sink.feed(chunk)         # once per network/cache chunk, in order; `chunk` is the JS Uint8Array
                                 # itself (a JsProxy, valid only during the call)
        sink.more_files()        # None until the first file's header is read, then the URLs of
                                 # the files after it ([] for one file)
        sink.file_done()         # after the file's last chunk: raises if it is not whole
    await sink.end()         # -> LoadedModel, after the last file
    sink.abort()             # instead of end() when the download failed or was stopped
Any exception from these methods ends the download; its class name maps to a RealmError code
through `HOST.error_codes()` (worker.js labels errors with it).

The header is parsed from the first bytes, the model (tokenizer, plan) built from it, and the
executor chosen (`realm_wasm.backends.choose`, as the CLI and the server choose), so a bad or
GPU-unsupported model is known before the download goes on. A split model (llama.cpp's gguf-split
shards, NAME-00001-of-0000N.gguf, each a GGUF file of its own) loads from its first shard's URL:
that header names the other shards (beside it) and holds the metadata, each shard's header adds
its tensors, and the plan is built once the last one's is in. WebGPU: every later chunk is copied
once, transiently, out of JS and written into device buffers (`StreamedWeights`): the model never
sits in the wasm heap. numpy: the files' bytes are kept in the heap, and that executor computes
from them: its WebAssembly SIMD kernel (realm_wasm/wasm_kernels.py) multiplies the quantized
weights where they lie, so the heap holds about the file plus activations.

LoRA adapters (realm_wasm/lora.py, llama.cpp's GGUF adapter format) stream in through the same
sink interface (`HOST.open_adapter(name)`): the header is checked against the loaded model from the
first bytes (a model file, or another architecture's adapter, fails before the rest downloads),
and `end()` loads the adapter into the engine under its name. A generation names the ones it
applies (`lora`: [{"id", "scale"}], the server's request field). A new model has none.

Generation (`HOST.start_generation`) returns a `Generation` whose `step()` worker.js calls once per
event with `callPromising`, which lets the WebGPU device block on its read-backs through JSPI (see
realm_wasm/gpu/browser.py) inside a plain call: an async generator here would cost tasks of
Pyodide's event loop every token. It takes a prompt (completion) or chat messages, which are
rendered with the model's own chat template (realm_wasm/chat_template.py, the server's renderer) and
tokenized here. A chat's next turn is its whole conversation again, rendered and tokenized anew: the
scheduler finds that its ids begin with the previous turn's prompt and answer, whose keys and values
the KV slot still holds, and feeds only the rest (`cachedTokens` in the "finished" event says how
many were reused). Correctness never depends on that match: where re-encoding an answer gives other
ids than the model generated (BPE may spell a text several ways), the reuse ends there and the model
reads the canonical ids.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

import realm_wasm
from realm_wasm.backends import Choice, check_backend, check_gpu_support, choose
from realm_wasm.chat_template import PLAIN_ROLES, ChatTemplate
from realm_wasm.cpu import CpuExecutor
from realm_wasm.engine import PREFILL_CHUNK, Engine, Executor, Model
from realm_wasm.errors import TITLES, InvalidRequest, RealmError
from realm_wasm.gguf import (
    GGUFError,
    GGUFHeader,
    GGUFNeedMoreData,
    TensorInfo,
    add_shard,
    joined_header,
    parse_header,
    shard_names,
    shard_slice,
    split_count,
)
from realm_wasm.gpu.device import DeviceLost, GPUUnavailable
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.gpu.weights import StreamedWeights
from realm_wasm.grammar import GrammarCache
from realm_wasm.lora import Adapter, AdapterConflict, BadAdapter, adaptable_weights, check_header
from realm_wasm.models import build_plan, check_architecture
from realm_wasm.plan import Plan
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import Finished, TokenEvent
from realm_wasm.speculative import Speculation
from realm_wasm.tokenizer import Tokenizer
from realm_wasm.wasm_kernels import WasmMatmul

N_CTX = 2048  # context of the page's engine (the KV cache is sized for it at load)
# numpy: weights of a type the kernel lacks stay quantized above this many f32 bytes (the default
# model's 671 MB f32 embedding would not fit), and are dequantized a chunk of rows at a time
EAGER_LIMIT = 64 << 20
CPU_KERNEL = True  # numpy: multiply with the SIMD kernel (bench/bench_browser.py turns it off to compare)
# LoRA adapter slots of the page's engine. numpy holds an adapter in the heap at its own size, of any
# rank. The GPU preallocates every slot, at the largest rank, for every adapted weight of every model
# loaded, adapters or not (and slots cost ~5% of decode speed: docs/benchmarks.md, LoRA): its rank is
# the highest of LORA_RANKS whose pools fit LORA_GPU_BYTES: 32 for the default model (121 MB), 16 for
# SmolLM2-135M (78 MB), 8 for a 7B (320 MB, a tenth of its weights) rather than 1.3 GB at rank 32.
MAX_ADAPTERS = 4
LORA_GPU_BYTES = 128 << 20
LORA_RANKS = (64, 32, 16, 8)  # the last whatever the model


def max_lora_rank(plan: Plan) -> int:
    """The GPU's adapter rank for this model (see LORA_GPU_BYTES): A [rank, n_in] and B [n_out,
    rank] of float32 per slot for each adapted weight."""
    per_rank = 4 * MAX_ADAPTERS * sum(sum(plan.weights[name].dims) for name in adaptable_weights(plan))
    return next((rank for rank in LORA_RANKS if rank * per_rank <= LORA_GPU_BYTES), LORA_RANKS[-1])


class NoModel(RealmError, RuntimeError):
    """Generation was asked for before any model finished loading."""

    code = "no-model"


def error_codes() -> dict[str, str]:
    """Exception class name -> RealmError code, for worker.js to label what Python raises (a
    PythonError reaches JS with its class name only). MemoryError: the wasm heap ran out."""
    codes, todo = {"MemoryError": "out-of-memory"}, [RealmError]
    while todo:
        cls = todo.pop()
        codes[cls.__name__] = cls.code
        todo += cls.__subclasses__()
    return codes


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages from the page: [{"role", "content"}] with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in PLAIN_ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(PLAIN_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content must be a string")
        checked.append({"role": m["role"], "content": m["content"]})
    return checked


def check_speculation(speculation: Any) -> Speculation | None:
    """The page's speculation option, {"method", "max_draft"?, "ngram"?} as the server takes it, or None."""
    if speculation is None:
        return None
    if not isinstance(speculation, dict) or "method" not in speculation:
        raise InvalidRequest('speculation must be {"method": "lookup", "max_draft": k, "ngram": n} or null')
    unknown = set(speculation) - {"method", "max_draft", "ngram"}
    if unknown:
        raise InvalidRequest(f"speculation has unknown field(s) {', '.join(sorted(unknown))}")
    return Speculation(**speculation)


def check_lora(lora: Any) -> list[tuple[str, float]]:
    """The page's lora option, [{"id", "scale"?}] as the server takes it (scale 1 when left out), as
    (adapter name, scale) pairs; the engine checks that each is loaded."""
    if lora is None:
        return []
    shape = 'lora must be a list of {"id": adapter name, "scale": number}'
    if not isinstance(lora, list):
        raise InvalidRequest(shape)
    pairs = []
    for i, a in enumerate(lora):
        if not isinstance(a, dict) or not isinstance(a.get("id"), str) or set(a) - {"id", "scale"}:
            raise InvalidRequest(f"{shape}; lora[{i}] is {a!r}")
        scale = a.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise InvalidRequest(f"lora[{i}].scale must be a number, got {scale!r}")
        pairs.append((a["id"], 1.0 if scale is None else float(scale)))
    return pairs


def describe_adapter(name: str, adapter: Adapter) -> dict[str, Any]:
    return {"id": name, "rank": adapter.rank, "alpha": adapter.alpha, "tensors": len(adapter.pairs),
            "bytes": adapter.nbytes}


@dataclass(frozen=True)
class LoadedModel:
    header: GGUFHeader
    size: int  # bytes received
    engine: Engine
    choice: Choice  # which executor runs it, and why
    chat: ChatTemplate  # the model's own template, or the plain one for a base model
    device: Any = None  # the BrowserDevice when the executor is "webgpu"

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
            "backend": self.choice.executor,
            "backendNote": self.choice.note,
            "nCtx": self.engine.n_ctx,
            "chatTemplate": self.chat.source,  # "gguf": an instruct model's own; "plain": a base model
            "maxAdapters": self.engine.executor.max_adapters,
            "maxLoraRank": getattr(self.engine.executor, "max_lora_rank", None),  # None: any (numpy)
        }

    def close(self) -> None:
        if self.device is not None:
            self.device.close()


async def open_device(backend: str) -> tuple[Any, str]:
    """The page's WebGPU device (None for "numpy") and, without one, why."""
    if check_backend(backend) == "numpy":
        return None, ""
    from realm_wasm.gpu.browser import BrowserDevice  # imports `js`: Pyodide only

    try:
        return await BrowserDevice.create(), ""
    except GPUUnavailable as e:
        return None, str(e)


class WeightKeeper(Protocol):
    """Where a sink puts the model's bytes once a file's header is parsed, and the executor it builds.
    The stream is every file of the model one after the other (a split model's shards): offsets count
    from the first file's first byte."""

    def open_file(self, base: int, size: int, tensors: Iterable[TensorInfo]) -> None:
        """A file begins at `base`: `size` bytes (its header's account when the server sent none)
        holding `tensors`."""

    def take(self, data: Any, start: int) -> None:
        """Bytes [start, start + len) of the stream: a JS Uint8Array, or bytes (the header's prefix)."""

    async def executor(self, model: Model, n_ctx: int) -> Executor: ...

    def release(self) -> None:
        """Free what was kept (a failed or stopped load)."""


class DeviceWeights:
    """WebGPU: tensor bytes go into device buffers as they arrive."""

    def __init__(self, device: Any) -> None:
        self.device, self.store = device, StreamedWeights(device)

    def open_file(self, base: int, size: int, tensors: Iterable[TensorInfo]) -> None:
        self.store.add(tensors)

    def take(self, data: Any, start: int) -> None:
        # a JS chunk is copied out once, and freed once written to the device
        self.store.feed(start, data if isinstance(data, bytes | bytearray) else data.to_bytes())

    async def executor(self, model: Model, n_ctx: int) -> Executor:
        # the page decodes one sequence: 8 logit rows (8 MiB for a 262k vocab) rather than 256 MiB
        executor = GpuExecutor(model.plan, self.store, n_ctx=n_ctx, device=self.device, max_tokens=PREFILL_CHUNK,
                               max_logit_rows=8, max_adapters=MAX_ADAPTERS, max_lora_rank=max_lora_rank(model.plan))
        await self.device.settle()  # out-of-memory and validation errors of the load surface here
        return executor

    def release(self) -> None:
        self.store = None
        self.device.close()


class HeapWeights:
    """numpy: every file stays in the wasm heap, where the executor reads its weights."""

    def __init__(self) -> None:
        self.files: list[bytearray] = []
        self.bases: list[int] = []  # where each file starts in the stream

    def open_file(self, base: int, size: int, tensors: Iterable[TensorInfo]) -> None:
        self.files.append(bytearray(size))  # allocated once, from the header's own account of the file
        self.bases.append(base)

    def take(self, data: Any, start: int) -> None:
        file, at = self.files[-1], start - self.bases[-1]
        end = at + len(data)
        if end > len(file):  # bytes past the last tensor (padding): keep them, growing
            file += bytes(end - len(file))
        if isinstance(data, bytes | bytearray):
            file[at:end] = data
        else:
            data.assign_to(memoryview(file)[at:end])

    async def executor(self, model: Model, n_ctx: int) -> Executor:
        files = [np.frombuffer(f, np.uint8) for f in self.files]
        return CpuExecutor(model.plan, lambda t: shard_slice(files, self.bases, t), n_ctx=n_ctx,
                           eager_limit=EAGER_LIMIT, kernel=load_kernel(), max_adapters=MAX_ADAPTERS)

    def release(self) -> None:
        self.files, self.bases = [], []


def load_kernel() -> WasmMatmul | None:
    """The numpy executor's quantized mat-vec kernel, loaded once a page; None (numpy dequantizes,
    >10x slower) in a browser that cannot compile it (WebAssembly SIMD: Chrome 91, Firefox 89,
    Safari 16.4)."""
    return _compiled_kernel() if CPU_KERNEL else None


@functools.cache
def _compiled_kernel() -> WasmMatmul | None:
    from pyodide.ffi import JsException

    try:
        return WasmMatmul.load()
    except JsException as e:
        print(f"realm: no WebAssembly SIMD kernel ({e}); the numpy executor dequantizes instead", file=sys.stderr)
        return None


def shard_urls(url: str, count: int) -> list[str]:
    """A split model's files, from its first shard's URL (they lie beside it, named as gguf-split names them)."""
    parts = urlsplit(url)
    folder, _, name = parts.path.rpartition("/")
    return [urlunsplit(parts._replace(path=f"{folder}/{shard}")) for shard in shard_names(name, count)]


class ModelSink:
    """Parses the GGUF header from the first bytes, builds the model (tokenizer, plan) from it and
    chooses the executor (`backends.choose`: the same rules as the CLI's and the server's); the
    keeper it picks then takes every later byte and builds the executor.

    A split model (gguf-split's NAME-00001-of-0000N.gguf ...) streams in as its files one after
    the other, each `begin` to `file_done`: the first shard's header names the rest (`more_files`)
    and carries the metadata, so the architecture, the tokenizer and the executor are known from it;
    each later shard's header adds its tensors, and the plan is built from the last one's, before its
    data arrives."""

    def __init__(self, url: str, backend: str, device: Any, unavailable: str) -> None:
        self.url, self.backend, self.device, self.unavailable = url, backend, device, unavailable
        self.files: list[str] | None = None  # every file's URL, once the first header is read
        self.file = -1  # the file streaming now
        self.received = 0  # bytes of every file so far
        self.base = 0  # where the file streaming now starts in that count
        self.total: int | None = None  # its size, when the server sent one
        self.needed = 0  # parse again once the file has this many bytes
        self.prefix = bytearray()  # the file's bytes before its header is parsed
        self.header: GGUFHeader | None = None  # the file's own header
        self.first: GGUFHeader | None = None  # the first file's (a split model's metadata)
        self.tensors: dict[str, TensorInfo] = {}  # every file's tensors so far, offsets across the files
        self.tokenizer: Tokenizer | None = None
        self.model: Model | None = None
        self.choice: Choice | None = None
        self.keeper: WeightKeeper | None = None

    def begin(self, total_size: int | None) -> None:
        self.file += 1
        self.base, self.total = self.received, total_size
        self.needed, self.prefix, self.header = 0, bytearray(), None

    def more_files(self) -> list[str] | None:
        """The URLs of the files after the first (a split model's other shards, [] for one file),
        once the first file's header is read; None before."""
        return None if self.files is None else self.files[1:]

    def feed(self, chunk: Any) -> None:
        start, self.received = self.received, self.received + chunk.length
        if self.header is not None:
            self.keeper.take(chunk, start)
            return
        self.prefix += chunk.to_bytes()
        if len(self.prefix) < self.needed:
            return
        try:
            header = parse_header(memoryview(self.prefix), file_size=self.total)
        except GGUFNeedMoreData as e:
            self.needed = e.needed
            return
        except GGUFError as e:
            if self.file == 0:
                raise  # worker.js names the URL
            raise GGUFError(f"{self._name()}: {e}") from None
        self._read_header(header)
        prefix, self.prefix = self.prefix, bytearray()
        self.keeper.take(bytes(prefix), self.base)

    def _read_header(self, header: GGUFHeader) -> None:
        if self.file == 0:  # a bad model fails now, not after the download
            self.first = header
            count = split_count(header, self._name())
            self.files = [self.url] if count == 1 else shard_urls(self.url, count)
            check_architecture(header.architecture)
            self.tokenizer = Tokenizer.from_metadata(header.metadata)
        if len(self.files) == 1:
            self.tensors = dict(header.tensors)
        else:
            add_shard(self.tensors, header, self.file, len(self.files), self._name(), self.base)
        last = self.file == len(self.files) - 1
        if last:
            joined = header if len(self.files) == 1 else joined_header(self.first, self.tensors, self._name(0))
            self.model = Model(joined, self.tokenizer, build_plan(joined))
        if self.file == 0:
            self._choose(header)
        elif self.choice.executor == "webgpu":
            check_gpu_support(header.tensors.values())  # chosen from the first shard's tensors
        self.header = header
        self.keeper.open_file(self.base, self.total or header.data_size,
                              (self.tensors[name] for name in header.tensors))

    def _choose(self, header: GGUFHeader) -> None:
        self.choice = choose(self.backend, header.tensors.values(), self.device, self.unavailable)
        if self.choice.executor == "webgpu":
            self.keeper = DeviceWeights(self.device)
        else:
            if self.device is not None:  # the model runs on numpy after all: free the GPU
                self.device.close()
                self.device = None
            self.keeper = HeapWeights()

    def _name(self, file: int | None = None) -> str:
        """The file named in messages: a split model's shard by its file name."""
        file = self.file if file is None else file
        if self.files is None or len(self.files) == 1:
            return urlsplit(self.url).path.rpartition("/")[2] or self.url
        return f"shard {file + 1} of {len(self.files)} ({urlsplit(self.files[file]).path.rpartition('/')[2]})"

    def file_done(self) -> None:
        """After a file's last chunk: it must be whole."""
        got = self.received - self.base
        if self.header is None:
            raise GGUFError(f"{self._name()}: the file ended after {got} bytes, before its GGUF header did "
                            f"(at least {self.needed} bytes needed): truncated or not a model")
        if self.total is not None and got != self.total:
            raise GGUFError(f"{self._name()}: download ended after {got} of {self.total} bytes")
        if got < self.header.data_size:
            raise GGUFError(f"{self._name()}: truncated GGUF: tensor data runs to byte {self.header.data_size} "
                            f"but the file has {got} bytes")

    async def end(self) -> LoadedModel:
        if self.model is None:
            raise GGUFError(f"split model {self._name(0)}: {self.file + 1} of its {len(self.files or [])} "
                            "files were read")
        n_ctx = min(N_CTX, self.model.plan.n_ctx_train)
        engine = Engine(self.model, await self.keeper.executor(self.model, n_ctx), n_ctx)
        chat = ChatTemplate.from_metadata(self.model.tokenizer, self.first.metadata)
        return LoadedModel(self.model.header, self.received, engine, self.choice, chat, self.device)

    def abort(self) -> None:
        if self.keeper is not None:
            self.keeper.release()  # a DeviceWeights closes its device
        elif self.device is not None:
            self.device.close()


class AdapterSink:
    """A LoRA adapter streaming in (the model sink's interface, `end` -> its description): the header
    is checked against the model once it is in, the file loaded into the engine at the end."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.name = engine, name
        self.total: int | None = None
        self.data = bytearray()  # adapters are small (MBs): kept whole, read once at the end
        self.needed = 0  # check the header again once this many bytes have arrived
        self.checked = False

    def begin(self, total_size: int | None) -> None:
        self.total = total_size

    def feed(self, chunk: Any) -> None:
        self.data += chunk.to_bytes()
        if self.checked or len(self.data) < self.needed:
            return
        try:
            header = parse_header(memoryview(self.data), file_size=self.total)
        except GGUFNeedMoreData as e:
            self.needed = e.needed
            return
        except GGUFError as e:
            raise BadAdapter(f"adapter {self.name}: {e}") from None
        check_header(header, self.engine.model.plan, self.name)  # a wrong file fails now
        self.checked = True

    def more_files(self) -> list[str]:
        return []  # an adapter is one file

    def file_done(self) -> None:
        if self.total is not None and len(self.data) != self.total:
            raise BadAdapter(f"adapter {self.name}: download ended after {len(self.data)} of {self.total} bytes")

    async def end(self) -> dict[str, Any]:
        adapter = self.engine.load_adapter(self.name, self.data)  # read_adapter: header, then the data
        return describe_adapter(self.name, adapter)

    def abort(self) -> None:
        self.data = bytearray()


class WorkerHost:
    """The one object worker.js talks to: versions, model loading, generation."""

    def __init__(self) -> None:
        self.loaded: LoadedModel | None = None
        self._grammars: GrammarCache | None = None  # the loaded vocabulary's compiled output grammars
        self.on_device_lost: Any = None  # worker.js's callback(reason): the model's GPU device was lost

    def watch_device_loss(self, callback: Any) -> None:
        """Have `callback(reason)` called when the loaded model's WebGPU device is lost by anything
        but an unload (the model is unloaded first: its buffers went with the device)."""
        self.on_device_lost = callback

    def _device_lost(self, loaded: LoadedModel, reason: str) -> None:
        if self.loaded is loaded:
            self.unload()
        if self.on_device_lost is not None:
            self.on_device_lost(reason)

    def versions(self) -> dict[str, str]:
        return {"realm": realm_wasm.__version__, "python": sys.version.split()[0],
                "numpy": np.__version__}

    def unload(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    async def open_model(self, url: str, backend: str = "auto") -> ModelSink:
        self.unload()  # the previous model goes away whether or not this one loads
        return ModelSink(url, backend, *await open_device(backend))

    def open_adapter(self, name: str) -> AdapterSink:
        """A sink for the LoRA adapter `name`, for the loaded model."""
        if self.loaded is None:
            raise NoModel("load a model before its LoRA adapters")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("an adapter needs a name (its id)")
        if name in self.loaded.engine.adapters:  # known before the download
            raise AdapterConflict(f"an adapter named {name!r} is already loaded (unload it first)")
        return AdapterSink(self.loaded.engine, name)

    def unload_adapter(self, name: str) -> None:
        if self.loaded is None:
            raise NoModel("no model is loaded, nor any adapter")
        self.loaded.engine.unload_adapter(name)

    def adapters(self) -> list[dict[str, Any]]:
        """The loaded model's adapters, in the order they were loaded."""
        if self.loaded is None:
            return []
        return [describe_adapter(name, adapter) for name, adapter in self.loaded.engine.adapters.items()]

    def model_ready(self, loaded: LoadedModel) -> dict[str, Any]:
        self.loaded = loaded
        if loaded.device is not None:
            loaded.device.on_lost = lambda reason: self._device_lost(loaded, reason)
        return loaded.describe()

    async def gpu(self) -> dict[str, Any]:
        """The adapter the page would use ({"available": False, "reason"} without one)."""
        from realm_wasm.gpu.browser import describe_adapter  # imports `js`: Pyodide only

        return await describe_adapter()

    def error_codes(self) -> dict[str, str]:
        return error_codes()

    def error_titles(self) -> dict[str, str]:
        return dict(TITLES)

    def stats(self) -> dict[str, Any]:
        """What is loaded now: the model's description, how many tokens its KV slot holds, and the
        GPU buffers its device allocated (count and bytes; 0 on numpy)."""
        if self.loaded is None:
            return {"model": None, "kvTokens": 0, "gpuBuffers": 0, "gpuBytes": 0}
        device = self.loaded.device
        return {"model": self.loaded.describe(), "kvTokens": len(self.loaded.engine.slot_tokens[0]),
                "gpuBuffers": device.buffers if device else 0, "gpuBytes": device.allocated_bytes if device else 0}

    def start_generation(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                         max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         seed: int = 0, stop: list[str] | None = None,
                         speculation: dict[str, Any] | None = None,
                         lora: list[dict[str, Any]] | None = None, response_format: dict[str, Any] | None = None,
                         grammar: str | None = None) -> Generation:
        """A generation whose `step()` gives worker.js's events, a list at a time: {"kind": "token",
        "tokenId": int | None, "text": str} for each token, then one {"kind": "finished", "reason": "stop" |
        "length", "promptTokens", "completionTokens", "cachedTokens"} (+ "draftedTokens",
        "acceptedTokens" with `speculation`). Either `prompt` (text, completed as it is) or
        `messages` (rendered with the model's chat template, whose stop sequences join `stop`); the
        text of a stop sequence ends the generation and is not sent. `speculation` ({"method":
        "lookup", "max_draft", "ngram"}, as the server takes it; the page loads no draft model)
        drafts tokens to verify: the same tokens, fewer steps where the text repeats itself. `lora`
        ([{"id", "scale"}], as the server takes it) names loaded adapters to apply.
        `response_format` / `grammar` (as the server takes them) make the output follow a JSON
        schema, any JSON object or a GBNF grammar."""
        if self.loaded is None:
            raise NoModel("load a model before generating")
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give a prompt or chat messages, not both or neither")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        drafting = check_speculation(speculation)
        adapters = check_lora(lora)
        tokenizer, stops = self.loaded.engine.tokenizer, tuple(stop or ())
        if self._grammars is None or self._grammars.tokenizer is not tokenizer:  # compiled per vocabulary
            self._grammars = GrammarCache(tokenizer)
        output_grammar = self._grammars.for_request(response_format, grammar)
        if messages is not None:
            chat = self.loaded.chat.render(check_messages(messages))
            ids = tokenizer.encode(chat.text, add_bos=chat.add_bos)
            stops += chat.stop
        else:
            ids = tokenizer.encode(prompt)
        steps = self.loaded.engine.generate_steps(ids, max_tokens=max_tokens, sampling=sampling, stop=stops,
                                                  speculation=drafting, lora=adapters, grammar=output_grammar)
        return Generation(self, steps, drafting is not None)


class Generation:
    """One generation's events, a list per `step()` (the tokens one read-back gave, then "finished"
    at the end of the last list), then None: one call from worker.js for several tokens."""

    def __init__(self, host: WorkerHost, steps: Generator[list[TokenEvent | Finished], None, None],
                 drafting: bool) -> None:
        self.host, self.steps, self.drafting, self.done = host, steps, drafting, False

    def step(self) -> list[dict[str, Any]] | None:
        if self.done:
            return None
        try:
            events = next(self.steps)
        except StopIteration:
            self.done = True
            return None
        except DeviceLost:
            self.done = True
            self.host.unload()  # its buffers went with the device: the model has to be loaded again
            raise
        except BaseException:
            self.done = True
            raise
        return [self._plain(event) for event in events]

    def _plain(self, event: TokenEvent | Finished) -> dict[str, Any]:
        if isinstance(event, TokenEvent):
            return {"kind": "token", "tokenId": event.token_id, "text": event.text}
        drafts = {"draftedTokens": event.drafted_tokens, "acceptedTokens": event.accepted_tokens}
        return {"kind": "finished", "reason": event.reason, "promptTokens": event.prompt_tokens,
                "completionTokens": event.completion_tokens, "cachedTokens": event.cached_tokens,
                **(drafts if self.drafting else {})}

    def close(self) -> None:
        """Stopped early (or ended): frees the slot, keeps its KV."""
        self.done = True
        self.steps.close()


HOST = WorkerHost()
