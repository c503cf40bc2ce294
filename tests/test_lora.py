"""LoRA adapters: loading llama.cpp's GGUF adapters, the side path on numpy and on the GPU.

The oracle is the model with the adapters merged into its weights (W + scale · alpha / rank · B·A,
computed here in float64 from the values the test wrote), run by the numpy executor one sequence
at a time; the executors under test never merge, and batch sequences with different adapters.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from golden import LORA_GOLDEN_DIR
from test_gpu_executor import GEMMA_LAYERS, decode_dispatches, dispatches_per_layer, make_gemma3
from test_llama import make_model

from realm_wasm.cpu import CpuExecutor
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.gpu.fuse import describe
from realm_wasm.gpu.matmul import QuantMatmul
from realm_wasm.gpu.tuning import tuning_for
from realm_wasm.lora import BadAdapter, adaptable_weights, read_adapter
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch, lora_table
from realm_wasm.quants import dequantize

Q = gguf.GGMLQuantizationType
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def stored(values: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what to write, the float32 values a reader gets back) for a tensor stored as qtype."""
    if qtype == Q.F32:
        return values, values
    if qtype == Q.F16:
        return values.astype(np.float16), values.astype(np.float16).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(values.shape)


def write_adapter(path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], alpha: float | None = None,
                  general_type: str = "adapter") -> None:
    """A GGUF file as llama.cpp's convert_lora_to_gguf.py writes it: `tensors` by their full names."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", general_type)
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for name, (values, qtype) in tensors.items():
        data, _ = stored(values, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@dataclasses.dataclass
class WrittenAdapter:
    """An adapter file the test wrote, and the exact deltas B·A · alpha / rank it means."""

    path: str
    deltas: dict[str, np.ndarray]  # weight -> float64 [n_out, n_in]


def make_adapter(path, plan, weights, rank: int, rng, alpha: float | None = None,
                 types: tuple[Q, Q] = (Q.F32, Q.F32), arch: str | None = None) -> WrittenAdapter:
    tensors, deltas = {}, {}
    for name in weights:
        n_in, n_out = plan.weights[name].dims
        a = (rng.standard_normal((rank, n_in)) * 0.2).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * 0.2).astype(np.float32)
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = (a, types[0]), (b, types[1])
        (_, a), (_, b) = stored(a, types[0]), stored(b, types[1])
        deltas[name] = b.astype(np.float64) @ a.astype(np.float64) * (alpha / rank if alpha else 1.0)
    write_adapter(path, arch or plan.arch, tensors, alpha)
    return WrittenAdapter(str(path), deltas)


def merged_executor(f, plan, applied: list[tuple[WrittenAdapter, float]], n_ctx: int = 64) -> CpuExecutor:
    """The oracle: a numpy executor of the model with these (adapter, scale) merged into its weights."""
    merged = {}
    for adapter, scale in applied:
        for name, delta in adapter.deltas.items():
            t = plan.weights[name]
            base = merged.get(name, dequantize(f.tensor_bytes(t), t.type_id, t.shape).astype(np.float64))
            merged[name] = base + scale * delta
    merged = {name: w.astype(np.float32) for name, w in merged.items()}
    infos = {name: dataclasses.replace(t, type_id=int(Q.F32), nbytes=4 * int(np.prod(t.dims)))
             if name in merged else t for name, t in plan.weights.items()}

    def weight_bytes(t):
        return merged[t.name].view(np.uint8).reshape(-1) if t.name in merged else f.tensor_bytes(t)

    return CpuExecutor(dataclasses.replace(plan, weights=infos), weight_bytes, n_ctx=n_ctx)


def all_projections(plan, layers) -> list[str]:
    return [f"blk.{i}.{p}.weight" for i in layers for p in PROJECTIONS]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "gemma3.gguf"
    make_gemma3(path, np.random.default_rng(3))
    f = read_gguf(path)
    return f, build_plan(f.header)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "llama.gguf"
    make_model(path, np.random.default_rng(7), Q.Q4_0, True, False)  # gate Q4_0, up Q5_1: not joinable
    f = read_gguf(path)
    return f, build_plan(f.header)


# Four sequences of one step: two adapters alone, both at once, and none.
SEQUENCES = [([3, 17, 42, 8, 8], ((0, 1.0),)), ([91, 0, 55, 23, 5], ((1, 0.5),)),
             ([6, 7, 8, 9, 10], ((0, 0.3), (1, 1.0))), ([4, 4, 10, 2, 77], ())]


def prefill_step(adapters: bool = True) -> Batch:
    n = len(SEQUENCES[0][0])
    rows = [lora for _, lora in SEQUENCES for _ in range(n)] if adapters else [()] * (n * len(SEQUENCES))
    return Batch(np.array([t for toks, _ in SEQUENCES for t in toks], np.int32),
                 np.tile(np.arange(n, dtype=np.int32), len(SEQUENCES)),
                 np.repeat(np.arange(len(SEQUENCES), dtype=np.int32), n),
                 np.arange(n * len(SEQUENCES), dtype=np.int32), *lora_table(rows))


def decode_step(adapters: bool = True) -> Batch:
    n = len(SEQUENCES)
    return Batch(np.array([11, 12, 13, 14], np.int32), np.full(n, len(SEQUENCES[0][0]), np.int32),
                 np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32),
                 *lora_table([lora for _, lora in SEQUENCES] if adapters else [()] * n))


def expected_logits(f, plan, adapters: list[WrittenAdapter]) -> list[np.ndarray]:
    """Each sequence alone on the merged model: its prefill logits then its decode step's."""
    out = []
    for i, (tokens, lora) in enumerate(SEQUENCES):
        oracle = merged_executor(f, plan, [(adapters[slot], scale) for slot, scale in lora])
        prefill = oracle.forward(Batch.for_sequence(tokens, 0, all_logits=True))
        decode = oracle.forward(Batch.for_sequence([11 + i], len(tokens)))
        out.append(np.concatenate([prefill, decode]))
    return out


def by_sequence(prefill: np.ndarray, decode: np.ndarray) -> list[np.ndarray]:
    n = len(SEQUENCES[0][0])
    return [np.concatenate([prefill[i * n:(i + 1) * n], decode[i:i + 1]]) for i in range(len(SEQUENCES))]


def close(got, want, atol: float) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * np.abs(want).max())


# --- loading --------------------------------------------------------------------------------------

def test_reads_llama_cpps_adapter_for_the_default_model():
    from realm_wasm.engine import Model
    from realm_wasm.model_files import default_model_path

    path = LORA_GOLDEN_DIR / "adapter.gguf"
    plan = Model.from_header(read_gguf(default_model_path()).header).plan
    adapter = read_adapter(path, plan, "golden")
    kinds = {name.split(".")[2] for name in adapter.pairs}
    assert (len(adapter.pairs), adapter.rank, adapter.alpha, kinds) == (72, 8, 8.0, {"attn_q", "attn_v", "ffn_up",
                                                                                     "ffn_down"})
    reference = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}  # another reader
    pair = adapter.pairs["blk.3.ffn_down.weight"]
    np.testing.assert_array_equal(pair.a, reference["blk.3.ffn_down.weight.lora_a"])
    np.testing.assert_array_equal(pair.b, reference["blk.3.ffn_down.weight.lora_b"] * np.float32(8.0 / 8))
    assert pair.a.shape == (8, 2048) and pair.b.shape == (640, 8)
    with open(path, "rb") as fh:
        from_bytes = read_adapter(fh.read(), plan)
    np.testing.assert_array_equal(from_bytes.pairs["blk.0.attn_q.weight"].b, adapter.pairs["blk.0.attn_q.weight"].b)
    assert "token_embd.weight" not in adaptable_weights(plan)  # embedding and tied output head


def test_alpha_over_rank_scales_b_and_no_alpha_leaves_it(gemma, tmp_path):
    plan = gemma[1]
    rng = np.random.default_rng(1)
    q = "blk.0.attn_q.weight"
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((128, 4)).astype(np.float32)
    for alpha, factor in ((16.0, 4.0), (None, 1.0), (0.0, 1.0)):  # llama.cpp: alpha 0 means "not given"
        write_adapter(tmp_path / "a.gguf", plan.arch, {q + ".lora_a": (a, Q.F32), q + ".lora_b": (b, Q.F32)}, alpha)
        pair = read_adapter(tmp_path / "a.gguf", plan).pairs[q]
        np.testing.assert_array_equal(pair.a, a)
        np.testing.assert_array_equal(pair.b, b * np.float32(factor))


def rejected(tmp_path, plan, tensors, match, arch=None, general_type="adapter", alpha=8.0):
    path = tmp_path / "bad.gguf"
    write_adapter(path, arch or plan.arch, tensors, alpha, general_type)
    with pytest.raises(BadAdapter, match=match) as info:
        read_adapter(path, plan)
    assert info.value.code == "bad-adapter"


def test_adapters_that_do_not_fit_are_rejected_naming_the_tensor(gemma, tmp_path):
    plan = gemma[1]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((128, 4)).astype(np.float32)
    q = "blk.0.attn_q.weight"
    rejected(tmp_path, plan, {q + ".lora_a": (a, Q.F32), q + ".lora_b": (b, Q.F32)}, "architecture 'llama'",
             arch="llama")
    rejected(tmp_path, plan, {q + ".lora_a": (a, Q.F32), q + ".lora_b": (b, Q.F32)}, "general.type is 'model'",
             general_type="model")
    wrong = rng.standard_normal((4, 32)).astype(np.float32)
    rejected(tmp_path, plan, {q + ".lora_a": (wrong, Q.F32), q + ".lora_b": (b, Q.F32)},
             r"blk\.0\.attn_q\.weight\.lora_a has dims \[32, 4\].*needs \[64, 4\]")
    rejected(tmp_path, plan, {q + ".lora_a": (a, Q.F32), q + ".lora_b": (b[:, :3].copy(), Q.F32)},
             r"blk\.0\.attn_q\.weight\.lora_b has dims \[3, 128\].*needs \[4, 128\]")
    rejected(tmp_path, plan, {"blk.0.attn_x.weight.lora_a": (a, Q.F32), "blk.0.attn_x.weight.lora_b": (b, Q.F32)},
             r"'blk\.0\.attn_x\.weight\.lora_a' adapts 'blk\.0\.attn_x\.weight', which this gemma3 model does not")
    e = "token_embd.weight"
    embd = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((96, 4)).astype(np.float32)
    rejected(tmp_path, plan, {e + ".lora_a": (embd[0], Q.F32), e + ".lora_b": (embd[1], Q.F32)},
             r"'token_embd\.weight\.lora_a'.*embeddings and the output head take no adapter")
    rejected(tmp_path, plan, {q + ".lora_a": (a, Q.F32)}, r"blk\.0\.attn_q\.weight\.lora_a has no .*lora_b")
    rejected(tmp_path, plan, {q + ".lora_a": (a, Q.F32), q + ".lora_b": (b, Q.F32), q + ".lora_c": (a, Q.F32)},
             r"'blk\.0\.attn_q\.weight\.lora_c' is neither")
    a32 = rng.standard_normal((32, 64)).astype(np.float32)
    rejected(tmp_path, plan, {q + ".lora_a": (a32, Q.Q4_0), q + ".lora_b": (b, Q.F32)}, r"lora_a is Q4_0")
    with pytest.raises(BadAdapter, match="no file at"):
        read_adapter(tmp_path / "missing.gguf", plan)
    with pytest.raises(BadAdapter, match="truncated|not a GGUF"):
        read_adapter((tmp_path / "bad.gguf").read_bytes()[:100], plan)


# --- numpy: the side path against merged weights ------------------------------------------------------

@pytest.mark.parametrize("types", [(Q.F32, Q.F32), (Q.F16, Q.F16), (Q.Q8_0, Q.F16)], ids=["f32", "f16", "q8_0-a"])
def test_numpy_side_paths_match_merged_weights(gemma, tmp_path, types):
    """Two adapters over one batch: each alone, both on one sequence, and a sequence with neither,
    whose logits are bit for bit those of the same batch without adapters."""
    f, plan = gemma
    rng = np.random.default_rng(5)
    adapters = [make_adapter(tmp_path / "a1.gguf", plan, all_projections(plan, range(GEMMA_LAYERS)), 4, rng,
                             alpha=8.0, types=types),
                make_adapter(tmp_path / "a2.gguf", plan, all_projections(plan, [0, 2, 5])[::2], 6, rng, types=types)]
    ex = CpuExecutor(plan, f.tensor_bytes, n_slots=4, n_ctx=64, max_adapters=2)
    for slot, made in enumerate(adapters):
        ex.set_adapter(slot, read_adapter(made.path, plan))
    got = by_sequence(ex.forward(prefill_step()), ex.forward(decode_step()))
    for logits, want in zip(got, expected_logits(f, plan, adapters), strict=True):
        # float32 through 6 layers: x @ (W + BA)ᵀ and x @ Wᵀ + (x @ Aᵀ) @ Bᵀ part by up to ~3e-5 of the
        # largest logit (seen on f32 weights); an adapter left out moves logits by far more
        close(logits, want, 1e-4)
    plain = by_sequence(ex.forward(prefill_step(False)), ex.forward(decode_step(False)))
    np.testing.assert_array_equal(got[3], plain[3])
    assert all(np.abs(g - p).max() > 1e-2 * np.abs(p).max() for g, p in zip(got[:3], plain[:3], strict=True))


# --- the GPU executor against numpy ---------------------------------------------------------------------

def gpu_and_numpy(model, gpu, adapters, **options):
    f, plan = model
    cpu = CpuExecutor(plan, f.tensor_bytes, n_slots=4, n_ctx=64, max_adapters=2)
    dev = GpuExecutor(plan, f.tensor_bytes, n_slots=4, n_ctx=64, device=gpu, max_tokens=32, max_adapters=2,
                      max_lora_rank=8, **options)
    for slot, made in enumerate(adapters):
        loaded = read_adapter(made.path, plan)
        cpu.set_adapter(slot, loaded)
        dev.set_adapter(slot, loaded)
    return cpu, dev


def gpu_close(a, b):  # f16 arithmetic paths (where the adapter has shader-f16) round weights and activations
    close(a, b, 2e-2)


@pytest.mark.parametrize("model_name", ["gemma", "llama"])
def test_gpu_side_paths_match_numpy(model_name, request, gpu, tmp_path):
    """gemma3: joined q+k, joined GLU, mat-vecs with a residual-norm tail; llama: a split GLU.
    The prefill (20 tokens) runs mat-mats and their LoRA kernel, the decode step mat-vecs."""
    model = request.getfixturevalue(model_name)
    f, plan = model
    rng = np.random.default_rng(9)
    adapters = [make_adapter(tmp_path / "a1.gguf", plan, all_projections(plan, range(plan.kv.n_layers)), 8, rng,
                             alpha=16.0, types=(Q.F16, Q.F16)),
                make_adapter(tmp_path / "a2.gguf", plan, all_projections(plan, [0])[1::2], 6, rng)]
    cpu, dev = gpu_and_numpy(model, gpu, adapters)
    for step in (prefill_step, decode_step):
        gpu_close(dev.forward(step()), cpu.forward(step()))
    # a token without adapters: the same bits as in a step without any
    n = len(SEQUENCES[0][0])
    with_lora = dev.forward(prefill_step()), dev.forward(decode_step())
    without = dev.forward(prefill_step(False)), dev.forward(decode_step(False))
    np.testing.assert_array_equal(with_lora[0][3 * n:], without[0][3 * n:])
    np.testing.assert_array_equal(with_lora[1][3], without[1][3])
    # hot swap: another adapter in slot 1, written into the pools in place
    third = make_adapter(tmp_path / "a3.gguf", plan, all_projections(plan, [plan.kv.n_layers - 1]), 4, rng)
    for ex in (cpu, dev):
        ex.clear_adapter(1)
        ex.set_adapter(1, read_adapter(third.path, plan))
    for step in (prefill_step, decode_step):
        gpu_close(dev.forward(step()), cpu.forward(step()))


def test_a_times_x_runs_once_per_input_group_and_matmuls_add_b_times_u(gemma, gpu, tmp_path):
    """u = A·x is one kernel per input the adapted weights read, before the first of them: a layer's
    q, k and v share the attention norm's h, gate and up the FFN norm's h, o and down have inputs
    of their own. A prefill step with adapters dispatches those 4 more per layer and one B·u kernel
    per adapted mat-mat; a decode step with adapters dispatches no more than one without (the
    mat-vecs compute their own u and add B·u). A step without adapters dispatches what an executor
    without slots does, with the same bits."""
    f, plan = gemma
    made = make_adapter(tmp_path / "a.gguf", plan, all_projections(plan, [1]), 4, np.random.default_rng(2))
    _, dev = gpu_and_numpy(gemma, gpu, [made])
    plain = GpuExecutor(plan, f.tensor_bytes, n_slots=4, n_ctx=64, device=gpu, max_tokens=32)
    assert describe(plan, dev.program)[2] == (
        "layers 1-4: lora A·h | matmul q+k | matmul v | rope q,k + norm + kv store | attention (window 4) "
        "| lora A·a | matmul o + norm + residual x + norm h | lora A·h | glu gelu | lora A·g "
        "| matmul f + norm + residual x + norm h")
    groups = {group.label: [name.split(".")[2] for name, _ in group.parts] for group in dev.lora_groups.values()}
    assert sorted(map(tuple, groups.values())) == sorted([("attn_q", "attn_k", "attn_v"), ("attn_output",),
                                                          ("ffn_gate", "ffn_up"), ("ffn_down",)] * GEMMA_LAYERS)
    assert dispatches_per_layer(dev) == [8] + [7] * (GEMMA_LAYERS - 1)
    assert decode_dispatches(dev) == decode_dispatches(plain)
    one = {"T": 1, "R": 1, "lora": True}
    assert sum(len(launch.dispatches(one)) for launch in dev.launches) == decode_dispatches(plain)
    pooled = sum(isinstance(k, QuantMatmul) and k.lora is not None for launch in dev.launches for k in launch.kernels)
    assert pooled == 5 * GEMMA_LAYERS  # q+k, v, o, gate+up, down: every projection, not the output head
    prefill = {"T": 20, "R": 20}
    count = sum(len(launch.dispatches(prefill)) for launch in dev.launches)
    assert sum(len(launch.dispatches({**prefill, "lora": True})) for launch in dev.launches) == (
        count + pooled + 4 * GEMMA_LAYERS)
    for step in (prefill_step(False), decode_step(False)):
        np.testing.assert_array_equal(dev.forward(step), plain.forward(step))


def test_gpu_refuses_adapters_over_its_rank(gemma, gpu, tmp_path):
    f, plan = gemma
    made = make_adapter(tmp_path / "big.gguf", plan, ["blk.0.attn_v.weight"], 12, np.random.default_rng(4))
    dev = GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=16, max_adapters=1, max_lora_rank=8)
    with pytest.raises(BadAdapter, match="rank 12.*rank up to 8"):
        dev.set_adapter(0, read_adapter(made.path, plan))
    with pytest.raises(ValueError, match="adapter slot 0 holds no adapter"):
        dev.forward(Batch.for_sequence([1, 2], 0, adapters=[(0, 1.0)]))


# --- engine and scheduler: adapters per request ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The scheduler tests' tiny llama (a one-character-per-token vocab) and two adapters for it."""
    from test_scheduler import write_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_model(folder / "tiny.gguf")
    plan = build_plan(read_gguf(folder / "tiny.gguf").header)
    rng = np.random.default_rng(21)
    make_adapter(folder / "a.gguf", plan, all_projections(plan, range(plan.kv.n_layers)), 4, rng, alpha=8.0)
    make_adapter(folder / "b.gguf", plan, all_projections(plan, [1]), 8, rng, types=(Q.F16, Q.F16))
    return {name: folder / f"{name}.gguf" for name in ("tiny", "a", "b")}


def tiny_engine(tiny, n_slots: int, executor=None, **options):
    from test_scheduler import N_CTX

    from realm_wasm.engine import Engine, Model

    if executor is None:
        return Engine.load(tiny["tiny"], backend="numpy", n_ctx=N_CTX, n_slots=n_slots,
                           adapters={"a": tiny["a"], "b": tiny["b"]}, **options)
    f = read_gguf(tiny["tiny"])
    model = Model.from_header(f.header)
    engine = Engine(model, executor(model.plan, f.tensor_bytes, n_slots), N_CTX)
    for name in "ab":
        engine.load_adapter(name, tiny[name])
    return engine


LORAS = [(("a", 1.0),), (("b", 0.5), ("a", 0.25)), ()]


def run_batched(engine, prompt: str, loras, max_tokens: int = 10):
    from test_scheduler import Recorder, RecordingExecutor, run_all

    from realm_wasm.scheduler import Request, Scheduler

    if not engine.executor.run_ahead:  # numpy: keep the batches to look at them
        engine.executor = RecordingExecutor(engine.executor)
    scheduler = Scheduler(engine, n_slots=len(loras), max_step_tokens=16)
    sinks = [Recorder() for _ in loras]
    for lora, sink in zip(loras, sinks, strict=True):
        scheduler.submit(Request(engine.tokenizer.encode(prompt), max_tokens, lora=lora, stop_at_eos=False), sink)
    run_all(scheduler)
    return [sink.tokens for sink in sinks]


def alone(engine, prompt: str, lora, max_tokens: int = 10) -> list[int]:
    return [e.token_id for e in engine.generate(prompt, max_tokens, stop_at_eos=False, lora=lora)
            if e.token_id is not None]


def test_sequences_with_different_adapters_share_steps_and_match_running_alone(tiny):
    single = tiny_engine(tiny, 1)
    expect = [alone(single, "Hello, world", lora) for lora in LORAS]
    assert len({tuple(t) for t in expect}) == 3  # each adapter changes what the model says
    engine = tiny_engine(tiny, 3)
    assert run_batched(engine, "Hello, world", LORAS) == expect
    mixed = [b for b in engine.executor.batches if b.lora is not None and (b.lora[:, 0] < 0).any()]
    assert mixed, "no step mixed sequences with and without adapters"
    assert not engine.adapters.users or set(engine.adapters.users.values()) == {0}  # released at the end


def test_on_the_gpu_running_ahead_with_adapters_matches_running_alone(tiny, gpu):
    def executor(plan, weights, n_slots):
        return GpuExecutor(plan, weights, n_slots=n_slots, n_ctx=64, device=gpu, max_tokens=32, max_adapters=2,
                           max_lora_rank=8)

    single = tiny_engine(tiny, 1, executor)
    expect = [alone(single, "Hello, world", lora, 8) for lora in LORAS]
    assert len({tuple(t) for t in expect}) == 3
    assert run_batched(tiny_engine(tiny, 3, executor), "Hello, world", LORAS, 8) == expect


def test_kv_is_reused_only_under_the_same_adapters(tiny):
    from test_scheduler import Recorder, run_all

    from realm_wasm.scheduler import Request, Scheduler

    engine = tiny_engine(tiny, 1)
    scheduler = Scheduler(engine, n_slots=1)
    prompt = "The quick brown fox jumps over the lazy dog"
    for suffix, lora, reused in (("", (), False), (" again", (("a", 1.0),), False), (" again!", (("a", 1.0),), True),
                                 (" again!!", (("a", 0.5),), False)):
        sink = Recorder()
        scheduler.submit(Request(engine.tokenizer.encode(prompt + suffix), 4, lora=lora, stop_at_eos=False), sink)
        run_all(scheduler)
        assert (sink.finished.cached_tokens > 0) == reused, suffix
        assert sink.tokens == alone(tiny_engine(tiny, 1), prompt + suffix, lora, 4)


def test_unloading_an_adapter_lets_its_running_sequences_finish(tiny):
    from test_scheduler import Recorder, run_all

    from realm_wasm.lora import AdapterConflict, AdapterNotFound
    from realm_wasm.scheduler import Request, Scheduler

    engine = tiny_engine(tiny, 2)
    engine.unload_adapter("b")  # nobody uses it: its slot frees at once
    assert [name for name, _ in engine.adapters.items()] == ["a"] and len(engine.adapters.held) == 1
    scheduler = Scheduler(engine, n_slots=2)
    sink = Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 10, lora=(("a", 1.0),), stop_at_eos=False),
                     sink)
    for _ in range(3):
        scheduler.step()
    unloaded = scheduler.call(lambda: engine.unload_adapter("a"))
    scheduler.step()
    assert unloaded.result() is None and "a" not in engine.adapters
    with pytest.raises(AdapterNotFound, match="no adapter 'a'"):
        scheduler.submit(Request([1, 5], 2, lora=(("a", 1.0),)), Recorder())
    engine.load_adapter("c", tiny["b"])
    with pytest.raises(AdapterConflict, match="all 2 adapter slots are in use"):  # "a" still runs in its slot
        engine.load_adapter("d", tiny["b"])
    run_all(scheduler)
    assert sink.tokens == alone(tiny_engine(tiny, 1), "Hello, world", (("a", 1.0),))
    engine.load_adapter("d", tiny["a"])  # the slot is free once the sequence finished
    with pytest.raises(AdapterConflict, match="already loaded"):
        engine.load_adapter("d", tiny["a"])


def test_requests_for_adapters_that_cannot_apply_are_refused(tiny):
    from test_scheduler import Recorder

    from realm_wasm.errors import InvalidRequest
    from realm_wasm.lora import AdapterConflict, AdapterNotFound
    from realm_wasm.scheduler import Request, Scheduler

    engine = tiny_engine(tiny, 1)
    scheduler = Scheduler(engine, n_slots=1)
    for lora, error, match in (((("zz", 1.0),), AdapterNotFound, r"no adapter 'zz' is loaded \(loaded: a, b\)"),
                               ((("a", 1.0),) * 2, InvalidRequest, "different adapters"),
                               (tuple((n, 1.0) for n in "abcde"), InvalidRequest, "at most 4"),
                               ((("a", float("nan")),), InvalidRequest, "finite")):
        with pytest.raises(error, match=match):
            scheduler.submit(Request([1, 5], 2, lora=lora), Recorder())
    from realm_wasm.engine import Engine

    bare = Engine.load(tiny["tiny"], backend="numpy", n_ctx=64)  # no adapters asked for: no slots
    with pytest.raises(AdapterConflict, match="without adapter slots"):
        bare.load_adapter("a", tiny["a"])


# mat-vec shapes for the side paths: this adapter's table; the GPU table with 8 rows a team of 32
# lanes (teams past a chunk's rows, a workgroup wider than the chunk); 3 rows, a workgroup per team
LORA_SHAPES = {"this table": {}, "gpu, 8 rows": dict(gpu=True, matvec_lora_rows=8),
               "gpu, 3 rows, one team": dict(gpu=True, matvec_lora_rows=3, matvec_wg=32)}


@pytest.mark.parametrize("shape", LORA_SHAPES.values(), ids=LORA_SHAPES)
def test_a_weight_split_over_bindings_adds_its_side_paths_per_chunk(gpu, shape):
    """Each of a weight's bindings (a dispatch each) adds the side paths of its own rows, whatever
    the mat-vec's rows per team and teams per workgroup."""
    from test_gpu_matmul import Case

    from realm_wasm.gpu.lora import LoraGroup, LoraTokens
    from realm_wasm.gpu.tuning import TUNING
    from realm_wasm.lora import Adapter, LoraPair

    n, k, t_max = 37, 160, 12
    case = Case(gpu, "Q4_0", n, k, t_max=t_max, seed=4, max_binding=1000)
    assert len(case.weight.chunks) == 4
    rng = np.random.default_rng(8)
    pairs = [LoraPair(rng.standard_normal((r, k)).astype(np.float32), rng.standard_normal((n, r)).astype(np.float32))
             for r in (8, 3)]
    tokens = LoraTokens(gpu, t_max)
    group = LoraGroup(gpu, tokens, case.bindings[0], [("w", n)], k, slots=2, rank=8,
                      workgroup=64, subgroups=False, matvec_max_t=tuning_for(gpu).matvec_max_t, label="w")
    for slot, pair in enumerate(pairs):
        group.write(slot, Adapter(f"a{slot}", "test", 0.0, {"w": pair}))
    shape = dict(shape)
    table = TUNING[not shape.pop("gpu")] if shape else tuning_for(gpu)  # TUNING is keyed by "a CPU adapter"
    tuning = dataclasses.replace(table, **shape, matvec_max_t=tuning_for(gpu).matvec_max_t)  # the group's
    mm = case.matmul(lora=group.pool(["w"]), f16=False, tuning=tuning)  # f32 on every adapter: f32's tolerance
    if shape:
        assert mm.matvec_shape[2] == shape["matvec_lora_rows"]
    per_token = [((0, 1.0),), ((1, -0.5), (0, 2.0)), (), ((1, 1.0),)] * 3
    for t in (1, 4, 12):  # the mat-vec at one token and at four, then the mat-mat and its LoRA kernel
        batch = Batch(np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(1, np.int32),
                      *lora_table(per_token[:t]))
        tokens.write(batch)
        gpu.write_buffer(case.rows, 0, np.array([t, 0, 0, 0], np.uint32).tobytes())
        gpu.submit(group.dispatches(t, lora=True) + mm.dispatches(t, lora=True))
        got = np.frombuffer(gpu.read_buffer(case.y, 0, t * n * 4), np.float32).reshape(t, n)
        x = case.x[:t].astype(np.float64)
        want = x @ case.w.T
        for i, adapters in enumerate(per_token[:t]):
            for slot, scale in adapters:
                want[i] += scale * (pairs[slot].b.astype(np.float64) @ (pairs[slot].a @ x[i]))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
