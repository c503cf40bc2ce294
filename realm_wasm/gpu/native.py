"""`Device` on wgpu-py (CPython only: the one module of `realm_wasm` that imports wgpu)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import wgpu

from .device import (
    COPY_DST,
    COPY_SRC,
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

# wgpu-py spells some features differently from the browser; Realm uses the browser's names.
FEATURES = {"shader-f16": "shader-f16", "subgroup": "subgroups", "timestamp-query": "timestamp-query"}

# Limits worth raising to what the adapter can do (WebGPU devices start at conservative defaults,
# e.g. 128 MiB bindings and 16 KiB of workgroup memory, unless asked).
RAISED_LIMITS = (
    "max-buffer-size",
    "max-storage-buffer-binding-size",
    "max-uniform-buffer-binding-size",
    "max-storage-buffers-per-shader-stage",
    "max-compute-workgroup-storage-size",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
    "max-compute-workgroup-size-y",
    "max-compute-workgroup-size-z",
    "max-compute-workgroups-per-dimension",
)

# How wgpu-native words errors of calls on a lost (or destroyed) device.
LOST_PHRASES = ("device is lost", "device was lost")


def _raw_recorder():
    """Record dispatches with wgpu-native's C functions, skipping wgpu-py's per-call Python layer.

    A decode step is a few hundred tiny dispatches; through wgpu-py's methods recording them costs
    ~14 µs each (≈3.5 ms a step, more than the GPU's whole step on an H100), through the C
    functions ~1.6 µs. The executor keeps every pipeline and bind group alive, so wgpu-py's
    keep-alive bookkeeping is not needed. Uses wgpu-py's private cffi handles (wgpu pinned to
    0.32.0); None where they are not there, and the methods are used instead.
    """
    try:
        from wgpu.backends.wgpu_native._api import ffi, lib
    except ImportError:
        return None
    set_pipeline = lib.wgpuComputePassEncoderSetPipeline
    set_bind_group = lib.wgpuComputePassEncoderSetBindGroup
    dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
    no_offsets = ffi.NULL

    def record(cpass: wgpu.GPUComputePassEncoder, dispatches: list[Dispatch]) -> None:
        handle = cpass._internal
        for pipeline, bind_group, (x, y, z) in dispatches:
            set_pipeline(handle, pipeline._internal)
            set_bind_group(handle, 0, bind_group._internal, 0, no_offsets)
            dispatch(handle, x, y, z)

    return record


def _recorder_through_wgpu_py(cpass: wgpu.GPUComputePassEncoder, dispatches: list[Dispatch]) -> None:
    for pipeline, bind_group, groups in dispatches:
        cpass.set_pipeline(pipeline)
        cpass.set_bind_group(0, bind_group)
        cpass.dispatch_workgroups(*groups)


record_dispatches = _raw_recorder() or _recorder_through_wgpu_py


STAGING_BYTES = 4096  # a step's sampled ids (1,024 rows) fit one reusable read-back buffer


def _raw_reads():
    """Submit, map and wait for a read-back with wgpu-native's C functions.

    wgpu-py maps through a thread that blocks in wgpuDevicePoll until the whole queue is idle;
    with the next decode step always queued behind, that thread and the host recording the step
    after contend for the device (measured on the H100: ~0.6 ms a step). Here the submit returns
    its index, and the read-back waits, on the calling thread, for that submission only. Uses
    wgpu-py's private cffi handles like `_raw_recorder`; None where they are not there.
    """
    try:
        from wgpu.backends.wgpu_native._api import ffi, lib, libf
    except ImportError:
        return None

    @ffi.callback("void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)")
    def on_mapped(status, _message, box, _unused):
        ffi.from_handle(box)[0] = status

    def submit_and_map(device: wgpu.GPUDevice, commands, staging: Buffer, size: int):
        handles = ffi.new("WGPUCommandBuffer[1]", [commands._internal])
        index = ffi.new("WGPUSubmissionIndex *", libf.wgpuQueueSubmitForIndex(device.queue._internal, 1, handles))
        status = [None]
        box = ffi.new_handle(status)  # must outlive the callback: `read` holds it until then
        info = ffi.new("WGPUBufferMapCallbackInfo *", {"mode": lib.WGPUCallbackMode_AllowProcessEvents,
                                                       "callback": on_mapped, "userdata1": box})
        libf.wgpuBufferMapAsync(staging._internal, lib.WGPUMapMode_Read, 0, size, info[0])

        def read() -> bytes:
            nonlocal box
            while status[0] is None:
                libf.wgpuDevicePoll(device._internal, True, index)
            box = None  # the callback has run: its handle may go
            if status[0] != lib.WGPUMapAsyncStatus_Success:
                raise DeviceLost(f"the read-back buffer could not be mapped (status {status[0]}): the device is lost")
            data = bytes(ffi.buffer(lib.wgpuBufferGetConstMappedRange(staging._internal, 0, size), size))
            lib.wgpuBufferUnmap(staging._internal)
            return data

        return read

    return submit_and_map


def _reads_through_wgpu_py(device: wgpu.GPUDevice, commands, staging: Buffer, size: int):
    device.queue.submit([commands])
    mapped = staging.map_async("READ_NOSYNC", 0, size)

    def read() -> bytes:
        mapped.sync_wait()
        data = bytes(staging.read_mapped(0, size))
        staging.unmap()
        return data

    return read


submit_and_map = _raw_reads() or _reads_through_wgpu_py


def _quiet_window_system() -> None:
    """Mesa's Vulkan drivers (lavapipe) print "XDG_RUNTIME_DIR is invalid or not set" twice when
    they probe for a display; a compute device needs none, so give them an empty private one."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(tempfile.gettempdir()) / f"realm-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


class NativeReadBack:
    def __init__(self, device: NativeDevice, staging: Buffer, read) -> None:
        self.device, self.staging, self.read = device, staging, read

    def result(self) -> bytes:
        with self.device._calls():
            data = self.read()
        if self.staging.size == STAGING_BYTES:
            self.device._staging.append(self.staging)
        else:
            self.staging.destroy()
        return data


class NativeDevice:
    """One wgpu-py device with the adapter's own limits and the optional features Realm uses."""

    host = "naga"
    # H200 (docs/benchmarks.md, 2026-12-03): 1 -> 3 steps ahead gave 951 -> 970-1035 tok/s
    run_ahead = 3
    # H200 (docs/benchmarks.md, 2026-12-04 afternoon): 1 -> 4 decode steps a submit gave 965-1,081
    # -> 1,140-1,192 tok/s; 8: 1,170-1,193
    steps_per_submit = 4

    def __init__(self, adapter: wgpu.GPUAdapter, device: wgpu.GPUDevice) -> None:
        self.adapter, self.device = adapter, device
        self.features = frozenset(FEATURES[f] for f in device.features if f in FEATURES)
        self.limits = {k.replace("-", "_"): v for k, v in device.limits.items() if isinstance(v, int)}
        self.is_fallback_adapter = adapter.info.get("adapter_type") == "CPU"
        self.name = adapter.info.get("device", "")
        self._staging: list[Buffer] = []  # idle MAP_READ buffers of STAGING_BYTES

    @classmethod
    def create(cls, power_preference: str = "high-performance") -> NativeDevice:
        _quiet_window_system()
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        except RuntimeError as e:  # wgpu-py raises rather than returning None
            raise GPUUnavailable(f"no WebGPU adapter on this machine (wgpu-py: {e})") from e
        if adapter is None:
            raise GPUUnavailable("no WebGPU adapter on this machine")
        features = [f for f in FEATURES if f in adapter.features]
        limits = {k: adapter.limits[k] for k in RAISED_LIMITS if k in adapter.limits}
        try:
            device = adapter.request_device_sync(required_features=features, required_limits=limits)
        except RuntimeError as e:
            raise GPUUnavailable(f"adapter {adapter.info.get('device')!r} refused a device: {e}") from e
        return cls(adapter, device)

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """wgpu-py's errors as the seam's: out of memory, device loss, any other GPU error.

        Device loss has no event to wait for in wgpu-py 0.32 (`device.lost` is not implemented and
        wgpu-native's callback only logs): calls on a lost device fail with an error whose text
        says so, and a read-back that cannot be mapped means the same (`_raw_reads`)."""
        try:
            yield
        except GPUError:
            raise
        except wgpu.GPUOutOfMemoryError as e:
            raise GPUOutOfMemory(f"the GPU ran out of memory: {e}") from e
        except (wgpu.GPUError, RuntimeError) as e:
            if any(phrase in str(e).lower() for phrase in LOST_PHRASES):
                raise DeviceLost(f"GPU device {self.name!r} was lost; its buffers and results are gone") from e
            if isinstance(e, wgpu.GPUError):
                raise GPUError(f"WebGPU {type(e).__name__}: {e}") from e
            raise

    def create_buffer(self, size: int, usage: int, label: str = "") -> Buffer:
        with self._calls():
            return self.device.create_buffer(size=size, usage=usage, label=label)

    def write_buffer(self, buf: Buffer, offset: int, data: bytes | memoryview) -> None:
        with self._calls():
            self.device.queue.write_buffer(buf, offset, data)

    def destroy_buffer(self, buf: Buffer) -> None:
        with self._calls():
            buf.destroy()

    def read_buffer(self, buf: Buffer, offset: int, size: int) -> bytes:
        return self.submit([], read=(buf, offset, size)).result()

    async def read_buffer_async(self, buf: Buffer, offset: int, size: int) -> bytes:
        return self.read_buffer(buf, offset, size)

    def create_pipeline(self, wgsl: str, entry_point: str = "main", label: str = "") -> Pipeline:
        with self._calls():
            module = self.device.create_shader_module(code=wgsl, label=label)
            return self.device.create_compute_pipeline(
                layout="auto", compute={"module": module, "entry_point": entry_point}, label=label
            )

    def create_bind_group(self, pipeline: Pipeline, bindings: list[Binding]) -> BindGroup:
        entries = [
            {"binding": i, "resource": {"buffer": buf, "offset": off, "size": size}}
            for i, (buf, off, size) in enumerate(bindings)
        ]
        with self._calls():
            return self.device.create_bind_group(layout=pipeline.get_bind_group_layout(0), entries=entries)

    def submit(self, dispatches: list[Dispatch], *, copies: Sequence[Copy] = (), read: Binding | None = None,
               timestamp_writes: dict | None = None) -> NativeReadBack | None:
        with self._calls():
            encoder = self.device.create_command_encoder()
            for (src, src_off, size), (dst, dst_off, _) in copies:
                encoder.copy_buffer_to_buffer(src, src_off, dst, dst_off, size)
            cpass = encoder.begin_compute_pass(timestamp_writes=timestamp_writes)
            record_dispatches(cpass, dispatches)
            cpass.end()  # wgpu-core validates the pass here: errors still surface through wgpu-py
            staging = None
            if read is not None:
                buf, offset, size = read
                staging = self._take_staging(size)
                encoder.copy_buffer_to_buffer(buf, offset, staging, 0, size)
            if staging is None:
                self.device.queue.submit([encoder.finish()])
                return None
            # mapping starts now and completes when the GPU has run this submit
            return NativeReadBack(self, staging, submit_and_map(self.device, encoder.finish(), staging, size))

    def _take_staging(self, size: int) -> Buffer:
        if size > STAGING_BYTES:  # big read-backs (all logits) are rare: a buffer of their own
            return self.create_buffer(size, MAP_READ | COPY_DST, "read-back")
        return self._staging.pop() if self._staging else self.create_buffer(STAGING_BYTES, MAP_READ | COPY_DST,
                                                                            "read-back")

    def time_submit(self, dispatches: list[Dispatch]) -> float:
        """Submit and wait; return the GPU time of the pass in seconds (needs "timestamp-query")."""
        with self._calls():
            queries = self.device.create_query_set(type="timestamp", count=2)
            resolved = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE | COPY_SRC)
        writes = {"query_set": queries, "beginning_of_pass_write_index": 0, "end_of_pass_write_index": 1}
        self.submit(dispatches, timestamp_writes=writes)
        with self._calls():
            encoder = self.device.create_command_encoder()
            encoder.resolve_query_set(queries, 0, 2, resolved, 0)
            self.device.queue.submit([encoder.finish()])
        start, end = memoryview(self.read_buffer(resolved, 0, 16)).cast("Q")
        return (end - start) * 1e-9  # wgpu-native reports timestamps in nanoseconds
