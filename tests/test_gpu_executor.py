"""The GPU executor runs the same Plan as the numpy executor and gets the same answers."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from test_llama import make_model

from realm_wasm.cpu import CpuExecutor
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu import executor as gpu_executor
from realm_wasm.gpu import fuse as fuse_module
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.gpu.fuse import Kernel, describe, fuse
from realm_wasm.gpu.weights import StreamedWeights
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch, Op
from realm_wasm.sampling import SamplingParams, sample

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module", params=[(Q.Q4_0, True, False), (Q.Q8_0, False, True)], ids=["q4_0-tied", "q8_0-freqs"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "llama.gguf"
    make_model(path, np.random.default_rng(7), *request.param)
    f = read_gguf(path)
    return f, build_plan(f.header)


def executors(model, gpu, n_slots=2):
    f, plan = model
    return (CpuExecutor(plan, f.tensor_bytes, n_slots=n_slots, n_ctx=64),
            GpuExecutor(plan, f.tensor_bytes, n_slots=n_slots, n_ctx=64, device=gpu, max_tokens=32))


def close(a, b):
    # f16 arithmetic paths (where the adapter has shader-f16) round weights and activations
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * np.abs(b).max())


def test_prefill_then_decode_matches_numpy(model, gpu):
    cpu, dev = executors(model, gpu)
    tokens = [3, 17, 42, 8, 8, 91, 0, 55, 23]
    close(dev.forward(Batch.for_sequence(tokens[:6], 0, all_logits=True)),
          cpu.forward(Batch.for_sequence(tokens[:6], 0, all_logits=True)))
    for i, t in enumerate(tokens[6:]):
        close(dev.forward(Batch.for_sequence([t], 6 + i)), cpu.forward(Batch.for_sequence([t], 6 + i)))


def test_two_sequences_in_one_step_match_numpy(model, gpu):
    cpu, dev = executors(model, gpu)
    step = Batch(np.array([5, 9, 2, 1, 80], np.int32), np.array([0, 1, 2, 0, 1], np.int32),
                 np.array([0, 0, 0, 1, 1], np.int32), np.array([2, 4], np.int32))
    close(dev.forward(step), cpu.forward(step))
    decode = Batch(np.array([7, 6], np.int32), np.array([3, 2], np.int32), np.array([0, 1], np.int32),
                   np.array([0, 1], np.int32))
    close(dev.forward(decode), cpu.forward(decode))


def test_sampling_on_the_device_matches_the_host_rules(model, gpu):
    cpu, dev = executors(model, gpu, n_slots=1)
    rows = [(SamplingParams(), 0), (SamplingParams(0.9, top_k=20, top_p=0.9, seed=5), 3)]
    batch = Batch.for_sequence([4, 4, 10, 2], 0, all_logits=True)
    batch.logit_rows = np.array([1, 3], np.int32)
    logits = dev.forward(batch)
    got = dev.forward_sample(batch, rows)
    assert got == [sample(row, params, step) for row, (params, step) in zip(logits, rows, strict=True)]
    assert got[0] == int(np.argmax(cpu.forward(batch)[0]))


def test_masked_sampling_on_the_device_matches_the_host_rules(model, gpu):
    """Grammar masks (bool per token) applied on the device before its sampler: the host's rule on
    the device's own logits with forbidden tokens at -inf; a row without a mask is untouched."""
    _, dev = executors(model, gpu, n_slots=2)
    rng = np.random.default_rng(3)
    batch = Batch(np.array([4, 4, 10, 2, 7], np.int32), np.array([0, 1, 2, 0, 1], np.int32),
                  np.array([0, 0, 0, 1, 1], np.int32), np.array([2, 4], np.int32))
    logits = dev.forward(batch)
    n_vocab = logits.shape[1]
    for trial in range(6):
        rows = [(SamplingParams(0.8 + 0.1 * trial, top_k=[0, 5, 40][trial % 3], top_p=0.95, seed=trial), trial),
                (SamplingParams() if trial % 2 else SamplingParams(1.0, seed=9), trial)]
        masks = [rng.random(n_vocab) < [0.02, 0.3, 0.9][trial % 3], None if trial % 2 else rng.random(n_vocab) < 0.5]
        masks[0][int(np.argmax(logits[0]))] = trial == 0  # the best token forbidden once, allowed after
        got = dev.submit_sample(batch, rows, masks=masks).result()
        want = [sample(row if mask is None else np.where(mask, row, np.float32(-np.inf)), params, step)
                for row, mask, (params, step) in zip(logits, masks, rows, strict=True)]
        assert got == want, trial
        assert masks[0][got[0]] and (masks[1] is None or masks[1][got[1]])
    assert dev.forward_sample(batch, rows) == [sample(row, p, t) for row, (p, t) in zip(logits, rows, strict=True)]


def test_a_kv_cache_over_the_binding_limit_runs_in_slot_groups(model, limited_gpu):
    """Three slots' KV cache where a binding holds two: each layer's cache in two groups (slots 0-1,
    slot 2). Steps that mix the groups' sequences, and prompt copies across them, match numpy."""
    f, plan = model
    device = limited_gpu()
    slot_bytes = 64 * 2 * 16 * (2 if "shader-f16" in device.features else 4)  # n_ctx x n_kv_heads x head_dim
    device.limits["max_storage_buffer_binding_size"] = 2 * slot_bytes + 64
    cpu = CpuExecutor(plan, f.tensor_bytes, n_slots=3, n_ctx=64)
    dev = GpuExecutor(plan, f.tensor_bytes, n_slots=3, n_ctx=64, device=device, max_tokens=32)
    assert {tuple((g.slot0, g.n_slots) for g in a.kv_groups) for a in dev.attentions.values()} == {((0, 2), (2, 1))}
    prefill = Batch(np.array([5, 9, 2, 1, 80, 7, 7], np.int32), np.array([0, 1, 2, 0, 1, 0, 1], np.int32),
                    np.array([0, 0, 0, 2, 2, 1, 1], np.int32), np.array([2, 4, 6], np.int32))
    close(dev.forward(prefill), cpu.forward(prefill))
    for ex in (cpu, dev):  # each way across the groups: slot 2's first two positions into slot 0, then slot 1's into 2
        ex.copy_kv(2, 0, 2)
        ex.copy_kv(1, 2, 2)
    decode = Batch(np.array([3, 4, 6], np.int32), np.array([2, 2, 3], np.int32), np.array([0, 1, 2], np.int32),
                   np.array([0, 1, 2], np.int32))
    close(dev.forward(decode), cpu.forward(decode))


def test_bad_steps_are_refused_with_a_clear_error(model, gpu):
    _, dev = executors(model, gpu)
    with pytest.raises(ValueError, match="past the context"):
        dev.forward(Batch.for_sequence([1], 64))
    with pytest.raises(ValueError, match="slot out of range"):
        dev.forward(Batch.for_sequence([1], 0, slot=2))
    with pytest.raises(ValueError, match="a step of 33 tokens"):
        dev.forward(Batch.for_sequence([1] * 33, 0))


def test_logit_rows_can_be_capped_below_the_step_size(model, gpu):
    f, plan = model
    cpu = CpuExecutor(plan, f.tensor_bytes, n_ctx=64)
    dev = GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=32, max_logit_rows=2)
    assert dev.max_logit_rows == 2
    close(dev.forward(Batch.for_sequence(list(range(10)), 0)), cpu.forward(Batch.for_sequence(list(range(10)), 0)))
    with pytest.raises(ValueError, match="a step of 3 logit rows"):
        dev.forward(Batch(np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32), np.zeros(3, np.int32),
                          np.arange(3, dtype=np.int32)))


def test_weights_streamed_in_odd_pieces_match_the_file(model, gpu):
    """The browser path: tensor bytes go from the download stream straight to device buffers."""
    f, plan = model
    raw = f.path.read_bytes()
    store = StreamedWeights(gpu, f.header.tensors.values())
    rng = np.random.default_rng(0)
    at = 0
    while at < len(raw):
        n = int(rng.integers(1, 5000))
        store.feed(at, raw[at:at + n])
        at += n
    streamed = GpuExecutor(plan, store, n_ctx=64, device=gpu, max_tokens=32)
    from_file = GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=32)
    batch = Batch.for_sequence([3, 1, 4, 1, 5], 0, all_logits=True)
    np.testing.assert_array_equal(streamed.forward(batch), from_file.forward(batch))
    with pytest.raises(ValueError, match="expected"):
        store.feed(5, b"xx")


def test_an_invalid_dispatch_still_raises(gpu):
    """Dispatches are recorded through wgpu-native's C functions; validation must still reach Python."""
    from realm_wasm.gpu.device import STORAGE_RW, GPUError

    src = ("@group(0) @binding(0) var<storage, read_write> y: array<f32>;\n"
           "@compute @workgroup_size(1) fn main(@builtin(global_invocation_id) g: vec3<u32>) { y[g.x] = 1.0; }")
    pipe = gpu.create_pipeline(src)
    buf = gpu.create_buffer(64, STORAGE_RW)
    group = gpu.create_bind_group(pipe, [(buf, 0, 64)])
    with pytest.raises(GPUError, match="dispatch group size"):
        gpu.submit([(pipe, group, (gpu.limits["max_compute_workgroups_per_dimension"] + 1, 1, 1))])
    gpu.submit([(pipe, group, (16, 1, 1))])
    assert np.frombuffer(gpu.read_buffer(buf, 0, 64), np.float32).tolist() == [1.0] * 16


# ---------------------------------------------------------------------------------------------
# gemma3: Q/K norms, post-norms, sliding-window layers; the rope of q and of k in one dispatch

GEMMA_LAYERS, GEMMA_WINDOW = 6, 4  # layer 5 attends globally, the others see the last 4 positions


def make_gemma3(path, rng) -> None:
    """A random gemma3 GGUF: 4 query heads and 2 KV heads of 32 dims over a 64-wide residual."""
    d, n_heads, n_kv, hd, ffn, vocab = 64, 4, 2, 32, 128, 96
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(GEMMA_LAYERS)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(GEMMA_WINDOW)
    w.add_rope_freq_base(1e6)

    def add(name, shape, qtype=Q.F32, scale=0.3):
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, d), Q.Q8_0, 1.0)
    add("output_norm.weight", (d,), scale=1.0)
    for i in range(GEMMA_LAYERS):
        p = f"blk.{i}."
        for norm, width in (("attn_norm", d), ("attn_q_norm", hd), ("attn_k_norm", hd), ("post_attention_norm", d),
                            ("ffn_norm", d), ("post_ffw_norm", d)):
            add(p + norm + ".weight", (width,), scale=1.0)
        add(p + "attn_q.weight", (n_heads * hd, d), Q.Q8_0)
        add(p + "attn_k.weight", (n_kv * hd, d), Q.Q8_0)
        add(p + "attn_v.weight", (n_kv * hd, d), Q.Q8_0)
        add(p + "attn_output.weight", (d, n_heads * hd), Q.Q8_0)
        add(p + "ffn_gate.weight", (ffn, d), Q.Q8_0)
        add(p + "ffn_up.weight", (ffn, d), Q.Q8_0)
        add(p + "ffn_down.weight", (d, ffn), Q.Q8_0, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "gemma3.gguf"
    make_gemma3(path, np.random.default_rng(3))
    f = read_gguf(path)
    return f, build_plan(f.header)


def without_rope_pairs(plan, limit, adapted=()):
    """The fused program as before ropes were paired: the queries' rope (with its norm) is a kernel
    of its own again, where the queries' rope op stands."""
    kernels = []
    for k in fuse(plan, limit, adapted):
        if "pair" in k.fused:
            roles = dict(k.fused)
            q, q_norm = roles.pop("pair"), roles.pop("pair_norm", None)
            kernels.append(Kernel("rope", q, {"norm": q_norm} if q_norm is not None else {}))
            k = Kernel("rope", k.op, roles)
        kernels.append(k)
    return sorted(kernels, key=lambda k: k.op)


def decode_dispatches(ex: GpuExecutor) -> int:
    return sum(len(launch.dispatches({"T": 1, "R": 1})) for launch in ex.launches)


def dispatches_per_layer(ex: GpuExecutor) -> list[int]:
    """Dispatches of a one-token step in each layer, by the program's layers (describe's sections)."""
    counts: dict[int, int] = {}
    layer = None
    for kernel, launch in zip(ex.program, ex.launches, strict=True):
        layer = fuse_module._layer(ex.plan, kernel) if fuse_module._layer(ex.plan, kernel) is not None else layer
        if layer is not None and ex.plan.ops[kernel.op].kind != "gather":
            counts[layer] = counts.get(layer, 0) + len(launch.dispatches({"T": 1, "R": 1}))
        if ex.plan.ops[kernel.op].kind == "gather":
            break
    return [counts[i] for i in sorted(counts)]


def test_gemma3_ropes_q_and_k_in_one_dispatch_and_matches_numpy(gemma, gpu, monkeypatch):
    cpu, paired = executors(gemma, gpu)
    with monkeypatch.context() as m:
        m.setattr(gpu_executor, "fuse", without_rope_pairs)
        _, unpaired = executors(gemma, gpu)
    assert decode_dispatches(unpaired) - decode_dispatches(paired) == GEMMA_LAYERS
    # two sequences prefilling past the sliding window, then both decoding in one step
    tokens = [3, 17, 42, 8, 8, 91, 0, 55, 23]
    prefill = Batch(np.array(tokens + tokens[:5], np.int32), np.r_[0:9, 0:5].astype(np.int32),
                    np.array([0] * 9 + [1] * 5, np.int32), np.arange(14, dtype=np.int32))
    decode = Batch(np.array([7, 6], np.int32), np.array([9, 5], np.int32), np.array([0, 1], np.int32),
                   np.array([0, 1], np.int32))
    for batch in (prefill, decode):
        want = cpu.forward(batch)
        close(paired.forward(batch), want)
        close(unpaired.forward(batch), want)


def rope_pairs(plan) -> dict[int, int]:
    """keys' rope op -> the queries' rope op its kernel also computes."""
    return {k.op: k.fused["pair"] for k in fuse(plan) if "pair" in k.fused}


def test_ropes_pair_only_with_the_same_angles_and_nothing_in_between(gemma, model):
    plan = gemma[1]
    ops = plan.ops
    ropes = [i for i, op in enumerate(ops) if op.kind == "rope"]
    kernels = {k.op: k for k in fuse(plan)}
    # every layer: the keys' rope (norm + KV store) also does the queries' (norm)
    assert rope_pairs(plan) == {k: q for q, k in zip(ropes[::2], ropes[1::2], strict=True)}
    assert all(set(kernels[k].fused) == {"norm", "store", "pair", "pair_norm"} for k in ropes[1::2])
    llama = {k.op: k for k in fuse(model[1])}
    assert all(set(llama[k].fused) == {"store", "pair"} for k in rope_pairs(model[1]))  # llama: no norms
    q0, k0 = ropes[0], ropes[1]
    # frequency factors on the queries only: different angles
    freqs = [dataclasses.replace(op, weights=("rope_freqs.weight",)) if i == q0 else op for i, op in enumerate(ops)]
    # something reads q between the two ropes: the queries' rope must stay where it is
    reads_q = ops[:k0] + [Op("add", "o", ("q", "q"))] + ops[k0:]
    for changed in (freqs, reads_q):
        pairs = rope_pairs(dataclasses.replace(plan, ops=changed))
        assert q0 not in pairs.values() and len(pairs) == GEMMA_LAYERS - 1


def test_the_program_pins_dispatches_per_layer(gemma, model, gpu):
    """A decode step: 7 dispatches per gemma3 layer (q+k, v, rope q,k + norms + KV store, attention,
    o + residual norm, GLU, down + residual norm), layer 0 also its pre-norm. The test llama has no
    post-norms: o and down run the residual add and the next pre-norm themselves, so 7 too, but
    its gate (Q4_0 or Q8_0) and up (Q5_1) weights cannot be joined (gate, up, activation: 9)."""
    _, ex = executors(gemma, gpu)
    assert dispatches_per_layer(ex) == [8] + [7] * (GEMMA_LAYERS - 1)
    _, ex = executors(model, gpu)
    n_layers = model[1].kv.n_layers
    assert dispatches_per_layer(ex) == [10] + [9] * (n_layers - 1)
    lines = describe(gemma[1], fuse(gemma[1]))
    assert lines[1] == ("layer 0: norm h | matmul q+k | matmul v | rope q,k + norm + kv store | attention (window 4) "
                        "| matmul o + norm + residual x + norm h | glu gelu | matmul f + norm + residual x + norm h")


def reorder_layers(plan):
    """The same model with every layer's ops in another legal order: v first, then each of q and k
    normed and rotated right after its own projection."""
    ops, out = plan.ops, []
    i = 0
    while i < len(ops):
        op = ops[i]
        if op.kind == "matmul" and op.out == "q":  # q, k, v, qnorm, knorm, rope q, rope k -> v, q, qn, rq, k, kn, rk
            q, k, v, qn, kn, rq, rk = ops[i:i + 7]
            out += [v, q, qn, rq, k, kn, rk]
            i += 7
        else:
            out.append(op)
            i += 1
    return dataclasses.replace(plan, ops=out)


def test_ops_in_another_legal_order_fuse_alike(gemma, gpu):
    f, plan = gemma
    moved = reorder_layers(plan)
    assert [op.kind for op in moved.ops] != [op.kind for op in plan.ops]
    moved.validate()
    # the same kernels, in another order where the ops stand elsewhere
    assert sorted((k.kind, sorted(k.fused)) for k in fuse(moved)) == sorted((k.kind, sorted(k.fused))
                                                                            for k in fuse(plan))
    cpu = CpuExecutor(plan, f.tensor_bytes, n_ctx=64)
    dev = GpuExecutor(moved, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=32)
    assert dispatches_per_layer(dev) == [8] + [7] * (GEMMA_LAYERS - 1)
    for batch in (Batch.for_sequence([3, 17, 42, 8, 8, 91], 0, all_logits=True), Batch.for_sequence([5], 6)):
        close(dev.forward(batch), cpu.forward(batch))


def test_residual_adds_without_post_norms_match_numpy_at_every_step_size(model, gpu):
    """llama's o and down run the residual add and the next pre-norm in the mat-vec's last workgroup
    (decode) or as one add + norm kernel after the mat-mat (steps of more than 12 tokens)."""
    cpu, dev = executors(model, gpu)
    kernels = [k for k in fuse(model[1]) if k.kind == "matmul" and "add" in k.fused]
    assert len(kernels) == 2 * model[1].kv.n_layers and all("norm" not in k.fused for k in kernels)
    tokens = list(range(3, 23))
    close(dev.forward(Batch.for_sequence(tokens, 0, all_logits=True)),
          cpu.forward(Batch.for_sequence(tokens, 0, all_logits=True)))
    close(dev.forward(Batch.for_sequence([7], 20)), cpu.forward(Batch.for_sequence([7], 20)))
