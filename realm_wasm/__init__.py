"""Realm runtime: GGUF models on WebGPU (browser, wgpu-py) or numpy, in pure Python."""

__version__ = "0.1.0"
