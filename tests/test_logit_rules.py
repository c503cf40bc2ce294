"""logit_bias, penalties, logprobs and seeds through the scheduler, on the numpy and wgpu executors.

The oracles are written here, independently of sampling.py: penalties as plain Python loops over
one row of known logits, and whole generations re-running the model on the numpy executor from
position 0 for every token (`Engine.prefill`, no KV reuse), adjusting that row by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_scheduler import N_CTX, Recorder, write_tiny_model

from realm_wasm.engine import Engine, Model
from realm_wasm.errors import InvalidRequest
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.sampling import LogitRules, SamplingParams, adjust_logits, token_logprobs
from realm_wasm.scheduler import Request, Scheduler
from realm_wasm.speculative import Speculation

PROMPT = [1, 40, 41, 42, 40, 41]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def numpy_engine(model_path):
    return Engine.load(model_path, backend="numpy", n_ctx=N_CTX, n_slots=2)


@pytest.fixture(scope="module")
def gpu_engine(model_path, gpu):
    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    executor = GpuExecutor(model.plan, f.tensor_bytes, n_slots=2, n_ctx=N_CTX, device=gpu, max_tokens=32)
    return Engine(model, executor, N_CTX)


def run(engine: Engine, requests: list[Request]) -> list[Recorder]:
    """Every request through one scheduler at once; their events."""
    scheduler = Scheduler(engine, n_slots=2, max_step_tokens=32)
    recorders = [Recorder() for _ in requests]
    for request, recorder in zip(requests, recorders, strict=True):
        scheduler.submit(request, recorder)
    while scheduler.busy:
        scheduler.step()
    return recorders


def by_hand(logits: list[float], bias: dict[int, float], presence: float, frequency: float,
            repetition: float, last_n: int, context: list[int], n_prompt: int) -> list[float]:
    """The documented rules, one token at a time."""
    z = list(logits)
    for token, b in bias.items():
        z[token] += b
    for token in set(context[-last_n:] if last_n else []):
        z[token] = z[token] / repetition if z[token] > 0 else z[token] * repetition
    for token in set(context[n_prompt:]):
        z[token] -= presence + frequency * context[n_prompt:].count(token)
    return z


def test_adjust_logits_applies_bias_then_penalties_as_documented():
    logits = [2.0, -1.0, 0.5, 3.0, -0.25, 1.0]
    context = [0, 1, 2, 3, 3, 0, 3]  # prompt [0, 1, 2], then 3, 3, 0, 3 generated
    rules = LogitRules(logit_bias=((4, 2.5), (5, -100.0)), presence_penalty=0.5, frequency_penalty=0.25,
                       repetition_penalty=1.5, repeat_last_n=5)
    got = adjust_logits(np.array(logits, np.float32), rules, context, n_prompt=3)
    want = by_hand(logits, {4: 2.5, 5: -100.0}, 0.5, 0.25, 1.5, 5, context, 3)
    # one hand-computed entry: token 3 is in the window (3 > 0: / 1.5), generated 3 times
    assert want[3] == pytest.approx(3.0 / 1.5 - 0.5 - 3 * 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_token_logprobs_are_log_softmax_with_the_top_alternatives():
    logits = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    total = sum(math.exp(v) for v in logits)
    lp = token_logprobs(logits, 3, top=2)
    assert lp.logprob == pytest.approx(-2.0 - math.log(total))
    assert [t for t, _ in lp.top] == [1, 2]  # ties to the lower id
    assert lp.top[0][1] == pytest.approx(3.0 - math.log(total))


def oracle_generation(engine: Engine, prompt: list[int], n: int, rules: LogitRules,
                      sampling: SamplingParams) -> tuple[list[int], list[np.ndarray]]:
    """Tokens from the whole sequence recomputed for each step, the row adjusted by `by_hand`."""
    from realm_wasm.sampling import sample

    tokens, rows = list(prompt), []
    for step in range(n):
        [row] = list(engine.prefill(tokens, slot=1))
        rows.append(row[-1])
        z = by_hand(row[-1].tolist(), dict(rules.logit_bias), rules.presence_penalty, rules.frequency_penalty,
                    rules.repetition_penalty, rules.repeat_last_n, tokens, len(prompt))
        tokens.append(sample(np.array(z, np.float32), sampling, step))
    return tokens[len(prompt):], rows


PENALIZED = LogitRules(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.3, repeat_last_n=8)
RULES = {"penalties": PENALIZED, "bias": LogitRules(logit_bias=((45, 40.0), (46, 30.0), (2, -100.0))),
         "both": LogitRules(logit_bias=((45, 20.0),), frequency_penalty=15.0, repetition_penalty=1.1)}


@pytest.mark.parametrize("name", list(RULES))
def test_rules_steer_generation_as_the_oracle_says(numpy_engine, name):
    rules, sampling = RULES[name], SamplingParams()
    want, _ = oracle_generation(numpy_engine, PROMPT, 10, rules, sampling)
    plain = run(numpy_engine, [Request(PROMPT, 10, sampling, stop_at_eos=False)])[0].tokens
    [steered, neighbour] = run(numpy_engine, [Request(PROMPT, 10, sampling, rules=rules, stop_at_eos=False),
                                              Request(PROMPT, 10, sampling, stop_at_eos=False)])
    assert steered.tokens == want
    assert want != plain  # the rules changed what greedy decoding picks
    assert neighbour.tokens == plain  # a request without rules in the same steps is untouched


def test_logprobs_are_the_log_softmax_of_the_models_logits(numpy_engine):
    sampling = SamplingParams(temperature=0.9, seed=5)
    [rec] = run(numpy_engine, [Request(PROMPT, 6, sampling, logprobs=3, stop_at_eos=False)])
    tokens, rows = oracle_generation(numpy_engine, PROMPT, 6, LogitRules(), sampling)
    assert rec.tokens == tokens
    events = [e for e in rec.events if getattr(e, "token_id", None) is not None]
    for event, row in zip(events, rows, strict=True):
        z = row.astype(np.float64)
        logp = z - np.log(np.exp(z - z.max()).sum()) - z.max()
        assert event.logprob.logprob == pytest.approx(logp[event.token_id], abs=1e-5)
        assert [t for t, _ in event.logprob.top] == list(np.argsort(-logp, kind="stable")[:3])


def test_rules_and_logprobs_refuse_speculation_and_ids_outside_the_vocab(numpy_engine):
    scheduler = Scheduler(numpy_engine, n_slots=1)
    with pytest.raises(InvalidRequest, match="speculation cannot be combined"):
        scheduler.submit(Request(PROMPT, 4, logprobs=0, speculation=Speculation("lookup")), Recorder())
    with pytest.raises(InvalidRequest, match="logit_bias has token ids outside"):
        scheduler.submit(Request(PROMPT, 4, rules=LogitRules(logit_bias=((10**6, 1.0),))), Recorder())


def test_the_gpu_executor_applies_rules_and_reports_logprobs_like_numpy(numpy_engine, gpu_engine):
    requests = [Request(PROMPT, 8, SamplingParams(), rules=PENALIZED, logprobs=2, stop_at_eos=False),
                Request(PROMPT, 8, SamplingParams(temperature=1.0, seed=3), rules=RULES["bias"], stop_at_eos=False)]
    cpu, gpu = run(numpy_engine, requests), run(gpu_engine, requests)
    assert [r.tokens for r in gpu] == [r.tokens for r in cpu]
    cpu_lp = [e.logprob.logprob for e in cpu[0].events if getattr(e, "logprob", None)]
    gpu_lp = [e.logprob.logprob for e in gpu[0].events if getattr(e, "logprob", None)]
    np.testing.assert_allclose(gpu_lp, cpu_lp, atol=2e-2)  # the GPU's f16 rounding


def test_the_same_seed_gives_the_same_text_on_numpy_and_wgpu(numpy_engine, gpu_engine):
    requests = [Request(PROMPT, 12, SamplingParams(temperature=1.0, top_p=0.9, seed=seed), stop_at_eos=False)
                for seed in (1, 2)]
    cpu, gpu = run(numpy_engine, requests), run(gpu_engine, requests)
    assert [r.text for r in gpu] == [r.text for r in cpu]
    assert cpu[0].text != cpu[1].text  # the seed matters
    assert run(numpy_engine, requests[:1])[0].text == cpu[0].text  # and repeats
