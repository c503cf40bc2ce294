"""GPU execution: the host seam (`device.py`), WGSL composition (`compose.py`) and kernels.

Importable under Pyodide: only `native.py` (import it explicitly) touches wgpu-py.
"""

from .device import Device, DeviceLost, GPUUnavailable

__all__ = ["Device", "DeviceLost", "GPUUnavailable"]
