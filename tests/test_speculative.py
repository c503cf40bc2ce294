"""Speculative decoding: drafted tokens verified in one forward pass give plain decoding's tokens.

Oracles: the same engine decoding without speculation (token for token, greedy and sampled with
the same seeds), the numpy softmax of the target's own logits (a chi-square test of the sampled
distribution at verified positions), and hand-built cases for the drafters.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_scheduler import N_CTX, Recorder, run_all, write_tiny_model

from realm_wasm.engine import Engine, Model
from realm_wasm.errors import InvalidRequest
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.model_files import default_model_path
from realm_wasm.plan import Batch
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import GREEDY, Request, Scheduler
from realm_wasm.speculative import LookupDrafter, Speculation, SpeculationState, accepted_prefix

HOT = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=7)
# a lookup-friendly prompt for the tiny character model: it repeats itself
REPEAT = "abcdefgh abcdefgh abcdefgh abcdefgh abc"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_model(d / "tiny.gguf")
    return d / "tiny.gguf"


def tokens_of(engine: Engine, prompt, n: int, sampling=GREEDY, speculation=None):
    events = list(engine.generate_events(prompt, n, sampling, stop_at_eos=False, speculation=speculation))
    return [e.token_id for e in events[:-1] if e.token_id is not None], events[-1]


def test_lookup_proposes_what_followed_the_longest_earlier_ngram():
    drafter = LookupDrafter(ngram=3)
    assert drafter.propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    assert drafter.propose([1, 2, 3, 4, 5, 9, 2, 3, 4], 2) == [5, 9]  # "2 3 4" now, incrementally indexed
    assert LookupDrafter(ngram=2).propose([7, 8, 9], 4) == []  # no earlier occurrence
    assert LookupDrafter(ngram=2).propose([5, 5, 5], 4) == [5]  # the latest earlier one, not the suffix itself
    assert accepted_prefix([4, 5, 9], [4, 5, 1, 2]) == 2 and accepted_prefix([4], [3, 0]) == 0


def test_lookup_pauses_the_run_ahead_only_where_the_text_repeats_a_full_ngram():
    state = SpeculationState.start(Speculation("lookup", ngram=3))
    assert not state.worth_a_pause([1, 2, 3, 4, 2, 3])  # "2 3" repeats, the trigram "4 2 3" does not
    assert state.worth_a_pause([1, 2, 3, 4, 1, 2, 3])  # "1 2 3" occurred before
    state.verified(0)  # nothing accepted: backing off, whatever the text
    assert state.wait == 1 and not state.worth_a_pause([1, 2, 3, 4, 1, 2, 3])
    assert SpeculationState.start(Speculation("draft")).worth_a_pause([5])  # a draft model always drafts


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_with_lookup_is_plain_greedy_token_for_token(tiny, k):
    engine = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    ids = engine.tokenizer.encode(REPEAT)
    plain, _ = tokens_of(engine, ids, 40)
    spec, end = tokens_of(engine, ids, 40, speculation=Speculation("lookup", max_draft=k))
    assert spec == plain
    # a random model rarely continues the pattern: the drafts are tried, and mostly rejected
    assert end.drafted_tokens > 0 and end.accepted_tokens <= end.drafted_tokens


def test_sampled_with_lookup_is_plain_sampling_seed_for_seed(tiny):
    engine = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    ids = engine.tokenizer.encode(REPEAT)
    for seed in range(6):
        sampling = SamplingParams(temperature=0.7, top_k=20, seed=seed)
        plain, _ = tokens_of(engine, ids, 24, sampling)
        spec, end = tokens_of(engine, ids, 24, sampling, Speculation("lookup", max_draft=4))
        assert spec == plain, f"seed {seed}"
        assert end.drafted_tokens > 0


def test_the_sampled_distribution_at_verified_positions_is_the_targets(tiny):
    """At T = 1, over many seeds, the tokens of a verification step follow the target's own
    softmax (computed here from its logits in numpy): its first row, and its second wherever the
    first was the draft (that row's context is the draft): Pearson's chi-square within its 99.9%
    bound. The target drafts for itself (greedy), so each draft is its top token. The prompt's own
    step gives token 0; the verification step (token 1 + its draft) gives tokens 1 and 2: looked
    at among the runs with the most common token 0."""
    engine = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    engine.set_draft(Engine.load(tiny, backend="numpy", n_ctx=N_CTX))
    ids = engine.tokenizer.encode("Hello, wor")
    runs = []
    for seed in range(800):
        out, end = tokens_of(engine, ids, 3, SamplingParams(temperature=1.0, top_k=8, seed=seed),
                             Speculation("draft", max_draft=1))
        assert end.drafted_tokens == 1
        runs.append(out)
    t0 = max(set(r[0] for r in runs), key=[r[0] for r in runs].count)
    first = next(iter(engine.prefill(ids + [t0])))[-1]
    draft = int(np.argmax(first))
    second = next(iter(engine.prefill(ids + [t0, draft])))[-1]
    counts, after_draft = np.zeros(len(first)), np.zeros(len(first))
    for r in runs:
        if r[0] == t0:
            counts[r[1]] += 1
            if r[1] == draft:
                after_draft[r[2]] += 1

    def expected(logits: np.ndarray, k: int = 8) -> np.ndarray:
        top = np.argsort(-logits, kind="stable")[:k]
        p = np.zeros(len(logits))
        z = np.exp(logits[top].astype(np.float64) - logits[top].max())
        p[top] = z / z.sum()
        return p

    def chi2_ok(observed: np.ndarray, p: np.ndarray) -> None:
        n, support = observed.sum(), p > 0
        assert observed[~support].sum() == 0, "a token outside the top-k was sampled"
        stat = ((observed[support] - n * p[support]) ** 2 / (n * p[support])).sum()
        dof = support.sum() - 1
        assert stat < 24.3, f"chi-square {stat:.1f} over {dof} degrees of freedom"  # 99.9% quantile, 7 dof

    chi2_ok(counts, expected(first))
    assert counts.sum() > 100 and after_draft.sum() > 40
    chi2_ok(after_draft, expected(second))


def test_speculating_and_plain_sequences_share_one_batch(tiny):
    engine = Engine.load(tiny, backend="numpy", n_ctx=N_CTX, n_slots=3)
    alone = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    prompts = [REPEAT, "Hello, world", "0123 0123 0123 0123 01"]
    specs = [Speculation("lookup", 6), None, Speculation("lookup", 3)]
    expect = [tokens_of(alone, engine.tokenizer.encode(p), 20, HOT)[0] for p in prompts]
    scheduler = Scheduler(engine, n_slots=3, max_step_tokens=64)
    sinks = [Recorder() for _ in prompts]
    for prompt, spec, sink in zip(prompts, specs, sinks, strict=True):
        scheduler.submit(Request(engine.tokenizer.encode(prompt), 20, HOT, stop_at_eos=False, speculation=spec), sink)
    run_all(scheduler)
    assert [s.tokens for s in sinks] == expect
    assert sinks[0].finished.drafted_tokens > 0 and sinks[1].finished.drafted_tokens == 0


def test_a_draft_model_drafts_for_the_target(tiny, tmp_path):
    """The target as its own draft model accepts everything greedy; a different model of the same
    vocabulary drafts worse, and the tokens are still the target's."""
    target = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    ids = target.tokenizer.encode("Hello, world")
    plain, _ = tokens_of(target, ids, 16)
    target.set_draft(Engine.load(tiny, backend="numpy", n_ctx=N_CTX))
    same, end = tokens_of(target, ids, 16, speculation=Speculation("draft", max_draft=4))
    assert same == plain and end.accepted_tokens == end.drafted_tokens > 0
    other_path = tmp_path / "other.gguf"
    write_tiny_model(other_path, seed=11)
    target.set_draft(Engine.load(other_path, backend="numpy", n_ctx=N_CTX))
    other, end = tokens_of(target, ids, 16, speculation=Speculation("draft", max_draft=4))
    assert other == plain and end.accepted_tokens < end.drafted_tokens
    again, _ = tokens_of(target, ids, 16, HOT, Speculation("draft", max_draft=4))
    assert again == tokens_of(Engine.load(tiny, backend="numpy", n_ctx=N_CTX), ids, 16, HOT)[0]


def test_a_draft_model_must_share_the_vocabulary_and_be_loaded(tiny, tmp_path):
    target = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    with pytest.raises(InvalidRequest, match="no draft model is loaded"):
        tokens_of(target, [1, 5, 6], 4, speculation=Speculation("draft"))
    model = Engine.load(default_model_path(), backend="numpy", n_ctx=64)
    with pytest.raises(InvalidRequest, match="vocabulary has 262144 tokens"):
        target.set_draft(model)
    with pytest.raises(InvalidRequest, match="unknown speculation method"):
        Speculation("medusa")


def test_greedy_lookup_on_the_gpu_is_plain_greedy(tiny, gpu):
    f = read_gguf(tiny)
    model = Model.from_header(f.header)

    def engine() -> Engine:
        return Engine(model, GpuExecutor(model.plan, f.tensor_bytes, n_ctx=N_CTX, device=gpu), N_CTX)

    ids = model.tokenizer.encode(REPEAT)
    plain, _ = tokens_of(engine(), ids, 30)
    for k in (1, 4, 8):
        spec, end = tokens_of(engine(), ids, 30, speculation=Speculation("lookup", max_draft=k))
        assert spec == plain and end.drafted_tokens > 0


COPY = "Copy this list exactly: red, green, blue, yellow, orange. Copy this list exactly: red, green, blue,"


@pytest.fixture(scope="module")
def default_engine():
    engine = Engine.load(default_model_path(), backend="numpy", n_ctx=256)
    return engine, tokens_of(engine, COPY, 12)[0]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_lookup_on_the_default_model_is_plain_greedy(k, default_engine):
    engine, plain = default_engine
    spec, end = tokens_of(engine, COPY, 12, speculation=Speculation("lookup", max_draft=k))
    assert spec == plain
    assert end.accepted_tokens > 0  # the base model copies the list: drafts from the prompt pay


def test_verification_rows_follow_the_executor_logit_budget(tiny):
    """A step never asks for more logit rows than the executor returns (the page's holds 8)."""
    engine = Engine.load(tiny, backend="numpy", n_ctx=N_CTX)
    engine.executor.max_logit_rows = 4
    seen = []
    inner = engine.executor.submit_sample

    def recording(batch: Batch, rows, follow=False):
        seen.append(len(batch.logit_rows))
        return inner(batch, rows, follow)

    engine.executor.submit_sample = recording
    tokens_of(engine, engine.tokenizer.encode(REPEAT), 20, speculation=Speculation("lookup", max_draft=8))
    assert max(seen) <= 4



def test_drafts_keep_a_decoding_step_within_the_executor_exact_rows(default_engine, monkeypatch):
    """On the GPU a step of more than `exact_rows` tokens runs the mat-mat, whose logits are not
    the mat-vec's: drafts stop where the step would leave it (k = 8 asked, 3 fit with the token)."""
    engine, plain = default_engine
    seen = []
    inner = engine.executor.submit_sample

    def recording(batch: Batch, rows, follow=False):
        seen.append(len(batch))
        return inner(batch, rows, follow)

    monkeypatch.setattr(engine.executor, "exact_rows", 4)
    monkeypatch.setattr(engine.executor, "submit_sample", recording)
    spec, end = tokens_of(engine, COPY, 12, speculation=Speculation("lookup", max_draft=8))
    assert spec == plain and end.drafted_tokens > 0
    assert max(seen[1:]) == 4  # the steps after the prompt's
