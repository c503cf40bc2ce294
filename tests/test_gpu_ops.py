"""The non-matmul GPU kernels and the GPU sampler against the numpy executor and sampling.py."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from realm_wasm import cpu
from realm_wasm.plan import Batch
from realm_wasm.quants import QUANTS_BY_NAME, dequantize
from realm_wasm.sampling import SamplingParams, sample

ops = pytest.importorskip("realm_wasm.gpu.ops")
from realm_wasm.gpu.device import STORAGE_RW  # noqa: E402
from realm_wasm.gpu.matmul import upload_weight  # noqa: E402
from realm_wasm.gpu.tuning import TUNING  # noqa: E402

RNG = np.random.default_rng(7)


def upload(gpu, array: np.ndarray):
    data = np.ascontiguousarray(array).tobytes()
    buf = gpu.create_buffer(max(16, len(data)), STORAGE_RW)
    gpu.write_buffer(buf, 0, data)
    return (buf, 0, max(16, len(data)))


def empty(gpu, nbytes: int):
    return (gpu.create_buffer(nbytes, STORAGE_RW), 0, nbytes)


def fetch(gpu, binding, dtype, shape) -> np.ndarray:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return np.frombuffer(gpu.read_buffer(binding[0], binding[1], n), dtype).reshape(shape)


class WithoutSubgroups:
    """The same device as seen by a host without subgroups: kernels take their shared-memory path."""

    def __init__(self, gpu) -> None:
        self._gpu = gpu
        self.features = gpu.features - {"subgroups"}

    def __getattr__(self, name: str):
        return getattr(self._gpu, name)


def kv_caches(gpu, attn, dtype) -> tuple[np.ndarray, np.ndarray]:
    """An attention's whole key and value caches [n_slots, n_ctx, row], read from its slot groups."""
    shape = (attn.n_ctx, attn.n_kv_heads * attn.head_dim)
    k, v = ([fetch(gpu, getattr(g, kind), dtype, (g.n_slots, *shape)).astype(np.float32) for g in attn.kv_groups]
            for kind in "kv")
    return np.concatenate(k), np.concatenate(v)


@pytest.fixture(params=["subgroups", "shared"])
def any_gpu(request, gpu):
    """The device with and without subgroups (kernels with a workgroup reduction have both paths)."""
    if request.param == "shared":
        return WithoutSubgroups(gpu)
    if "subgroups" not in gpu.features:
        pytest.skip("no subgroups")
    return gpu


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, group: int) -> np.ndarray:
    """plan.py's rmsnorm in f64: w holds one group's weights or a whole row's."""
    g = x.reshape(len(x), -1, group).astype(np.float64)
    return (g / np.sqrt((g * g).mean(-1, keepdims=True) + eps) * w.reshape(-1, group)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# rmsnorm, add, glu, gather


@pytest.mark.parametrize("width,group,w_len", [(52, 52, 52), (36, 12, 12), (300, 300, 300), (24, 8, 24)])
def test_rmsnorm_matches_numpy(any_gpu, width, group, w_len):
    gpu, t = any_gpu, 3
    x, w = randn(t, width) * 3, randn(w_len)
    want = rmsnorm(x, w, 1e-6, group)
    xb, wb, yb = upload(gpu, x), upload(gpu, w), empty(gpu, x.nbytes)
    gpu.submit(ops.RmsNorm(gpu, xb, wb, yb, width=width, group=group, eps=1e-6).dispatches(t))
    np.testing.assert_allclose(fetch(gpu, yb, np.float32, x.shape), want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_in_place_and_residual(any_gpu):
    gpu, t, width = any_gpu, 2, 20
    x, w, acc, w2 = randn(t, width), randn(width), randn(t, width), randn(width)
    normed = rmsnorm(x, w, 1e-5, width)
    xb, wb, accb, w2b, hb = upload(gpu, x), upload(gpu, w), upload(gpu, acc), upload(gpu, w2), empty(gpu, x.nbytes)
    norm_in_place = ops.RmsNorm(gpu, xb, wb, xb, width=width, group=width, eps=1e-5)
    # post-norm + residual add + the next pre-norm, as one dispatch
    residual = ops.RmsNorm(gpu, xb, wb, accb, width=width, group=width, eps=1e-5, residual=True, then=(w2b, hb))
    gpu.submit(residual.dispatches(t) + norm_in_place.dispatches(t))
    np.testing.assert_allclose(fetch(gpu, accb, np.float32, x.shape), acc + normed, rtol=1e-5, atol=1e-6)
    next_norm = rmsnorm(acc + normed, w2, 1e-5, width)
    np.testing.assert_allclose(fetch(gpu, hb, np.float32, x.shape), next_norm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fetch(gpu, xb, np.float32, x.shape), normed, rtol=1e-5, atol=1e-6)


def test_add_in_place_and_out_of_place(gpu):
    t, width = 3, 300
    a, b = randn(t, width), randn(t, width)
    ab, bb, yb = upload(gpu, a), upload(gpu, b), empty(gpu, a.nbytes)
    add, add_in_place = ops.Add(gpu, ab, bb, yb, width=width), ops.Add(gpu, ab, bb, ab, width=width)
    gpu.submit(add.dispatches(t) + add_in_place.dispatches(2))
    np.testing.assert_array_equal(fetch(gpu, yb, np.float32, a.shape), a + b)
    np.testing.assert_array_equal(fetch(gpu, ab, np.float32, a.shape), np.concatenate([a[:2] + b[:2], a[2:]]))


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_glu_matches_numpy(gpu, act):
    t, width = 3, 333
    gate, up = randn(t, width) * 4, randn(t, width)
    gate[0, :4] = [-100.0, 100.0, -20.0, 30.0]  # saturated tails stay finite
    gb, ub, yb = upload(gpu, gate), upload(gpu, up), empty(gpu, gate.nbytes)
    gpu.submit(ops.Glu(gpu, gb, ub, yb, width=width, act=act).dispatches(t))
    with np.errstate(over="ignore"):
        want = cpu.ACTIVATIONS[act](gate) * up
    np.testing.assert_allclose(fetch(gpu, yb, np.float32, gate.shape), want, rtol=2e-6, atol=2e-6)


def test_gather_copies_the_logit_rows(gpu):
    x = randn(6, 70)
    rows = np.array([5, 0, 5, 2], np.int32)
    xb, rb, yb = upload(gpu, x), upload(gpu, rows), empty(gpu, 4 * 70 * 4)
    gpu.submit(ops.Gather(gpu, xb, rb, yb, width=70).dispatches(4))
    np.testing.assert_array_equal(fetch(gpu, yb, np.float32, (4, 70)), x[rows])


# ---------------------------------------------------------------------------------------------
# rope


@pytest.mark.parametrize("neox,n_rot,freqs", [(True, 16, False), (False, 16, False), (True, 10, False),
                                              (False, 12, True)])
def test_rope_matches_numpy(gpu, neox, n_rot, freqs):
    n_heads, head_dim = 3, 16
    positions = np.array([0, 7, 1234, 31], np.int32)
    x = randn(len(positions), n_heads * head_dim)
    p = dict(n_heads=n_heads, head_dim=head_dim, n_rot=n_rot, base=10000.0, scale=0.5, neox=neox)
    factors = (1.0 + RNG.random(n_rot // 2) * 3).astype(np.float32) if freqs else None
    want = cpu.apply_rope(x, positions, p, factors)
    xb, pb = upload(gpu, x), upload(gpu, positions)
    gpu.submit(ops.Rope(gpu, xb, xb, pb, freq_factors=factors, **p).dispatches(len(positions)))
    # f32 angles: position * frequency is rounded once, an error of ~1e-7 * angle
    np.testing.assert_allclose(fetch(gpu, xb, np.float32, x.shape), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_f16", [False, True])
def test_rope_with_head_norm_and_kv_store(any_gpu, kv_f16):
    # gemma's keys: per-head RMSNorm, NeoX rope (n_rot < head_dim here), then into the KV cache.
    gpu = any_gpu
    if kv_f16 and "shader-f16" not in gpu.features:
        pytest.skip("no shader-f16")
    n_kv, head_dim, n_ctx = 2, 40, 16
    positions, slots = np.array([3, 4, 9], np.int32), np.array([1, 1, 0], np.int32)
    k, v, w = randn(3, n_kv * head_dim) * 2, randn(3, n_kv * head_dim), randn(head_dim)
    p = dict(n_heads=n_kv, head_dim=head_dim, n_rot=32, base=1e6, scale=1.0, neox=True)
    want = cpu.apply_rope(rmsnorm(k, w, 1e-6, head_dim).astype(np.float32), positions, p, None)
    kb, vb, pb, sb, qb, yb = (upload(gpu, a) for a in (k, v, positions, slots, k, k))
    attn = ops.Attention(gpu, qb, None, None, pb, sb, yb, n_heads=n_kv, n_kv_heads=n_kv, head_dim=head_dim,
                         n_ctx=n_ctx, n_slots=2, window=0, scale=1.0, kv_f16=kv_f16)
    gpu.submit(ops.Rope(gpu, kb, kb, pb, norm=(w, 1e-6), kv=(attn, vb, sb), **p).dispatches(3))
    np.testing.assert_allclose(fetch(gpu, kb, np.float32, k.shape), want, rtol=1e-4, atol=1e-4)
    dtype, tol = (np.float16, 2e-3) if kv_f16 else (np.float32, 1e-4)
    k_cache, v_cache = kv_caches(gpu, attn, dtype)
    np.testing.assert_allclose(k_cache[slots, positions], want, rtol=tol, atol=tol)
    np.testing.assert_allclose(v_cache[slots, positions], v, rtol=tol, atol=tol)
    assert not k_cache[0, :9].any() and not v_cache[1, 5:].any()


def rotated(x: np.ndarray, positions: np.ndarray, n_heads: int, head_dim: int, n_rot: int, base: float,
            scale: float, neox: bool, factors: np.ndarray | None) -> np.ndarray:
    """Rotary embedding in f64, each rotated pair as a complex number times e^(i·pos·theta)."""
    half = n_rot // 2
    theta = scale * base ** (-2.0 * np.arange(half) / n_rot) / (1.0 if factors is None else factors)
    turn = np.exp(1j * positions[:, None, None] * theta)  # [T, 1, half]
    heads = x.reshape(len(x), n_heads, head_dim).astype(np.float64)
    out = heads.copy()
    a, b = (slice(0, half), slice(half, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    z = (heads[..., a] + 1j * heads[..., b]) * turn
    out[..., a], out[..., b] = z.real, z.imag
    return out.reshape(x.shape)


@pytest.mark.parametrize("neox,n_rot,freqs,kv_f16,groups", [(True, 24, False, False, 1), (False, 24, False, True, 1),
                                                            (True, 16, False, True, 1), (False, 16, True, False, 1),
                                                            (True, 24, False, False, 3), (False, 16, True, True, 2)])
def test_rope_of_queries_and_keys_in_one_dispatch(any_gpu, limited_gpu, neox, n_rot, freqs, kv_f16, groups):
    # The queries (6 heads) and the keys (2 heads), each with its own per-head norm, rotated by one
    # dispatch that also stores the keys and values of three sequences in their KV-cache slots. With
    # a binding limit that holds one or two slots' cache, the cache is cut in slot groups: the first
    # group's store stays in that dispatch, each other group's is a dispatch of its own.
    gpu = any_gpu
    if kv_f16 and "shader-f16" not in gpu.features:
        pytest.skip("no shader-f16")
    n_q, n_kv, head_dim, n_ctx, n_slots = 6, 2, 24, 48, 3
    positions = np.array([5, 6, 7, 0, 1, 40], np.int32)
    slots = np.array([2, 2, 2, 0, 0, 1], np.int32)
    t = len(positions)
    q, k, v = randn(t, n_q * head_dim) * 2, randn(t, n_kv * head_dim) * 3, randn(t, n_kv * head_dim)
    wq, wk = randn(head_dim), randn(head_dim)
    factors = (1.0 + RNG.random(n_rot // 2) * 3).astype(np.float32) if freqs else None
    angles = dict(head_dim=head_dim, n_rot=n_rot, base=10000.0, scale=0.5, neox=neox)
    want_q = rotated(rmsnorm(q, wq, 1e-6, head_dim), positions, n_q, factors=factors, **angles)
    want_k = rotated(rmsnorm(k, wk, 0.1, head_dim), positions, n_kv, factors=factors, **angles)

    qb, kb, vb, pb, sb, yb = (upload(gpu, a) for a in (q, k, v, positions, slots, q))
    slot_bytes = n_ctx * n_kv * head_dim * (2 if kv_f16 else 4)
    limit = slot_bytes * -(-n_slots // groups) + slot_bytes // 2
    limited = limited_gpu(max_storage_buffer_binding_size=limit) if groups > 1 else gpu
    attn = ops.Attention(limited, qb, None, None, pb, sb, yb, n_heads=n_q, n_kv_heads=n_kv, head_dim=head_dim,
                         n_ctx=n_ctx, n_slots=n_slots, window=0, scale=1.0, kv_f16=kv_f16)
    assert len(attn.kv_groups) == groups
    rope = ops.Rope(gpu, kb, kb, pb, n_heads=n_kv, freq_factors=factors, norm=(wk, 0.1), kv=(attn, vb, sb),
                    also=ops.RopeHeads(qb, n_q, norm=(wq, 1e-6)), **angles)
    dispatches = rope.dispatches(t)
    assert [grid for _, _, grid in dispatches] == [(n_q + n_kv, t, 1)] + [(n_kv, t, 1)] * (groups - 1)
    gpu.submit(dispatches)

    np.testing.assert_allclose(fetch(gpu, qb, np.float32, q.shape), want_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fetch(gpu, kb, np.float32, k.shape), want_k, rtol=1e-4, atol=1e-4)
    dtype, tol = (np.float16, 3e-3) if kv_f16 else (np.float32, 1e-4)
    k_cache, v_cache = kv_caches(gpu, attn, dtype)
    np.testing.assert_allclose(k_cache[slots, positions], want_k, rtol=tol, atol=tol)
    np.testing.assert_allclose(v_cache[slots, positions], v, rtol=tol, atol=tol)
    # only the keys' part stores: no other cache row was written
    written = np.zeros((n_slots, n_ctx), bool)
    written[slots, positions] = True
    assert not k_cache[~written].any() and not v_cache[~written].any()


# ---------------------------------------------------------------------------------------------
# embed


# Byte offsets of each block's f16 scale fields: random bytes elsewhere make valid blocks.
F16_FIELDS = {"Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "IQ4_NL": (0,)}


def random_table(name: str, n_rows: int, width: int) -> bytes:
    qt = QUANTS_BY_NAME[name]
    if qt.block_size == 1:
        return randn(n_rows, width).astype(np.float32 if name == "F32" else np.float16).tobytes()
    blocks = RNG.integers(0, 256, (n_rows * width // qt.block_size, qt.type_size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        scales = RNG.uniform(-0.1, 0.1, len(blocks)).astype("<f2")
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.tobytes()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "F16", "F32", "Q5_0", "Q3_K", "IQ4_NL"])
def test_embed_dequantizes_rows(gpu, name):
    qt = QUANTS_BY_NAME[name]
    n_rows, width = 11, 512
    raw = random_table(name, n_rows, width)
    table = dequantize(raw, qt.type_id, (n_rows, width))
    # A small binding limit cuts the table into chunks of rows, one dispatch each.
    weight = upload_weight(gpu, qt, n_rows, width, raw, max_binding=4 * len(raw) // n_rows)
    assert len(weight.chunks) > 1
    tokens = np.array([3, 0, 10, 3, 7], np.int32)
    tb, yb = upload(gpu, tokens), empty(gpu, len(tokens) * width * 4)
    gpu.submit(ops.Embed(gpu, weight, tb, yb, scale=1.5).dispatches(len(tokens)))
    want = table[tokens] * np.float32(1.5)
    np.testing.assert_allclose(fetch(gpu, yb, np.float32, want.shape), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# attention

SPLIT = dataclasses.replace(TUNING[True], attn_wg=32, attn_split=3, attn_split_max_t=4)
DIRECT = dataclasses.replace(TUNING[True], attn_wg=64, attn_split=1, attn_split_max_t=0)


class AttentionCase:
    """One layer's attention on the GPU next to the numpy executor's, fed the same steps. The GPU
    attention stores the step's keys and values itself, or (`rope_stores`) a Rope that rotates
    nothing (n_rot=0) does."""

    def __init__(self, gpu, *, n_heads=8, n_kv=2, head_dim=24, n_ctx=80, n_slots=2, window=0, t_max=40,
                 tuning=DIRECT, kv_f16=False, rope_stores=False, limited=None):
        self.gpu, self.t_max = gpu, t_max
        self.p = dict(layer=0, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, window=window,
                      scale=1.0 / math.sqrt(head_dim))
        shape = (1, n_slots, n_ctx, n_kv * head_dim)
        self.cache = SimpleNamespace(k=np.zeros(shape, np.float32), v=np.zeros(shape, np.float32))
        self.q, self.k, self.v, self.y = (empty(gpu, t_max * w * 4) for w in
                                          (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim, n_heads * head_dim))
        self.pos, self.slots = empty(gpu, t_max * 4), empty(gpu, t_max * 4)
        kv = (None, None) if rope_stores else (self.k, self.v)
        self.op = ops.Attention(limited or gpu, self.q, *kv, self.pos, self.slots, self.y, n_heads=n_heads,
                                n_kv_heads=n_kv, head_dim=head_dim, n_ctx=n_ctx, n_slots=n_slots, window=window,
                                scale=self.p["scale"], kv_f16=kv_f16, tuning=tuning)
        self.kernels = [self.op]
        if rope_stores:
            self.kernels.insert(0, ops.Rope(gpu, self.k, self.k, self.pos, n_heads=n_kv, head_dim=head_dim, n_rot=0,
                                            base=1.0, scale=1.0, neox=True, kv=(self.op, self.v, self.slots)))

    def step(self, positions, slots) -> tuple[np.ndarray, np.ndarray]:
        batch = Batch(np.zeros(len(positions), np.int32), np.asarray(positions, np.int32),
                      np.asarray(slots, np.int32), np.zeros(1, np.int32))
        t, nh, nkv, hd = len(batch), self.p["n_heads"], self.p["n_kv_heads"], self.p["head_dim"]
        q, k, v = randn(t, nh * hd), randn(t, nkv * hd), randn(t, nkv * hd)
        for binding, array in ((self.q, q), (self.k, k), (self.v, v), (self.pos, batch.positions),
                               (self.slots, batch.slots)):
            self.gpu.write_buffer(binding[0], 0, array.tobytes())
        self.gpu.submit([d for kernel in self.kernels for d in kernel.dispatches(t)])
        want = cpu.attention(q, k, v, batch, self.cache, self.p)
        return fetch(self.gpu, self.y, np.float32, (t, nh * hd)), want


@pytest.mark.parametrize("tuning", [DIRECT, SPLIT], ids=["direct", "split"])
def test_attention_prefill_then_decode(gpu, tuning):
    case = AttentionCase(gpu, tuning=tuning)
    for positions in (range(37), [37], [38], [39, 40]):
        got, want = case.step(list(positions), [0] * len(positions))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tuning", [DIRECT, SPLIT], ids=["direct", "split"])
def test_attention_sliding_window_gqa_two_slots(gpu, tuning):
    # GQA 4:1, a window shorter than the context, sequences in two slots in one batch, the second
    # one starting at position 5 (its cache rows below 5 hold whatever was there).
    case = AttentionCase(gpu, n_heads=8, n_kv=2, head_dim=16, window=9, tuning=tuning, rope_stores=True)
    got, want = case.step(list(range(20)) + list(range(5, 12)), [1] * 20 + [0] * 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got, want = case.step([20, 12], [1, 0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tuning", [DIRECT, SPLIT], ids=["direct", "split"])
@pytest.mark.parametrize("rope_stores", [False, True], ids=["attention-stores", "rope-stores"])
def test_attention_over_a_kv_cache_cut_into_slot_groups(gpu, limited_gpu, tuning, rope_stores):
    # A binding limit that holds two slots' cache: five slots in groups of 2, 2 and 1, one dispatch
    # (and one store) each. Steps mix tokens of every group, so each group's kernels must take
    # exactly their tokens and leave the others' outputs to the others.
    two_slots = 24 * 2 * 16 * 4 * 2
    case = AttentionCase(gpu, n_heads=4, n_kv=2, head_dim=16, n_ctx=24, n_slots=5, tuning=tuning,
                         rope_stores=rope_stores, limited=limited_gpu(max_storage_buffer_binding_size=two_slots))
    assert [(g.slot0, g.n_slots) for g in case.op.kv_groups] == [(0, 2), (2, 2), (4, 1)]
    assert len(case.op.dispatches(3)) == (0 if rope_stores else 3) + 3
    got, want = case.step(list(range(6)) + list(range(4)) + list(range(5)), [4] * 6 + [1] * 4 + [2] * 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    got, want = case.step([6, 4, 5, 0], [4, 1, 2, 3])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_kv_cache_slot_over_the_binding_limit_is_refused(gpu, limited_gpu):
    with pytest.raises(ValueError, match=r"attention: one sequence's KV cache \(80 positions, 15360 bytes\) "
                                         r"exceeds the device's storage binding limit \(15359 bytes\)"):
        ops.Attention(limited_gpu(max_storage_buffer_binding_size=15359), *(empty(gpu, 4096) for _ in range(6)),
                      n_heads=8, n_kv_heads=2, head_dim=24, n_ctx=80, n_slots=2, window=0, scale=1.0)


def test_attention_f16_cache(gpu):
    if "shader-f16" not in gpu.features:
        pytest.skip("no shader-f16")
    case = AttentionCase(gpu, n_heads=4, n_kv=1, head_dim=32, tuning=SPLIT, kv_f16=True)
    for positions in (range(12), [12]):
        got, want = case.step(list(positions), [0] * len(positions))
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# sampling

VOCAB = 262_144


class SamplerCase:
    def __init__(self, gpu, rows: int, n_vocab: int = VOCAB):
        self.gpu, self.n_vocab = gpu, n_vocab
        self.logits = empty(gpu, rows * n_vocab * 4)
        self.params = empty(gpu, rows * ops.SAMPLING_ROW_BYTES)
        self.tokens = empty(gpu, rows * 4)
        self.op = ops.Sampler(gpu, self.logits, self.params, self.tokens, n_vocab=n_vocab)

    def __call__(self, logits: np.ndarray, rows: list[tuple[SamplingParams, int]]) -> list[int]:
        self.gpu.write_buffer(self.logits[0], 0, logits.astype(np.float32).tobytes())
        self.gpu.write_buffer(self.params[0], 0, ops.pack_sampling(rows))
        self.gpu.submit(self.op.dispatches(len(rows)))
        return fetch(self.gpu, self.tokens, np.int32, (len(rows),)).tolist()


def test_greedy_is_numpy_argmax_with_lowest_id_on_ties(gpu):
    sampler = SamplerCase(gpu, rows=4)
    logits = randn(4, VOCAB)
    logits[1, [77, 5000, 260_000]] = 9.0  # a three-way tie
    logits[2] = np.round(logits[2])  # many ties everywhere
    logits[3, [0, VOCAB - 1]] = 50.0  # ends of the row
    assert sampler(logits, [(SamplingParams(), 0)] * 4) == [int(np.argmax(r)) for r in logits] == \
        [int(np.argmax(logits[0])), 77, int(np.argmax(logits[2])), 0]


def test_seeded_sampling_matches_sampling_py(gpu):
    sampler = SamplerCase(gpu, rows=8)
    settings = [SamplingParams(0.7, top_k=40, seed=1), SamplingParams(1.0, top_k=64, top_p=0.9, seed=2),
                SamplingParams(1.3, top_k=5, seed=3), SamplingParams(0.9, top_k=0, top_p=0.8, seed=4),
                SamplingParams(2.0, top_k=64, seed=5), SamplingParams(0.5, top_k=1, seed=6),
                SamplingParams(1.0, top_k=20, top_p=0.5, seed=7), SamplingParams(0.0, seed=8)]
    agree = 0
    for step in range(4):
        # Peaked rows like a model's (a few strong candidates over a long tail), plus ties.
        logits = randn(8, VOCAB) * 2
        logits[:, RNG.integers(0, VOCAB, 30)] += 8
        logits[:, 100:110] = 9.0
        logits[1, :4096:256] += 12  # the best 16 of the row all in one thread's share of a chunk
        logits[2] = 0.0  # all tied: the lowest ids are the candidates
        got = sampler(logits, [(p, step) for p in settings])
        # top_k 0 means the GPU's cap
        want = [sample(row, SamplingParams(p.temperature, p.top_k or ops.TOP_K_CAP, p.top_p, p.seed), step)
                for row, p in zip(logits, settings, strict=True)]
        agree += sum(g == w for g, w in zip(got, want, strict=True))
    assert agree == 4 * len(settings)


def test_sampling_distribution_small_vocab(gpu):
    sampler = SamplerCase(gpu, rows=1, n_vocab=1000)
    logits = np.full((1, 1000), -30.0, np.float32)
    logits[0, [3, 500, 999]] = np.log([0.5, 0.3, 0.2])
    counts = np.bincount([sampler(logits, [(SamplingParams(1.0, seed=11), n)])[0] for n in range(300)],
                         minlength=1000)
    assert set(np.nonzero(counts)[0]) == {3, 500, 999}
    np.testing.assert_allclose(counts[[3, 500, 999]] / 300, [0.5, 0.3, 0.2], atol=0.1)
