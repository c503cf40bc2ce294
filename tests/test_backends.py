"""The one backend vocabulary (auto | webgpu | numpy) and its rules, on every host the same."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from test_scheduler import write_tiny_model

from realm_wasm.backends import choose
from realm_wasm.engine import Engine
from realm_wasm.errors import InvalidRequest
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.device import GPUUnavailable, UnsupportedOnGPU
from realm_wasm.models import build_plan

GPU = SimpleNamespace(name="Some GPU", is_fallback_adapter=False)
CPU_EMULATION = SimpleNamespace(name="llvmpipe", is_fallback_adapter=True)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_tiny_model(d / "f32.gguf")
    write_tiny_model(d / "f64.gguf", v_dtype=np.float64)
    return {name: (d / f"{name}.gguf", build_plan(read_gguf(d / f"{name}.gguf").header)) for name in ("f32", "f64")}


def test_the_rules(plans):
    _, plan = plans["f32"]
    assert choose("auto", plan.weights.values(), GPU).executor == "webgpu"
    assert choose("auto", plan.weights.values(), CPU_EMULATION).executor == "numpy"
    assert choose("webgpu", plan.weights.values(), CPU_EMULATION).executor == "webgpu"
    assert choose("numpy", plan.weights.values(), GPU).executor == "numpy"
    none = choose("auto", plan.weights.values(), None, "no adapter here")
    assert none.executor == "numpy" and "no adapter here" in none.note
    with pytest.raises(GPUUnavailable, match="no adapter here"):
        choose("webgpu", plan.weights.values(), None, "no adapter here")
    with pytest.raises(InvalidRequest, match="auto, webgpu, numpy"):
        choose("wgpu", plan.weights.values(), GPU)


def test_a_type_without_gpu_kernels_falls_back_to_numpy_by_name(plans):
    path, plan = plans["f64"]
    auto = choose("auto", plan.weights.values(), GPU)
    assert auto.executor == "numpy"
    assert "'blk.0.attn_v.weight' is F64, which has no GPU kernel" in auto.note
    with pytest.raises(UnsupportedOnGPU, match="blk.0.attn_v.weight' is F64"):
        choose("webgpu", plan.weights.values(), GPU)


def test_auto_runs_such_a_model_on_numpy_and_webgpu_refuses_it_in_one_line(plans, gpu):
    path, _ = plans["f64"]
    engine = Engine.load(path, backend="auto", n_ctx=32)
    assert engine.executor.name == "numpy"
    assert len([e for e in engine.generate("abc", 3, stop_at_eos=False) if e.token_id is not None]) == 3
    r = subprocess.run([sys.executable, "-m", "realm_server", "generate", "--model", str(path), "--prompt", "abc",
                        "--backend", "webgpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "is F64, which has no GPU kernel" in r.stderr
