"""Where the GPU executor's weights come from.

Matrices live on the device in their GGML bytes (`GpuWeight`); small vectors (norm weights, RoPE
frequency factors) are dequantized on the host. `FileWeights` uploads from a GGUF file's bytes when
first asked; the browser fills `StreamedWeights` from the download stream as bytes arrive, so a
model never sits whole in the wasm heap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..gguf import TensorInfo
from ..quants import dequantize, quant_type
from .device import Device
from .matmul import GpuWeight, allocate_weight, row_bytes, upload_weight, write_weight

MAX_HOST_VECTOR = 1 << 20  # elements: 1-D tensors (norms) stay on the host until their kernels are built


def matrix_shape(t: TensorInfo) -> tuple[int, int]:
    """A tensor as [rows, row length] (higher dims folded into rows)."""
    return int(np.prod(t.shape[:-1], dtype=np.int64)), t.shape[-1]


class DeviceMatrices:
    """The matrices a store holds on the device, by tensor name."""

    device: Device
    matrices: dict[str, GpuWeight]

    def release(self, t: TensorInfo) -> None:
        """Free a matrix whose bytes were copied elsewhere on the device (a GLU's joined gate and up
        weights): queued work that reads it still completes, in WebGPU and wgpu alike."""
        for chunk in self.matrices.pop(t.name).chunks:
            self.device.destroy_buffer(chunk.buffer)


class FileWeights(DeviceMatrices):
    """Weights read from a GGUF file (memory-mapped) and uploaded on first use."""

    def __init__(self, device: Device, weight_bytes: Callable[[TensorInfo], np.ndarray]) -> None:
        self.device, self.weight_bytes = device, weight_bytes
        self.matrices: dict[str, GpuWeight] = {}

    def matrix(self, t: TensorInfo) -> GpuWeight:
        if t.name not in self.matrices:
            n, k = matrix_shape(t)
            data = memoryview(np.ascontiguousarray(self.weight_bytes(t)))
            self.matrices[t.name] = upload_weight(self.device, quant_type(t.type_id), n, k, data, label=t.name)
        return self.matrices[t.name]

    def vector(self, t: TensorInfo) -> np.ndarray:
        return dequantize(self.weight_bytes(t), t.type_id, t.shape).reshape(-1)


class StreamedWeights(DeviceMatrices):
    """Weights filled piece by piece from a stream of the GGUF file's bytes (`feed`).

    Matrices (2-D tensors) get device buffers up front and each piece of the stream is written
    straight into them; 1-D tensors are collected on the host (they are small). A split model's
    later shards `add` their tensors (offsets counted across the shards) as their headers arrive.
    """

    def __init__(self, device: Device, tensors: Iterable[TensorInfo] = ()) -> None:
        self.device = device
        self.matrices: dict[str, GpuWeight] = {}
        self.host: dict[str, bytearray] = {}
        self.spans: list[tuple[int, int, TensorInfo]] = []
        self.carry = b""  # bytes held back so device writes stay word-aligned
        self.received = 0
        self.viewed: dict[str, int] = {}  # file tensor -> bytes of it copied into row views so far
        self.add(tensors)

    def add(self, tensors: Iterable[TensorInfo]) -> None:
        """Make room for `tensors`, whose bytes lie ahead in the stream."""
        for t in tensors:
            if len(t.dims) == 1:
                if t.dims[0] > MAX_HOST_VECTOR:
                    raise ValueError(f"1-D tensor {t.name!r} of {t.dims[0]} elements is too large for the host")
                self.host[t.name] = bytearray(t.nbytes)
            else:
                n, k = matrix_shape(t)
                self.matrices[t.name] = allocate_weight(self.device, quant_type(t.type_id), n, k, label=t.name)
            self.spans.append((t.offset, t.offset + t.nbytes, t))
        self.spans.sort(key=lambda span: span[:2])

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        """Bytes [offset, offset + len(data)) of the file, in order (offset == bytes fed so far)."""
        if offset != self.received:
            raise ValueError(f"stream piece at {offset}, expected {self.received}")
        self.received += len(data)
        data = memoryview(data).cast("B")
        for start, end, t in self.spans:
            lo, hi = max(start, offset), min(end, offset + len(data))
            if lo >= hi:
                continue
            piece = data[lo - offset:hi - offset]
            if t.name in self.host:
                self.host[t.name][lo - start:hi - start] = piece
            else:
                self._write(t, lo - start, piece)

    def _write(self, t: TensorInfo, at: int, piece: memoryview) -> None:
        # device writes must start and end on 4-byte boundaries (except at the tensor's end):
        # hold back a piece's unaligned tail and prepend it to the next
        start = at - len(self.carry)
        buf = self.carry + bytes(piece) if self.carry else piece
        end = start + len(buf)
        cut = len(buf) if end == t.nbytes else len(buf) - end % 4
        if cut:
            write_weight(self.device, self.matrices[t.name], start, buf[:cut])
        self.carry = bytes(buf[cut:])

    def matrix(self, t: TensorInfo) -> GpuWeight:
        if t.name not in self.matrices:  # a row view of a file tensor (models.hparams.row_view)
            self.matrices[t.name] = self._copy_rows(t)
        return self.matrices[t.name]

    def _copy_rows(self, t: TensorInfo) -> GpuWeight:
        """A view's rows copied on the device out of the streamed tensor that holds them (buffer
        copies move whole words: rows must start and end on them); once all its rows are in views,
        that tensor's buffers are freed, so a fused tensor costs its size once, not twice."""
        parent = next((p for start, end, p in self.spans
                       if p.name in self.matrices and start <= t.offset and t.offset + t.nbytes <= end), None)
        if parent is None:
            raise KeyError(f"no streamed tensor holds {t.name!r}")
        src = self.matrices[parent.name]
        n, k = matrix_shape(t)
        rb = row_bytes(src.quant, k)
        first = (t.offset - parent.offset) // rb
        view = allocate_weight(self.device, src.quant, n, k, label=t.name)
        copies = []
        for dst in view.chunks:
            for c in src.chunks:  # parent rows [lo, hi) land at view row lo - first
                lo, hi = max(first + dst.row0, c.row0), min(first + dst.row0 + dst.rows, c.row0 + c.rows)
                if lo < hi:
                    copies.append(((c.buffer, (lo - c.row0) * rb, (hi - lo) * rb),
                                   (dst.buffer, (lo - first - dst.row0) * rb, (hi - lo) * rb)))
        if any(at % 4 or size % 4 for part in copies for _, at, size in part):
            raise ValueError(f"{t.name}: rows of {rb} bytes do not start on 4-byte boundaries; "
                             "the GPU cannot take this view in the page")
        self.device.submit([], copies=copies)
        # a tensor whose every row went to views is freed: the plan reads the views, never it
        self.viewed[parent.name] = self.viewed.get(parent.name, 0) + t.nbytes
        if self.viewed[parent.name] == parent.nbytes:
            for c in src.chunks:
                self.device.destroy_buffer(c.buffer)
            del self.matrices[parent.name]
        return view

    def vector(self, t: TensorInfo) -> np.ndarray:
        return dequantize(np.frombuffer(self.host[t.name], np.uint8), t.type_id, t.shape).reshape(-1)
