"""WGSL composition: WGSL has no #include, so a pipeline's source is assembled here.

A pipeline = host directives + `alias F` (the arithmetic type: f16 or f32) + `const` declarations
(shape and tile sizes, baked in so the compiler can unroll and fold) + shader files concatenated
in order, e.g. blocks.wgsl + dequant_q4_k.wgsl + reduce_subgroup.wgsl + matvec.wgsl, + readers of the
lookup tables (`TABLES`) those files use. Composed pipelines are cached per device, so building the same
kernel twice costs nothing.
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..quants import GRIDS
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

# Lookup tables a dequant snippet may read: the I-quant codebooks, packed from the very arrays
# realm_wasm/quants.py dequantizes with, so shaders and numpy cannot drift apart. They are not WGSL
# constant arrays: lavapipe's compile time grows with the square of their length (a 2048-word one
# took ~100 s, 256 words ~2 s). They travel instead at the end of each binding of a weight whose
# snippet names them (matmul.allocate_weight appends `table_tail`), and the composer declares, for
# each one a pipeline uses, `fn <name>(i: u32) -> u32` returning its word i.
# Name (a quants.GRIDS key) -> (bits per value, offset added to each value to make a code >= 0);
# values are packed row after row, lowest bits first: a grid row of 8 bytes is two words.
TABLES = {
    "iq2xxs_grid": (8, 0),
    "iq2xs_grid": (8, 0),
    "iq2s_grid": (8, 0),
    "iq3xxs_grid": (8, 0),
    "iq3s_grid": (8, 0),
    "iq1s_grid": (4, 1),  # ternary values: nibble = value + 1, one row per word
}


@functools.cache
def shader_source(name: str) -> str:
    """Text of `shaders/<name>`: the one place shader files are read (a bundle may replace it)."""
    return (SHADER_DIR / name).read_text()


def wgsl_const(name: str, value: bool | int | float) -> str:
    literal = {bool: str(value).lower(), int: f"{value}u", float: f"{value!r}"}[type(value)]
    return f"const {name}: {CONST_TYPES[type(value)]} = {literal};"


@functools.cache
def table_words(name: str) -> np.ndarray:
    """Lookup table `name` (see TABLES) as little-endian u32 words."""
    bits, offset = TABLES[name]
    codes = (GRIDS[name].astype(np.int64) + offset).reshape(-1, 32 // bits)
    return (codes << np.arange(0, 32, bits)).sum(axis=1).astype("<u4")


def tables_used(source: str) -> list[str]:
    """The TABLES that WGSL `source` reads (names outside comments), in TABLES order: the order in
    which they end a weight binding."""
    code = re.sub(r"//.*", "", source)
    return [name for name in TABLES if re.search(rf"\b{name}\b", code)]


def table_tail(snippet: str) -> bytes:
    """What follows the blocks in every binding of a weight read by dequant snippet `snippet`."""
    return b"".join(table_words(name).tobytes() for name in tables_used(shader_source(snippet)))


def table_readers(names: Sequence[str]) -> list[str]:
    """WGSL functions reading the tables `names` from the end of the weight binding `w` (blocks.wgsl)."""
    readers, from_end = [], 0
    for name in reversed(names):
        from_end += len(table_words(name))
        readers.append(f"fn {name}(i: u32) -> u32 {{ return w[arrayLength(&w) - {from_end}u + i]; }}")
    return readers


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
    sources = [shader_source(part) for part in parts]
    lines += table_readers(tables_used("\n".join(sources)))
    return "\n".join(lines + sources)


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
