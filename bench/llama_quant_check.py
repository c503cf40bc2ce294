"""Realm next to llama.cpp on files made by llama.cpp's own quantizer from the default model.

    python bench/llama_quant_check.py                       # Q4_K_M (the control), TQ1_0, TQ2_0
    python bench/llama_quant_check.py --types Q1_0 Q2_0 --prompt "..." --steps 8 --variants

Written to explain why Realm's greedy text on ternary (TQ1_0 / TQ2_0) files differs from
llama.cpp's; it checks any type llama.cpp writes. Needs llama-cpp-python (../shared/ENVIRONMENT.md;
never a test dependency). For each file type it quantizes the default model (kept in --out-dir, default
$TMPDIR/realm-llama-quants), then:

1. Kernels: every quantized tensor of the file dequantized by Realm is compared bit for bit with
   ggml's own `dequantize_row_<type>` (from the libggml that llama-cpp-python ships, called through
   ctypes), and for the ternary types Realm's dot products with ggml's `ggml_vec_dot_tq*_q8_K` (the
   AVX2 kernel and the generic C one) on the same Q8_K-rounded activations.
2. Steps: for a prompt, llama.cpp's greedy logits next to Realm's numpy executor fed the same
   tokens, exact and with its activations rounded the way llama.cpp's CPU backend rounds them:
   each matmul input to the weight type's `vec_dot_type` (Q8_K, 8-bit codes with one f32 scale
   per 256 values, for K-quants, I-quants and TQ types; Q8_0 / Q8_1 for the 32-element types and
   Q1_0 / Q2_0; f16 for F16 weights). "exact vs rounded" is how far that rounding alone moves the logits.
3. Layers: how far apart the exact and rounded runs' residual streams are after every layer.

On the control file the rounding moves logits by about 1 and stays ~1-2% through the layers; on
the ternary files it grows layer by layer and moves logits by 10-20, many times llama.cpp's
top-1/top-2 margins, while the kernels agree with ggml's: the divergence is llama.cpp's own
rounding amplified by the ternary model, not a Realm bug. `--variants` adds llama.cpp's f16
GELU table and f16 attention queries to the rounding (each moves the ternary model's logits as much).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

import numpy as np

from realm_wasm.cpu import ACTIVATIONS, CpuExecutor
from realm_wasm.engine import Model
from realm_wasm.gguf import read_gguf
from realm_wasm.plan import Batch
from realm_wasm.quants import QUANTS_BY_ID, QUANTS_BY_NAME, dequantize

DEFAULT_MODEL = Path.home() / ".cache/realm/models/gemma-3-270m-q4_k_m.gguf"
FTYPES = {"TQ1_0": 36, "TQ2_0": 37, "Q1_0": 40, "Q2_0": 41}  # llama.h's llama_ftype values

# ggml-cpu's type_traits_cpu[...].vec_dot_type: what activations become before a dot product.
Q8_0_TYPES = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4", "NVFP4", "Q1_0", "Q2_0", "Q4_1", "Q5_1", "Q8_1"}  # or Q8_1
Q8_K_BYTES = 292


def q8_blocks(x: np.ndarray, size: int, k_scale: bool) -> np.ndarray:
    """x [T, K] through an 8-bit activation quantizer and back, per block of `size` values: Q8_K
    (k_scale: d = max / -127 with max the signed value of largest magnitude, in f32, codes rounded
    half to even and capped at 127, as quantize_row_q8_K_ref) or Q8_0 / Q8_1 (d = amax / 127
    rounded to f16, codes x / d rounded, as quantize_row_q8_0_ref)."""
    b = x.reshape(len(x), -1, size).astype(np.float32)
    if k_scale:
        peak = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)
        iscale = np.divide(np.float32(-127), peak, out=np.zeros_like(peak), where=peak != 0)
        q = np.minimum(np.rint(iscale * b), 127)
        d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    else:
        d = (np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float16).astype(np.float32)
        q = np.round(b * np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0))
    return (q * d).astype(np.float32).reshape(x.shape)


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def as_llama_sees_it(x: np.ndarray, type_name: str) -> np.ndarray:
    """The activations llama.cpp's CPU dot products use for a weight of `type_name`."""
    if type_name == "F32":
        return x
    if type_name == "F16":
        return f16(x)
    if type_name in Q8_0_TYPES:
        return q8_blocks(x, 32, k_scale=False)
    if QUANTS_BY_NAME[type_name].block_size == 256:
        return q8_blocks(x, 256, k_scale=True)
    raise NotImplementedError(f"llama.cpp's activation type for {type_name}")


def gelu_like_llama(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's GELU (GGML_GELU_FP16): a table of f16 results looked up by f16(x), for |x| < 10."""
    return np.where(x <= -10, 0, np.where(x >= 10, x, f16(ACTIVATIONS["gelu"](f16(x))))).astype(np.float32)


class RoundingCpuExecutor(CpuExecutor):
    """The numpy executor, optionally rounding like llama.cpp (`rounding`: "q8" matmul inputs,
    "gelu" the f16 GELU table, "q" f16 attention queries), keeping the residual stream after every
    layer of its last step."""

    def __init__(self, plan, weight_bytes, rounding: frozenset[str], n_ctx: int) -> None:
        super().__init__(plan, weight_bytes, n_slots=1, n_ctx=n_ctx)
        self.rounding = rounding
        self.type_of = {name: QUANTS_BY_ID[t.type_id].name for name, t in plan.weights.items()}
        self.layers: list[np.ndarray] = []

    def forward(self, batch):
        self.layers = []
        return super().forward(batch)

    def _matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        return (as_llama_sees_it(x, self.type_of[name]) if "q8" in self.rounding else x) @ self.w[name].T

    def _run(self, op, buf, batch):
        if op.kind == "matmul":
            return self._matmul(buf[op.ins[0]], op.weights[0])
        if op.kind == "glu":
            gate, up = (self._matmul(buf[op.ins[0]], name) for name in op.weights)
            act = gelu_like_llama if "gelu" in self.rounding and op.params["act"] == "gelu" else ACTIVATIONS[
                op.params["act"]]
            return act(gate) * up
        if op.kind == "attention" and "q" in self.rounding:  # K·q with f16 keys converts q to f16
            buf = {**buf, op.ins[0]: f16(buf[op.ins[0]])}
        out = super()._run(op, buf, batch)
        if op.kind == "add" and op.ins[1] == "f":  # the residual stream at the end of a layer
            self.layers.append(out[-1].astype(np.float64))
        return out


# ---------------------------------------------------------------------------------------------
# llama.cpp


def quantize(source: Path, ftype: str, out: Path) -> Path:
    import llama_cpp

    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[ftype]
        params.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize({ftype}) failed")
    return out


def llama_greedy(path: Path, prompt: str, ids: list[int], steps: int) -> list[np.ndarray]:
    """llama.cpp's logits at each greedy step."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + steps + 8, n_threads=2, logits_all=True, verbose=False)
    if llm.tokenize(prompt.encode(), add_bos=True) != ids:
        raise RuntimeError("llama.cpp tokenizes the prompt differently")
    llm.eval(ids)
    logits = []
    for _ in range(steps):
        logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
        llm.eval([int(np.argmax(logits[-1]))])
    return logits


def ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(libggml-base, libggml-cpu) as llama-cpp-python ships them, the CPU backend initialised (its
    f16 conversion table: without it every f16 scale reads as 0)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base, cpu = ctypes.CDLL(str(lib / "libggml-base.so")), ctypes.CDLL(str(lib / "libggml-cpu.so"))
    cpu.ggml_cpu_init()
    return base, cpu


def check_kernels(f, rng: np.random.Generator) -> None:
    """Realm's dequantization of every quantized tensor against ggml's, bit for bit; for ternary
    tensors, Realm's dot products against ggml's TQ x Q8_K kernels on the same activations."""
    base, cpu = ggml_libs()
    ptr = ctypes.c_void_p
    for t in f.tensors.values():
        qt = QUANTS_BY_ID[t.type_id]
        if qt.block_size == 1:
            continue
        raw = np.ascontiguousarray(f.tensor_bytes(t))
        k, n = t.dims[0], int(np.prod(t.dims[1:]))
        ours = dequantize(raw, t.type_id, (n, k))
        theirs = np.empty(n * k, np.float32)
        ggml_name = qt.name.lower().replace("_k", "_K")  # ggml's spelling: q4_K, q8_0, tq1_0
        getattr(base, f"dequantize_row_{ggml_name}")(raw.ctypes.data_as(ptr), theirs.ctypes.data_as(ptr),
                                                     ctypes.c_int64(n * k))
        if not np.array_equal(theirs.view(np.uint32), ours.reshape(-1).view(np.uint32)):
            raise AssertionError(f"{t.name} ({qt.name}): Realm's dequantization differs from ggml's")
        if not qt.name.startswith("TQ"):
            continue
        x = (rng.standard_normal(k) * 3).astype(np.float32)
        q8 = np.zeros(k // 256 * Q8_K_BYTES, np.uint8)
        cpu.quantize_row_q8_K(x.ctypes.data_as(ptr), q8.ctypes.data_as(ptr), ctypes.c_int64(k))
        xq = dequantize(q8, QUANTS_BY_NAME["Q8_K"].type_id, (k,)).astype(np.float64)
        assert np.array_equal(xq, q8_blocks(x[None], 256, k_scale=True)[0]), "Q8_K rounding differs from ggml's"
        worst = {}
        for kernel in (f"ggml_vec_dot_{qt.name.lower()}_q8_K", f"ggml_vec_dot_{qt.name.lower()}_q8_K_generic"):
            errors = []
            for r in range(0, n, max(1, n // 64)):
                s = ctypes.c_float()
                row = ctypes.c_void_p(raw.ctypes.data + r * (k // qt.block_size * qt.type_size))
                getattr(cpu, kernel)(ctypes.c_int(k), ctypes.byref(s), ctypes.c_size_t(0), row, ctypes.c_size_t(0),
                                     q8.ctypes.data_as(ptr), ctypes.c_size_t(0), ctypes.c_int(1))
                errors.append(abs(s.value - ours[r] @ xq) / (np.abs(ours[r]) @ np.abs(xq)))
            worst[kernel] = max(errors)
        print(f"  {t.name:28} {qt.name}: dequantization = ggml's; dot products vs "
              + ", ".join(f"{name.removeprefix('ggml_vec_dot_')} {err:.1e}" for name, err in worst.items()))
    print("  every quantized tensor dequantizes bit for bit as ggml's dequantize_row_*")


# ---------------------------------------------------------------------------------------------
# Realm next to llama.cpp


def realm_steps(executor: RoundingCpuExecutor, ids: list[int], steps: int,
                forced: list[int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Realm's logits at each step, feeding its own greedy token (or `forced`: llama.cpp's), and the
    residual stream after each layer at the last prompt token."""
    executor.cache = type(executor.cache)(executor.plan, 1, executor.cache.n_ctx)  # an empty KV cache
    logits = [executor.forward(Batch.for_sequence(ids, 0))[-1]]
    layers = executor.layers
    for n in range(1, steps):
        token = forced[n - 1] if forced else int(np.argmax(logits[-1]))
        logits.append(executor.forward(Batch.for_sequence([token], len(ids) + n - 1))[-1])
    return logits, layers


def top2(v: np.ndarray) -> tuple[int, int, float]:
    a, b = np.argsort(v)[-2:][::-1]
    return int(a), int(b), float(v[a] - v[b])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def report(path: Path, prompt: str, steps: int, variants: bool) -> None:
    f = read_gguf(path)
    model = Model.from_header(f.header)
    decode = model.tokenizer.decode
    kinds = sorted({QUANTS_BY_ID[t.type_id].name for t in model.plan.weights.values()})
    ids = model.tokenizer.encode(prompt)
    print(f"\n== {path.name}: weight types {kinds}, prompt {prompt!r} -> {ids}")
    check_kernels(f, np.random.default_rng(0))
    ref = llama_greedy(path, prompt, ids, steps)
    ref_ids = [int(np.argmax(v)) for v in ref]
    n_ctx = len(ids) + steps + 8
    runs = {name: RoundingCpuExecutor(model.plan, f.tensor_bytes, frozenset(r), n_ctx)
            for name, r in (("exact", ()), ("rounded", ("q8",)))}
    # forced on llama.cpp's tokens, so every step of every run sees the same context
    (exact, layers_exact), (rounded, layers_rounded) = (realm_steps(ex, ids, steps, ref_ids) for ex in runs.values())
    print("step  llama.cpp top-1 (margin over top-2)  | Realm exact     | Realm, activations   | exact vs")
    print("                                           | top-1, max|dl|  | rounded: top-1 |dl|  | rounded |dl|")
    for n, v in enumerate(ref):
        a, b, margin = top2(v)
        tops = [int(np.argmax(w)) for w in (exact[n], rounded[n])]
        cells = [f"{'=' if t == a else 'x'} {decode([t])!r:9} {np.abs(w - v).max():5.2f}"
                 for t, w in zip(tops, (exact[n], rounded[n]), strict=True)]
        print(f"{n:4}  {decode([a])!r:10} ({margin:5.2f} over {decode([b])!r:10}) | {cells[0]} | {cells[1]}      "
              f"| {np.abs(exact[n] - rounded[n]).max():5.2f}")
    growth = " ".join(f"{rel(r, e):.3f}" for r, e in zip(layers_rounded, layers_exact, strict=True))
    print(f"residual stream after each layer, |rounded - exact| / |exact| (last prompt token): {growth}")
    print(f"logits at the last prompt token, relative to |exact|: |rounded - exact| {rel(rounded[0], exact[0]):.3f}, "
          f"|llama.cpp - exact| {rel(ref[0], exact[0]):.3f}, |llama.cpp - rounded| {rel(ref[0], rounded[0]):.3f}")
    if variants:
        for rounding in (("q8", "gelu"), ("q8", "gelu", "q")):
            logits, _ = realm_steps(RoundingCpuExecutor(model.plan, f.tensor_bytes, frozenset(rounding), n_ctx),
                                    ids, steps, ref_ids)
            agree = "".join("=" if int(np.argmax(w)) == t else "x" for w, t in zip(logits, ref_ids, strict=True))
            print(f"rounding {'+'.join(rounding):9}: top-1 per step {agree}, max|dlogit| vs llama.cpp "
                  + " ".join(f"{np.abs(w - v).max():.1f}" for w, v in zip(logits, ref, strict=True)))
    for name, ex in runs.items():
        print(f"greedy Realm {name:8}: {decode([int(np.argmax(v)) for v in realm_steps(ex, ids, steps)[0]])!r}")
    print(f"greedy llama.cpp     : {decode(ref_ids)!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "TQ1_0", "TQ2_0"], choices=["Q4_K_M", *FTYPES],
                    help="file types to compare (Q4_K_M: the default model file itself, the control)")
    ap.add_argument("--prompt", default="The capital of Italy is")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", action="store_true", help="also round GELU and attention queries as llama.cpp")
    # not the models folder: the server lists every file there
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "realm-llama-quants")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for ftype in args.types:
        path = args.model if ftype == "Q4_K_M" else quantize(
            args.model, ftype, args.out_dir / f"gemma-3-270m-{ftype.lower()}.gguf")
        report(path, args.prompt, args.steps, args.variants)


if __name__ == "__main__":
    main()
