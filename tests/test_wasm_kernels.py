"""The page's quantized mat-vec kernel (web/kernels/matvec.wat, built as the bundle builds it) under
Node, against numpy: the dequantized weights (realm_wasm/quants.py, bit-exact with ggml) times the
activations rounded as ggml's quantize_row_q8_0 rounds them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from realm_wasm.gguf import TensorInfo
from realm_wasm.quants import QUANTS_BY_NAME, dequantize
from realm_wasm.wasm_kernels import TYPES, XQ_BLOCK, WasmMatmul, as_side_module

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("wasm_kernels.mjs")

# Where each type's f16 fields sit in its block; every other byte pattern is a valid block, so the
# weights below are random bytes with sane scales written over these fields.
F16_FIELDS = {"Q8_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "scripts" / "build_bundle.py")
    build_bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_bundle)
    path = tmp_path_factory.mktemp("kernel") / "matvec.wasm"
    path.write_bytes(build_bundle.assemble(ROOT / "web" / "kernels" / "matvec.wat"))
    return path


def random_weights(name: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    qt = QUANTS_BY_NAME[name]
    n = rows * k // qt.block_size
    blocks = rng.integers(0, 256, (n, qt.type_size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        blocks[:, at:at + 2] = (rng.standard_normal((n, 1)) * 0.02).astype("<f2").view(np.uint8)
    return blocks.reshape(rows, -1)


def round_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's Q8_0 rounding of x per 32-element block: (codes [n, 32], scales [n]), in float32."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return np.rint(blocks * inv[:, None]), d  # rint: ties to even, as f32x4.nearest


def run_kernel(kernel: Path, tmp: Path, name: str, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, bytes]:
    (tmp / "weights").write_bytes(w.tobytes())
    (tmp / "x").write_bytes(x.tobytes())
    job = {"type_id": QUANTS_BY_NAME[name].type_id, "rows": w.shape[0], "k": x.shape[1], "n_tok": x.shape[0],
           "row_bytes": w.shape[1], **{file: str(tmp / file) for file in ("weights", "x", "y", "xq")}}
    (tmp / "job.json").write_text(json.dumps(job))
    done = subprocess.run(["node", str(RUNNER), str(kernel), str(tmp / "job.json")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    y = np.frombuffer((tmp / "y").read_bytes(), np.float32).reshape(x.shape[0], w.shape[0])
    return y, (tmp / "xq").read_bytes()


def test_the_kernel_covers_the_bundled_models_types() -> None:
    # gemma-3-270m Q4_K_M: Q8_0, Q5_0, Q4_K, Q6_K; SmolLM2-135M-Instruct: Q4_1, Q8_0
    assert TYPES == {QUANTS_BY_NAME[n].type_id for n in F16_FIELDS}


# (type, K, tokens): every type on a few blocks (two super-blocks, or three blocks); then the shapes
# of the default model's K-quant and Q5_0 matrices, with more tokens
SHAPES = [(name, 512 if QUANTS_BY_NAME[name].block_size == 256 else 96, 3) for name in sorted(F16_FIELDS)]
SHAPES += [("Q4_K", 2048, 7), ("Q5_0", 640, 25)]


@pytest.mark.parametrize(("name", "k", "n_tok"), SHAPES)
def test_kernel_multiplies_the_weights_as_ggml_dequantizes_them(kernel: Path, tmp_path: Path, name: str, k: int,
                                                               n_tok: int) -> None:
    rng = np.random.default_rng(sum(map(ord, name)) + n_tok)
    rows = 37
    w = random_weights(name, rows, k, rng)
    x = (rng.standard_normal((n_tok, k)) * rng.uniform(0.1, 10, (n_tok, k // 32)).repeat(32, axis=1)).astype(np.float32)
    y, _ = run_kernel(kernel, tmp_path, name, w, x)

    weights = dequantize(w, QUANTS_BY_NAME[name].type_id, (rows, k)).astype(np.float64)
    q, d = round_activations(x)
    rounded = (q * d[:, None]).reshape(n_tok, k).astype(np.float64)
    # the integer products are exact: what is left is float32 accumulation
    expected = rounded @ weights.T
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # and against f32 x, the rounding error is what half a step of each block's scale can make
    exact = x.astype(np.float64) @ weights.T
    bound = (np.abs(weights).reshape(rows, k // 32, 32).sum(axis=2) @ (d.reshape(n_tok, -1).T / 2)).T
    assert np.all(np.abs(y - exact) <= bound * (1 + 1e-4))
    assert np.abs(y - exact).max() > 0  # it really rounds


def test_kernel_reads_every_finite_f16_scale(kernel: Path, tmp_path: Path) -> None:
    # one Q8_0 row per finite f16 (subnormals and both zeros included), each block's codes all 1
    bits = np.arange(1 << 16, dtype=np.uint32)
    bits = bits[(bits & 0x7C00) != 0x7C00].astype("<u2")
    w = np.ones((len(bits), 34), np.uint8)
    w[:, :2] = bits.view(np.uint8).reshape(-1, 2)
    x = np.linspace(-1, 2, 32, dtype=np.float32)[None, :]
    y, _ = run_kernel(kernel, tmp_path, "Q8_0", w, x)
    q, d = round_activations(x)
    expected = bits.view(np.float16).astype(np.float64) * float(d[0]) * q.sum()
    assert np.allclose(y[0], expected, rtol=1e-6, atol=0)  # signs too: no tolerance near 0


def test_rounded_activations_are_ggml_q8_0_blocks_with_their_sums(kernel: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 128)).astype(np.float32) * 3
    x[0, 32:64] = 0  # an all-zero block: scale 0, codes 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 15.5  # exact halves: rounding ties go to even
    _, xq = run_kernel(kernel, tmp_path, "Q8_0", random_weights("Q8_0", 1, 128, rng), x)
    blocks = np.frombuffer(xq, np.uint8).reshape(-1, XQ_BLOCK)
    codes = blocks[:, :64].copy().view("<i2")
    scales = blocks[:, 64:68].copy().view("<f4")[:, 0]
    sums = blocks[:, 68:72].copy().view("<f4")[:, 0]
    q, d = round_activations(x)
    assert np.array_equal(codes, q) and np.array_equal(scales, d)
    assert np.array_equal(sums, (d * q.sum(axis=1)).astype(np.float32))
    assert not codes[1].any() and scales[1] == 0
    assert np.abs(codes).max() == 127


def test_the_page_loads_the_kernel_as_an_emscripten_side_module() -> None:
    module = b"\0asm\x01\0\0\0" + b"\x01\x04\x01\x60\0\0"  # a header and one type section
    side = as_side_module(module)
    # Emscripten's getDylinkMetadata reads a custom section (id 0) named dylink.0 right after the header
    assert side[:8] == module[:8] and side[8] == 0 and side[10:19] == b"\x08dylink.0"
    assert side[9] == len(side) - len(module) - 2  # the section's size, as one LEB128 byte
    assert side[19:] == b"\x01\x04\0\0\0\0" + module[8:]  # MEM_INFO: no memory, no table of its own
    with pytest.raises(ValueError, match="not a WebAssembly module"):
        as_side_module(b"PK\x03\x04")


def test_matmul_without_tokens_or_with_the_wrong_width_never_reaches_the_kernel() -> None:
    class Unreachable:  # the kernel's loops run at least once: an empty product must not get there
        def __getattr__(self, name: str):
            def call(*args):
                raise AssertionError(f"{name}{args} called")
            return call

    matmul = WasmMatmul(Unreachable())
    t = TensorInfo("blk.0.ffn_up.weight", (64, 3), QUANTS_BY_NAME["Q8_0"].type_id, 0, 3 * 68)
    raw = np.zeros((3, 68), np.uint8)
    assert matmul.matmul_t(np.zeros((0, 64), np.float32), raw, t).shape == (0, 3)
    with pytest.raises(ValueError, match="rows of 32 values, blk.0.ffn_up.weight rows of 64"):
        matmul.matmul_t(np.zeros((1, 32), np.float32), raw, t)
