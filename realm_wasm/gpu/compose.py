"""WGSL composition: WGSL has no #include, so a pipeline's source is assembled here.

A pipeline = host directives + `alias F` (the arithmetic type: f16 or f32) + `const` declarations
(shape and tile sizes, baked in so the compiler can unroll and fold) + shader files concatenated
in order, e.g. blocks.wgsl + dequant_q4_k.wgsl + reduce_subgroup.wgsl + matvec.wgsl.
Composed pipelines are cached per device, so building the same kernel twice costs nothing.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from .device import Device, Pipeline

SHADER_DIR = Path(__file__).resolve().parents[2] / "shaders"

# Directives a host's compiler needs before a feature is used. Naga (wgpu-py) rejects
# `enable subgroups;` and needs only the device feature; Tint (Chromium) requires the directive.
DIRECTIVES = {
    ("naga", "shader-f16"): "enable f16;",
    ("tint", "shader-f16"): "enable f16;",
    ("tint", "subgroups"): "enable subgroups;",
}

CONST_TYPES = {bool: "bool", int: "u32", float: "f32"}


@functools.cache
def shader_source(name: str) -> str:
    """Text of `shaders/<name>`: the one place shader files are read (a bundle may replace it)."""
    return (SHADER_DIR / name).read_text()


def wgsl_const(name: str, value: bool | int | float) -> str:
    literal = {bool: str(value).lower(), int: f"{value}u", float: f"{value!r}"}[type(value)]
    return f"const {name}: {CONST_TYPES[type(value)]} = {literal};"


def compose(
    host: str,
    parts: Sequence[str],
    consts: Mapping[str, bool | int | float],
    *,
    f16: bool = False,
    subgroups: bool = False,
) -> str:
    """Full WGSL source for `host` ("naga" or "tint") from shader files `parts`, in order."""
    used = [feature for feature, on in (("shader-f16", f16), ("subgroups", subgroups)) if on]
    lines = [DIRECTIVES[host, feature] for feature in used if (host, feature) in DIRECTIVES]
    lines.append(f"alias F = {'f16' if f16 else 'f32'};")
    lines += [wgsl_const(name, value) for name, value in consts.items()]
    return "\n".join(lines + [shader_source(part) for part in parts])


_pipelines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pipeline(
    device: Device,
    parts: Sequence[str],
    consts: Mapping[str, bool | int | float],
    *,
    f16: bool = False,
    subgroups: bool = False,
    label: str = "",
) -> Pipeline:
    """The compute pipeline (entry point `main`) for a composed source, built once per device."""
    for feature, on in (("shader-f16", f16), ("subgroups", subgroups)):
        if on and feature not in device.features:
            raise ValueError(f"pipeline {label or parts[-1]!r} needs {feature!r}, which this device lacks")
    source = compose(device.host, parts, consts, f16=f16, subgroups=subgroups)
    cache = _pipelines.setdefault(device, {})
    if source not in cache:
        cache[source] = device.create_pipeline(source, "main", label)
    return cache[source]
