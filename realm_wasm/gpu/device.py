"""The host seam: the few things Realm asks of a WebGPU device.

Two hosts satisfy it: `native.NativeDevice` (wgpu-py, CPython) and the browser device
(`js.navigator.gpu` under Pyodide). Everything above this file — kernels, executor, engine — talks
to a `Device` only, so the same code and the same WGSL run in both places.

A step of inference is a list of `Dispatch`es handed to `submit` at once: one command encoder,
one compute pass, one queue submit, which may end by copying a few bytes (sampled token ids) out
to the host: `submit` returns without waiting, and the `ReadBack` it gives waits when asked.
Buffers, pipelines and bind groups are built at load time.
Sizes and offsets of writes and read-backs are multiples of 4 bytes (WebGPU's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import RealmError

# Buffer usage flags, numerically equal to WebGPU's GPUBufferUsage so hosts pass them through.
MAP_READ = 0x0001
COPY_SRC = 0x0004
COPY_DST = 0x0008
UNIFORM = 0x0040
STORAGE = 0x0080
# What a kernel operand usually needs: written from the host, read back by tests and samplers.
STORAGE_RW = STORAGE | COPY_SRC | COPY_DST
UNIFORM_RW = UNIFORM | COPY_DST

Buffer = Any  # host object (wgpu.GPUBuffer or a JS GPUBuffer proxy)
Pipeline = Any
BindGroup = Any
Binding = tuple[Buffer, int, int]  # (buffer, byte offset, byte size) at @binding(i) of @group(0)
Dispatch = tuple[Pipeline, BindGroup, tuple[int, int, int]]  # (pipeline, bind group, workgroup counts)
Copy = tuple[Binding, Binding]  # (source, destination): a buffer-to-buffer copy of the source's size


class GPUUnavailable(RealmError, RuntimeError):
    """No WebGPU adapter (or device) could be obtained on this host."""

    code = "no-webgpu"


class UnsupportedOnGPU(RealmError, ValueError):
    """The model needs something no GPU kernel does (a tensor type without a WGSL snippet, a KV
    cache over the binding limit): `--backend auto` runs such a model on numpy instead."""

    code = "unsupported-on-gpu"


class GPUError(RealmError, RuntimeError):
    """WebGPU rejected a call (a validation or internal error): a bug, or an adapter Realm does not
    support. Both hosts raise it (and its subclasses) for whatever their WebGPU reports."""

    code = "gpu"


class GPUOutOfMemory(GPUError, MemoryError):
    """The device could not allocate a buffer (the model, its KV cache or scratch is too large)."""

    code = "out-of-memory"


class DeviceLost(GPUError):
    """The device stopped working (driver reset, destroyed); its buffers and results are gone."""

    code = "device-lost"


class Device(Protocol):
    """What both hosts provide. Feature names follow WebGPU in the browser's spelling."""

    features: frozenset[str]  # subset of {"shader-f16", "subgroups", "timestamp-query"}
    limits: dict[str, int]  # snake_case WebGPU limits, e.g. "max_storage_buffer_binding_size"
    is_fallback_adapter: bool  # a CPU rasterizer (lavapipe, SwiftShader): pick lean kernel variants
    host: str  # "naga" (wgpu-py) or "tint" (Chromium): WGSL directives differ, see compose.py
    # Decode steps to queue behind the one whose ids are being read, so that the GPU never idles
    # while the host reads, streams and checks stops; each costs at most one wasted row per
    # sequence that finishes. Per host: a browser's read-back comes back through the GPU process.
    run_ahead: int
    # Decode steps one submit may hold, each step's tokens the samples of the one before (made on
    # the device): the host builds, submits and reads once for that many tokens of every sequence.
    steps_per_submit: int

    def create_buffer(self, size: int, usage: int, label: str = "") -> Buffer: ...

    def write_buffer(self, buf: Buffer, offset: int, data: bytes | memoryview) -> None: ...

    def destroy_buffer(self, buf: Buffer) -> None:
        """Free a buffer now; work already submitted that uses it still runs (WebGPU's destroy())."""
        ...

    async def read_buffer_async(self, buf: Buffer, offset: int, size: int) -> bytes:
        """The portable read-back: in the browser a mapping can only be awaited."""
        ...

    def read_buffer(self, buf: Buffer, offset: int, size: int) -> bytes:
        """Blocking read-back: native hosts, and Pyodide only where JSPI lets it block."""
        ...

    def create_pipeline(self, wgsl: str, entry_point: str = "main", label: str = "") -> Pipeline: ...

    def create_bind_group(self, pipeline: Pipeline, bindings: list[Binding]) -> BindGroup: ...

    def submit(self, dispatches: list[Dispatch], *, copies: Sequence[Copy] = (),
               read: Binding | None = None) -> ReadBack | None:
        """One command buffer, run after everything submitted or written before: the `copies`, the
        dispatches in one compute pass, then, with `read`, a copy of that binding out to the host.
        Returns at once; the ReadBack (None without `read`) waits for the bytes."""
        ...


class ReadBack(Protocol):
    """The bytes a submit reads back. Later submits may be queued before they are waited for: a
    decoder records step n + 1 while the GPU runs step n."""

    def result(self) -> bytes:
        """Wait for the submit's work; its bytes (errors of that work raise here)."""
        ...
