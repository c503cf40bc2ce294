"""WebAssembly SIMD kernels for the numpy executor inside Pyodide: x @ Wᵀ straight from GGML bytes.

Pyodide only (it imports `js`); `realm_web_host.py` gives one to its CpuExecutor, natively the
executor keeps its numpy path (cpu.py).

Why hand-written WebAssembly: inside Pyodide, numpy has no BLAS (a 4096x4096 f32 mat-vec takes
40-75 ms, ~0.3 GMAC/s) and must dequantize a weight to f32 before it can multiply, so the default
model decoded at 1.3-1.8 tok/s, most of it in its 262,144-row Q8_0 output head. A compiled Python
extension cannot be added to the page: Pyodide loads only the wheels built with its own Emscripten
toolchain, and the runtime must stay a zip of Python sources. A WebAssembly module is the one
compiled thing a page may load. So web/kernels/matvec.wat, hand-written in the text format
(scripts/build_bundle.py assembles it with wabt), does the dot products and nothing else; all of
the model's logic stays in Python. It rounds x to 8 bits per 32-element block and multiplies the
integer codes of the weight blocks with i32x4.dot_i16x8_s, as llama.cpp does: in Chromium here that
beat widening the weights to f32 (Q8_0: 9-10 against ~5 GMAC/s).

In place, by address: the module imports Pyodide's own linear memory, so it reads the GGUF bytes
where HeapWeights keeps them and writes into a numpy array; nothing is copied or dequantized, and
the wasm heap holds about the file plus activations. Pyodide 0.27 does not hand out its
WebAssembly.Memory, but its dynamic linker passes it to every side module it loads: the kernel is
loaded as one (`_module.loadWebAssemblyModule`, how Pyodide loads numpy's own .so files) after a
`dylink.0` section declaring that it needs no memory or table of its own is put in front.

One thread: Pyodide's memory is not shared (no SharedArrayBuffer; Pyodide 0.27 has no threads), so no
second worker can read these weights. Two threads would take the weights in a shared
WebAssembly.Memory of the kernel's own (the page served cross-origin isolated, COOP/COEP), a second
worker instantiating this same module over it to compute half of every matmul's rows, and an
Atomics.wait/notify handoff of x and y per matmul (~130 a token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .gguf import TensorInfo
from .quants import QUANTS_BY_NAME

KERNEL = Path(__file__).resolve().parents[1] / "kernels" / "matvec.wasm"  # in the bundle (build_bundle.py)
TYPES = frozenset(QUANTS_BY_NAME[name].type_id for name in ("Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"))
XQ_BLOCK = 72  # bytes of one rounded 32-element block of x (matvec.wat's layout)

# A side module's marker for Emscripten's loader: custom section "dylink.0" with one MEM_INFO
# subsection (id 1, 4 bytes): memory size, memory alignment, table size, table alignment, all 0.
_DYLINK = b"\x00\x0f" + b"\x08dylink.0" + b"\x01\x04\x00\x00\x00\x00"


def address(a: np.ndarray) -> int:
    """Where a C-contiguous array's data starts in the wasm heap."""
    return a.__array_interface__["data"][0]


def as_side_module(binary: bytes) -> bytes:
    """`binary` with the dylink.0 section Emscripten's loader wants first (after the 8-byte header)."""
    if binary[:4] != b"\0asm":
        raise ValueError("not a WebAssembly module")
    return binary[:8] + _DYLINK + binary[8:]


class WasmMatmul:
    """x @ Wᵀ for the weight types of TYPES, with the kernel's exports (cpu.QuantizedMatmul)."""

    def __init__(self, exports: Any) -> None:
        self._quantize, self._matmul = exports.realm_quantize, exports.realm_matmul
        self._xq = np.empty(0, np.uint8)  # the rounded activations, reused from call to call

    @classmethod
    def load(cls, path: Path = KERNEL) -> WasmMatmul:
        import js
        import pyodide_js
        from pyodide.ffi import to_js

        flags = to_js({"loadAsync": False, "nodelete": True}, dict_converter=js.Object.fromEntries)
        exports = pyodide_js._module.loadWebAssemblyModule(to_js(as_side_module(path.read_bytes())), flags,
                                                           path.name, js.Object.new())
        return cls(exports)

    def supports(self, type_id: int) -> bool:
        return type_id in TYPES

    def matmul_t(self, x: np.ndarray, raw: np.ndarray, t: TensorInfo) -> np.ndarray:
        """x [T, K] float32 @ Wᵀ for W [rows, K] in its GGML bytes `raw` [rows, row bytes]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n_tok, k = x.shape
        if k != t.shape[1]:
            raise ValueError(f"x has rows of {k} values, {t.name} rows of {t.shape[1]}")
        if n_tok == 0 or k == 0:  # nothing to multiply (the kernel's loops run at least once)
            return np.zeros((n_tok, t.shape[0]), np.float32)
        blocks = k // 32  # K fills whole blocks: the GGUF parser checked it (256 for K-quants)
        if self._xq.size < n_tok * blocks * XQ_BLOCK:
            self._xq = np.empty(n_tok * blocks * XQ_BLOCK, np.uint8)
        y = np.empty((n_tok, t.shape[0]), np.float32)
        raw = np.ascontiguousarray(raw)
        self._quantize(address(x), address(self._xq), n_tok * blocks)
        self._matmul(t.type_id, address(raw), raw.shape[1], address(self._xq), address(y), t.shape[0], blocks, n_tok)
        return y
