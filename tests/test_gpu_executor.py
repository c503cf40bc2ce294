"""The GPU executor runs the same Plan as the numpy executor and gets the same answers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_llama import make_model

from realm_wasm.cpu import CpuExecutor
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.gpu.weights import StreamedWeights
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch
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
    store = StreamedWeights(gpu, f.header)
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
    import wgpu

    from realm_wasm.gpu.device import STORAGE_RW

    src = ("@group(0) @binding(0) var<storage, read_write> y: array<f32>;\n"
           "@compute @workgroup_size(1) fn main(@builtin(global_invocation_id) g: vec3<u32>) { y[g.x] = 1.0; }")
    pipe = gpu.create_pipeline(src)
    buf = gpu.create_buffer(64, STORAGE_RW)
    group = gpu.create_bind_group(pipe, [(buf, 0, 64)])
    with pytest.raises(wgpu.GPUValidationError, match="dispatch group size"):
        gpu.submit([(pipe, group, (gpu.limits["max_compute_workgroups_per_dimension"] + 1, 1, 1))])
    gpu.submit([(pipe, group, (16, 1, 1))])
    assert np.frombuffer(gpu.read_buffer(buf, 0, 64), np.float32).tolist() == [1.0] * 16
