"""Decode one step ahead on the GPU: steps queued with `follow` take their token from the GPU's own
sample of the step before, and give exactly what feeding each sampled id back from the host gives."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_llama import make_model

from realm_wasm.cpu import CpuExecutor
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch
from realm_wasm.sampling import SamplingParams

Q = gguf.GGMLQuantizationType
HOT = SamplingParams(1.5, top_k=40, top_p=0.95, seed=11)  # a wide distribution: many distinct ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "llama.gguf"
    make_model(path, np.random.default_rng(3), Q.Q8_0, True, False)
    f = read_gguf(path)
    return f, build_plan(f.header)


def fed_from_host(executor, prompt: list[int], n: int, sampling: SamplingParams) -> list[int]:
    ids, last, pos = [], prompt, 0
    for step in range(n):
        [token] = executor.forward_sample(Batch.for_sequence(last, pos), [(sampling, step)])
        ids.append(token)
        pos, last = pos + len(last), [token]
    return ids


def queued_ahead(executor, prompt: list[int], n: int, sampling: SamplingParams) -> list[int]:
    """Every step queued before any id is read back."""
    pending = [executor.submit_sample(Batch.for_sequence(prompt, 0), [(sampling, 0)])]
    for step in range(1, n):
        pos = len(prompt) + step - 1
        pending.append(executor.submit_sample(Batch.for_sequence([0], pos), [(sampling, step)], follow=True))
    return [p.result()[0] for p in pending]


@pytest.mark.parametrize("sampling", [SamplingParams(), HOT], ids=["greedy", "sampled"])
def test_steps_queued_ahead_equal_steps_fed_from_the_host(model, gpu, sampling):
    f, plan = model
    prompt = [5, 17, 42, 8]
    gpu_a = GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=8)
    gpu_b = GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=8)
    cpu = CpuExecutor(plan, f.tensor_bytes, n_ctx=64)
    expected = fed_from_host(gpu_a, prompt, 12, sampling)
    assert queued_ahead(gpu_b, prompt, 12, sampling) == expected
    assert len(set(expected)) > 3  # the chain really carried changing tokens
    if sampling == SamplingParams():  # greedy: the numpy executor agrees (no f16 ties at these margins)
        assert queued_ahead(cpu, prompt, 12, sampling) == fed_from_host(CpuExecutor(plan, f.tensor_bytes, n_ctx=64),
                                                                       prompt, 12, sampling)


def test_a_follow_up_step_must_match_the_rows_sampled_before(model, gpu):
    f, plan = model
    ex = GpuExecutor(plan, f.tensor_bytes, n_slots=2, n_ctx=64, device=gpu, max_tokens=8)
    ex.submit_sample(Batch.for_sequence([1, 2, 3], 0), [(SamplingParams(), 0)]).result()
    two = Batch(np.array([0, 0], np.int32), np.array([3, 0], np.int32), np.array([0, 1], np.int32),
                np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="follow-up step of 2 tokens after a step that sampled 1"):
        ex.submit_sample(two, [(SamplingParams(), 1)] * 2, follow=True)


@pytest.mark.parametrize("sampling", [SamplingParams(), HOT], ids=["greedy", "sampled"])
def test_several_steps_in_one_submit_equal_steps_fed_from_the_host(model, gpu, sampling):
    """One submit of k decode steps (the device feeds each step the ids of the one before, moves
    positions and sampler counters on) gives the k ids k submits give, on either executor."""
    f, plan = model
    prompt = [5, 17, 42, 8]
    for make in (lambda: GpuExecutor(plan, f.tensor_bytes, n_ctx=64, device=gpu, max_tokens=8),
                 lambda: CpuExecutor(plan, f.tensor_bytes, n_ctx=64)):
        ex = make()
        first = ex.submit_sample(Batch.for_sequence(prompt, 0), [(sampling, 0)])
        at = len(prompt)
        four = ex.submit_sample(Batch.for_sequence([0], at), [(sampling, 1)], follow=True, steps=4)
        three = ex.submit_sample(Batch.for_sequence([0], at + 4), [(sampling, 5)], follow=True, steps=3)
        two = ex.submit_sample(Batch.for_sequence([0], at + 7), [(sampling, 8)], follow=True, steps=2)
        expected = fed_from_host(make(), prompt, 10, sampling)
        assert first.result() + four.result() + three.result() + two.result() == expected, ex.name
        assert len(set(expected)) > 3


def test_several_steps_in_one_submit_are_checked(model, gpu):
    f, plan = model
    ex = GpuExecutor(plan, f.tensor_bytes, n_slots=2, n_ctx=16, device=gpu, max_tokens=8)
    greedy = [(SamplingParams(), 0)]
    with pytest.raises(ValueError, match=r"5 steps in one submit \(2..4 allowed\)"):
        ex.submit_sample(Batch.for_sequence([1], 0), greedy, steps=5)
    with pytest.raises(ValueError, match="run past the context"):
        ex.submit_sample(Batch.for_sequence([1], 13), greedy, steps=4)
    with pytest.raises(ValueError, match="need a decode step"):
        ex.submit_sample(Batch.for_sequence([1, 2], 0), greedy, steps=2)
    with pytest.raises(ValueError, match="masks hold for one step"):
        ex.submit_sample(Batch.for_sequence([1], 0), greedy, steps=2, masks=[np.ones(plan.n_vocab, bool)])
