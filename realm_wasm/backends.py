"""Which executor runs a model: the one vocabulary of the CLI, the API and the page.

    auto     WebGPU on a hardware adapter; numpy where there is none, where the adapter is a CPU
             emulation (lavapipe, SwiftShader: numpy decodes several times faster there), or where
             the model needs something no GPU kernel does (`UnsupportedOnGPU`, named in the note)
    webgpu   WebGPU (wgpu-py natively, navigator.gpu in the page), or an error saying why not
    numpy    the numpy executor on the CPU

Each host makes its own device (`gpu/native.py`, `gpu/browser.py`) and hands it here; `choose`
decides with the same rules everywhere and says why in a note the CLI, the API and the page show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import InvalidRequest
from .gguf import TensorInfo
from .gpu.device import Device, GPUUnavailable, UnsupportedOnGPU
from .quants import quant_type

BACKENDS = ("auto", "webgpu", "numpy")


@dataclass(frozen=True)
class Choice:
    executor: str  # "webgpu" | "numpy"
    note: str  # why, for people: "WebGPU on NVIDIA H200", "no WebGPU (...): numpy executor on the CPU"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InvalidRequest(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})")
    return backend


def check_gpu_support(weights: Iterable[TensorInfo]) -> None:
    """Raise UnsupportedOnGPU naming the first matrix whose type no WGSL kernel reads (1-D tensors
    are dequantized on the host, so any type does there)."""
    for t in weights:
        qt = quant_type(t.type_id)
        if len(t.dims) > 1 and qt.shader is None:
            raise UnsupportedOnGPU(f"tensor {t.name!r} is {qt.name}, which has no GPU kernel yet")


def choose(backend: str, weights: Iterable[TensorInfo], device: Device | None, unavailable: str = "") -> Choice:
    """The executor for a model's `weights` (a plan's, or a header's tensors: the page chooses from a
    split model's first shard); `device` is the host's WebGPU device, or None with `unavailable`
    saying why there is none. Raises what stops an explicit "webgpu" from working."""
    check_backend(backend)
    if backend == "numpy":
        return Choice("numpy", "numpy executor on the CPU (asked for)")
    if device is None:
        if backend == "webgpu":
            raise GPUUnavailable(unavailable or "no WebGPU device")
        return Choice("numpy", f"no WebGPU ({unavailable}): numpy executor on the CPU")
    try:
        check_gpu_support(weights)
    except UnsupportedOnGPU as e:
        if backend == "webgpu":
            raise
        return Choice("numpy", f"{e}: numpy executor on the CPU")
    if backend == "auto" and device.is_fallback_adapter:
        return Choice("numpy", f"WebGPU adapter is a CPU fallback ({device.name}): using the numpy executor")
    return Choice("webgpu", f"WebGPU on {device.name}")
