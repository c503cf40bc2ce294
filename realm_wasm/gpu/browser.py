"""`Device` on the browser's WebGPU (`js.navigator.gpu`), for Realm inside Pyodide.

Pyodide only: it imports `js` and `pyodide` at load, as native.py imports wgpu-py; nothing else in
`realm_wasm` imports it. The engine is synchronous, and so is `read_buffer`: it blocks on
`mapAsync` through JSPI (`pyodide.ffi.run_sync`), which works when JS entered Python through an
async function, `runPythonAsync` or `callPromising` (web/worker.js does).

Errors come back from WebGPU asynchronously: `device.lost` and `uncapturederror` events are
recorded as they arrive and raised, as `DeviceLost`, `GPUOutOfMemory` or `GPUError`, by the next call
that touches the device, so a failure never turns into silent garbage. A loss that `close` did not
cause (a driver reset, the GPU process gone, `destroy()` from elsewhere) is also reported to
`on_lost` as it arrives, so the page can make a new device and load the model again while idle.

Memory: WebGPU has no query for what a device holds, so the device counts what it allocated itself
(`buffers`, `allocated_bytes`: those alive; a buffer lives until `destroy_buffer` or `close`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import js
from pyodide.code import run_js
from pyodide.ffi import JsException, can_run_sync, create_once_callable, create_proxy, run_sync, to_js

from .device import (
    COPY_DST,
    MAP_READ,
    BindGroup,
    Binding,
    Buffer,
    Copy,
    DeviceLost,
    Dispatch,
    GPUError,
    GPUOutOfMemory,
    GPUUnavailable,
    Pipeline,
)

FEATURES = ("shader-f16", "subgroups", "timestamp-query")

# Limits raised to the adapter's own values (a device starts at WebGPU's defaults, e.g. 128 MiB
# storage bindings, unless asked) and reported to the kernels in snake_case.
LIMITS = (
    "maxBufferSize",
    "maxStorageBufferBindingSize",
    "maxUniformBufferBindingSize",
    "maxStorageBuffersPerShaderStage",
    "maxComputeWorkgroupStorageSize",
    "maxComputeInvocationsPerWorkgroup",
    "maxComputeWorkgroupSizeX",
    "maxComputeWorkgroupSizeY",
    "maxComputeWorkgroupSizeZ",
    "maxComputeWorkgroupsPerDimension",
    "minStorageBufferOffsetAlignment",
    "minUniformBufferOffsetAlignment",
)

# queue.writeBuffer straight from a Python buffer: a view of the wasm heap, where to_js would copy.
# A whole step in one call from Python: ~400 setPipeline / setBindGroup / dispatchWorkgroups calls
# through Pyodide's FFI cost more than the GPU's whole decode step (measured on an H200: the page
# decoded at a third of native speed), one call with a prepared array costs one crossing.
_submit_step = run_js("""(device, queue, copies, steps, readBuffer, readOffset, readSize, staging) => {
    const encoder = device.createCommandEncoder();
    for (let i = 0; i < copies.length; i += 5) {
        encoder.copyBufferToBuffer(copies[i], copies[i + 1], copies[i + 2], copies[i + 3], copies[i + 4]);
    }
    const pass = encoder.beginComputePass();
    for (let i = 0; i < steps.length; i += 5) {
        pass.setPipeline(steps[i]);
        pass.setBindGroup(0, steps[i + 1]);
        pass.dispatchWorkgroups(steps[i + 2], steps[i + 3], steps[i + 4]);
    }
    pass.end();
    if (staging) encoder.copyBufferToBuffer(readBuffer, readOffset, staging, 0, readSize);
    queue.submit([encoder.finish()]);
    // mapping starts now and completes when the GPU has run this submit
    return staging ? staging.mapAsync(GPUMapMode.READ, 0, readSize) : null;
}""")

_write_from_python = run_js("""(queue, buffer, offset, data) => {
    const view = data.getBuffer("u8");
    try {
        queue.writeBuffer(buffer, offset, view.data);
    } finally {
        view.release();
    }
}""")


def snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _js_dict(d: dict) -> Any:
    return to_js(d, dict_converter=js.Object.fromEntries)


async def request_adapter(power_preference: str = "high-performance") -> Any:
    """The browser's WebGPU adapter, or GPUUnavailable saying why there is none Realm can use."""
    gpu = getattr(js.navigator, "gpu", None)
    if gpu is None:
        raise GPUUnavailable("this browser has no WebGPU (navigator.gpu is missing)")
    if not can_run_sync():
        raise GPUUnavailable("this browser cannot let Python wait for GPU results (no JavaScript Promise Integration)")
    adapter = await gpu.requestAdapter(_js_dict({"powerPreference": power_preference}))
    if adapter is None:
        raise GPUUnavailable("WebGPU is present but no GPU adapter was offered")
    return adapter


async def describe_adapter() -> dict[str, Any]:
    """What the page shows about the GPU (probed once, here): the adapter's identity, whether it
    is a CPU emulation, its features and the limits the kernels choose by."""
    try:
        adapter = await request_adapter()
    except GPUUnavailable as e:
        return {"available": False, "reason": str(e)}
    info = adapter.info
    return {"available": True, "vendor": info.vendor, "architecture": info.architecture, "device": info.device,
            "description": info.description, "isFallbackAdapter": _is_fallback(adapter),
            "features": sorted(str(f) for f in adapter.features),
            "limits": {name: int(getattr(adapter.limits, name)) for name in LIMITS}}


def _is_fallback(adapter: Any) -> bool:
    return bool(getattr(adapter.info, "isFallbackAdapter", None) or getattr(adapter, "isFallbackAdapter", False))


class BrowserDevice:
    """One GPUDevice with the adapter's own limits and the optional features Realm uses."""

    host = "tint"
    # Chromium on the H200 (docs/benchmarks.md, 2026-12-04; runs vary by up to 1.7x): 3 steps ahead
    # 392-448 tok/s in four runs, 6: 561, 8: 434-732 in three, 16: 475, 32: 413
    run_ahead = 8
    # H200 page (docs/benchmarks.md, 2026-12-04 afternoon; two modes, ~2x apart): 1 decode step a
    # submit 552-654 tok/s, 4: 649-748 (1,044-1,145 in the fast mode), 8: 545-883 (1,149)
    steps_per_submit = 4

    def __init__(self, adapter: Any, device: Any) -> None:
        self.adapter, self.device, self.queue = adapter, device, device.queue
        info = adapter.info
        self.name = " ".join(filter(None, (info.vendor, info.architecture, info.device, info.description)))
        self.is_fallback_adapter = _is_fallback(adapter)
        self.features = frozenset(f for f in FEATURES if device.features.has(f))
        self.limits = {snake_case(name): int(getattr(device.limits, name)) for name in LIMITS}
        self.lost: str | None = None  # why the device stopped working, once it has
        self.on_lost: Callable[[str], None] | None = None  # told of a loss `close` did not cause
        self._closed = False
        self._destroyed_by_close = False  # that loss is ours, not news
        self.errors: list[Exception] = []  # reported by WebGPU, not raised yet
        self.buffers = 0  # created and not destroyed
        self.allocated_bytes = 0
        self._staging: list[tuple[int, Buffer]] = []  # idle MAP_READ buffers (size, buffer)
        self._programs: dict[int, tuple[list[Dispatch], Any]] = {}  # id(dispatch list) -> (it, its JS array)
        self._on_error = create_proxy(self._uncaptured)
        device.onuncapturederror = self._on_error
        device.lost.then(create_once_callable(self._lost))

    @classmethod
    async def create(cls, power_preference: str = "high-performance") -> BrowserDevice:
        adapter = await request_adapter(power_preference)
        features = [f for f in FEATURES if adapter.features.has(f)]
        limits = {name: getattr(adapter.limits, name) for name in LIMITS}
        try:
            device = await adapter.requestDevice(_js_dict({"requiredFeatures": features, "requiredLimits": limits}))
        except JsException as e:
            raise GPUUnavailable(f"the GPU adapter refused a device: {e}") from e
        return cls(adapter, device)

    # -- errors ----------------------------------------------------------------------------------

    def _uncaptured(self, event: Any) -> None:
        error = event.error
        kind = error.constructor.name
        if kind == "GPUOutOfMemoryError":
            self.errors.append(GPUOutOfMemory(f"the GPU ran out of memory: {error.message}"))
        else:
            self.errors.append(GPUError(f"WebGPU {kind}: {error.message}"))

    def _lost(self, info: Any) -> None:
        self.lost = self.lost or (f"{info.reason}: {info.message}" if info.message else str(info.reason))
        if not self._destroyed_by_close and self.on_lost is not None:
            self.on_lost(self.lost)

    def check(self) -> None:
        """Raise what the device reported since the last check (device loss first)."""
        if self.lost is not None:
            raise DeviceLost(f"the GPU device {self.name!r} was lost ({self.lost}); load the model again")
        if self.errors:
            first, self.errors = self.errors[0], []
            raise first

    async def settle(self) -> None:
        """Wait for the queue's work (and any errors it causes) to finish, then `check`."""
        try:
            await self.queue.onSubmittedWorkDone()
        except JsException as e:
            self.lost = self.lost or str(e)
        self.check()

    def close(self) -> None:
        """Free every buffer at once (a new model gets a new device)."""
        if self._closed:
            return
        self._closed = True
        self._destroyed_by_close = self.lost is None  # a device already lost: its loss is still news
        self.lost = self.lost or "destroyed"
        self.device.onuncapturederror = None
        self.device.destroy()
        self._on_error.destroy()
        self._staging.clear()

    # -- the Device protocol ---------------------------------------------------------------------

    def create_buffer(self, size: int, usage: int, label: str = "") -> Buffer:
        self.check()
        buffer = self.device.createBuffer(_js_dict({"size": size, "usage": usage, "label": label}))
        self.buffers += 1
        self.allocated_bytes += size
        return buffer

    def write_buffer(self, buf: Buffer, offset: int, data: bytes | memoryview) -> None:
        self.check()
        _write_from_python(self.queue, buf, offset, data)

    def destroy_buffer(self, buf: Buffer) -> None:
        self.check()
        buf.destroy()
        self.buffers -= 1
        self.allocated_bytes -= buf.size

    async def read_buffer_async(self, buf: Buffer, offset: int, size: int) -> bytes:
        return await self.submit([], read=(buf, offset, size)).result_async()

    def read_buffer(self, buf: Buffer, offset: int, size: int) -> bytes:
        return self.submit([], read=(buf, offset, size)).result()

    def _take_staging(self, size: int) -> tuple[int, Buffer]:
        for i, (capacity, _) in enumerate(self._staging):
            if capacity >= size:
                return self._staging.pop(i)
        capacity = max(256, 1 << (size - 1).bit_length())
        return capacity, self.create_buffer(capacity, MAP_READ | COPY_DST, "read-back")

    def create_pipeline(self, wgsl: str, entry_point: str = "main", label: str = "") -> Pipeline:
        self.check()
        module = self.device.createShaderModule(_js_dict({"code": wgsl, "label": label}))
        return self.device.createComputePipeline(_js_dict(
            {"layout": "auto", "compute": {"module": module, "entryPoint": entry_point}, "label": label}))

    def create_bind_group(self, pipeline: Pipeline, bindings: list[Binding]) -> BindGroup:
        self.check()
        entries = [{"binding": i, "resource": {"buffer": buf, "offset": off, "size": size}}
                   for i, (buf, off, size) in enumerate(bindings)]
        return self.device.createBindGroup(_js_dict({"layout": pipeline.getBindGroupLayout(0), "entries": entries}))

    def submit(self, dispatches: list[Dispatch], *, copies: Sequence[Copy] = (),
               read: Binding | None = None) -> BrowserReadBack | None:
        self.check()
        staging = self._take_staging(read[2]) if read is not None else None
        flat_copies = [v for (src, so, size), (dst, do, _) in copies for v in (src, so, dst, do, size)]
        mapped = _submit_step(self.device, self.queue, to_js(flat_copies), self._program(dispatches),
                              *(read if read is not None else (None, 0, 0)), staging[1] if staging else None)
        if staging is None:
            return None
        return BrowserReadBack(self, staging, read[2], mapped)

    def _program(self, dispatches: list[Dispatch]) -> Any:
        """The dispatches as one flat JS array [pipeline, bind group, x, y, z, ...], made once per
        list: the executor keeps one list per step shape, and a decode step repeats one shape."""
        key = id(dispatches)
        if key not in self._programs or self._programs[key][0] is not dispatches:
            if len(self._programs) >= 64:
                self._programs.clear()
            flat = [v for pipeline, bind_group, groups in dispatches for v in (pipeline, bind_group, *groups)]
            self._programs[key] = (dispatches, to_js(flat))
        return self._programs[key][1]


class BrowserReadBack:
    def __init__(self, device: BrowserDevice, staging: tuple[int, Buffer], size: int, mapped: Any) -> None:
        self.device, self.staging, self.size, self.mapped = device, staging, size, mapped

    async def result_async(self) -> bytes:
        try:
            await self.mapped
        except JsException as e:
            self._refused(e)
        return self._take()

    def result(self) -> bytes:
        # JSPI blocks on the mapping's own promise: a coroutine here (result_async) would be a
        # task of Pyodide's event loop, two more trips through the worker's message queue a step
        try:
            run_sync(self.mapped)
        except JsException as e:
            self._refused(e)
        return self._take()

    def _refused(self, e: JsException) -> None:
        # the staging buffer is ours and mappable: only a lost device refuses to map it
        self.device.lost = self.device.lost or str(e)
        self.device.check()

    def _take(self) -> bytes:
        """The mapped bytes; the staging buffer goes back to the device's idle ones."""
        device, (_, buf) = self.device, self.staging
        data = js.Uint8Array.new(buf.getMappedRange(0, self.size)).to_bytes()
        buf.unmap()
        device._staging.append(self.staging)
        device.check()  # errors of the work just finished arrived before its results
        return data
