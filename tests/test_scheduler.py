"""The continuous-batching scheduler on a tiny random llama GGUF (with a one-character-per-token vocab).

The oracle for every batched run is `Engine.generate` running the same request alone in slot 0.
"""

from __future__ import annotations

from concurrent.futures import Future

import gguf
import numpy as np
import pytest

from realm_wasm.cpu import CpuExecutor
from realm_wasm.engine import GREEDY, ContextOverflow, Engine, Model, TokenEvent
from realm_wasm.gguf import read_gguf
from realm_wasm.gpu.executor import GpuExecutor
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import Finished, Request, Scheduler, StopText

D, HEADS, KV_HEADS, FFN, LAYERS, N_CTX = 64, 4, 2, 128, 2, 96
CHARS = "\u2581" + "".join(chr(c) for c in range(33, 125))  # "▁" spells a space
VOCAB = 3 + len(CHARS)  # <unk>, <s>, </s>, then one token per character


def write_tiny_model(path, v_dtype=np.float32, seed: int = 7, n_ctx: int = N_CTX, chars: str = CHARS) -> None:
    """A random llama GGUF; `v_dtype` float64 makes the attention's v projection a type no GPU
    kernel reads (F64); `chars`: the characters of its vocab, one token each."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *chars])
    w.add_token_scores([0.0] * (3 + len(chars)))
    w.add_token_types([2, 3, 3] + [1] * len(chars))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(False)

    def add(name, shape, scale=0.4, dtype=np.float32):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(dtype))

    add("token_embd.weight", (3 + len(chars), D), 1.0)
    add("output_norm.weight", (D,), 1.0)
    hd = D // HEADS
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (D,), 1.0)
        add(p + "ffn_norm.weight", (D,), 1.0)
        add(p + "attn_q.weight", (HEADS * hd, D))
        add(p + "attn_k.weight", (KV_HEADS * hd, D))
        add(p + "attn_v.weight", (KV_HEADS * hd, D), dtype=v_dtype)
        add(p + "attn_output.weight", (D, HEADS * hd))
        add(p + "ffn_gate.weight", (FFN, D))
        add(p + "ffn_up.weight", (FFN, D))
        add(p + "ffn_down.weight", (D, FFN), 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_model(path)
    return path


def load(path, n_slots: int) -> Engine:
    return Engine.load(path, backend="numpy", n_ctx=N_CTX, n_slots=n_slots)


@pytest.fixture(scope="module")
def alone(model_path):
    """Tokens and text of a request run by itself through Engine.generate (slot 0, one sequence)."""
    engine = load(model_path, 1)

    def run(prompt: str, max_tokens: int, sampling: SamplingParams = GREEDY, stop_at_eos: bool = True):
        events = list(engine.generate(prompt, max_tokens, sampling, stop_at_eos))
        return [e.token_id for e in events if e.token_id is not None], "".join(e.text for e in events)

    return run


class Recorder:
    """A sink that keeps a request's events."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent) and e.token_id is not None]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenEvent))

    @property
    def finished(self) -> Finished | None:
        return self.events[-1] if self.events and isinstance(self.events[-1], Finished) else None


class RecordingExecutor:
    """Wraps an executor to keep every Batch it runs (each step run when submitted, as numpy does)."""

    run_ahead = 0

    def __init__(self, inner) -> None:
        self.exact_rows = inner.exact_rows
        self.inner, self.name, self.max_logit_rows, self.batches = inner, inner.name, inner.max_logit_rows, []

    def forward_sample(self, batch, rows):
        self.batches.append(batch)
        return self.inner.forward_sample(batch, rows)

    def submit_sample(self, batch, rows, follow=False):
        assert not follow, "an executor that does not queue is never asked to follow"
        done = Future()
        done.set_result(self.forward_sample(batch, rows))
        return done


def run_all(scheduler: Scheduler, limit: int = 1000) -> int:
    steps = 0
    while scheduler.busy:
        scheduler.step()
        steps += 1
        assert steps < limit, "the scheduler does not finish"
    return steps


PROMPTS = ["Hello, world", "abc", "The quick brown fox jumps over the lazy dog and keeps running far",
           "x", "0123456789", "Once upon a time there was"]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=5)],
                         ids=["greedy", "sampled"])
def test_batched_sequences_match_running_alone(model_path, alone, sampling):
    engine = load(model_path, 3)
    recorder = RecordingExecutor(engine.executor)
    engine.executor = recorder
    # 8 tokens per step with 3 slots: long prompts prefill in chunks beside others' decode tokens
    scheduler = Scheduler(engine, n_slots=3, max_step_tokens=8)
    sinks = []
    for i, prompt in enumerate(PROMPTS):
        sinks.append(Recorder())
        scheduler.submit(Request(engine.tokenizer.encode(prompt), 12, sampling, tenant="ab"[i % 2],
                                 stop_at_eos=False), sinks[-1])
    run_all(scheduler)
    for prompt, sink in zip(PROMPTS, sinks, strict=True):
        tokens, text = alone(prompt, 12, sampling, stop_at_eos=False)
        assert sink.tokens == tokens
        assert sink.text == text
        assert sink.finished == Finished("length", len(engine.tokenizer.encode(prompt)), 12)
    mixed = [b for b in recorder.batches if len(np.unique(b.slots)) > 1]
    assert mixed, "no step batched several sequences"
    for batch in recorder.batches:
        assert len(batch) <= 8
        assert set(batch.slots.tolist()) <= {0, 1, 2}


def test_each_step_carries_one_decode_token_per_running_sequence(model_path):
    engine = load(model_path, 4)
    recorder = RecordingExecutor(engine.executor)
    engine.executor = recorder
    scheduler = Scheduler(engine, n_slots=4, max_step_tokens=128)
    for prompt in PROMPTS[:4]:
        scheduler.submit(Request(engine.tokenizer.encode(prompt), 5, stop_at_eos=False), Recorder())
    run_all(scheduler)
    # step 1 prefills all four prompts at once; then each step decodes one token of each sequence
    first, *rest = recorder.batches
    assert sorted(np.unique(first.slots).tolist()) == [0, 1, 2, 3] and len(first.logit_rows) == 4
    assert len(rest) == 4
    for batch in rest:
        assert sorted(batch.slots.tolist()) == [0, 1, 2, 3]
        assert len(batch.logit_rows) == 4


def test_cancel_frees_the_slot_for_the_next_request(model_path, alone):
    engine = load(model_path, 1)
    scheduler = Scheduler(engine, n_slots=1, max_step_tokens=16)
    first, second, third = Recorder(), Recorder(), Recorder()
    a = scheduler.submit(Request(engine.tokenizer.encode("abc"), 50, stop_at_eos=False), first)
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 6, stop_at_eos=False), second)
    c = scheduler.submit(Request(engine.tokenizer.encode("x"), 6), third)
    for _ in range(3):
        scheduler.step()
    assert len(first.tokens) == 3 and not second.events  # one slot: the others wait
    scheduler.cancel(a)
    scheduler.cancel(c)  # still queued
    run_all(scheduler)
    assert first.finished.reason == "cancelled" and first.finished.completion_tokens == 3
    assert third.events == [Finished("cancelled", 2, 0)]
    assert second.tokens == alone("Hello, world", 6, stop_at_eos=False)[0]
    assert scheduler.stats().running == 0 and scheduler.stats().queued == 0


def test_free_slots_go_round_robin_across_tenants(model_path):
    engine = load(model_path, 2)
    scheduler = Scheduler(engine, n_slots=2, max_step_tokens=32)
    sinks = {}
    for name in ["a1", "a2", "a3", "b1", "b2"]:  # tenant a queued everything first
        sinks[name] = Recorder()
        scheduler.submit(Request(engine.tokenizer.encode(name), 3, tenant=name[0], stop_at_eos=False), sinks[name])
    started = []
    while scheduler.busy:
        scheduler.step()
        started += [n for n, s in sinks.items() if s.events and n not in started]
    assert started == ["a1", "b1", "a2", "b2", "a3"]


def test_slots_are_shared_by_weight(model_path):
    engine = load(model_path, 4)
    scheduler = Scheduler(engine, n_slots=4, max_step_tokens=32, shares={"big": 3.0, "small": 1.0})
    sinks = {}
    for i in range(6):
        for tenant in ("small", "big"):
            sinks[tenant, i] = Recorder()
            scheduler.submit(Request(engine.tokenizer.encode("hi"), 4, tenant=tenant, stop_at_eos=False),
                             sinks[tenant, i])
    scheduler.step()
    running = [tenant for (tenant, _), s in sinks.items() if s.events]
    assert sorted(running) == ["big", "big", "big", "small"]


def test_stop_sequence_ends_generation_before_it(model_path, alone):
    _, text = alone("Hello, world", 20, stop_at_eos=False)
    stop = text[5:8]
    engine = load(model_path, 1)
    scheduler = Scheduler(engine, n_slots=1)
    sink = Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 20, stop=("never", stop),
                             stop_at_eos=False), sink)
    run_all(scheduler)
    assert sink.text == text[:text.index(stop)]
    assert sink.finished.reason == "stop" and sink.finished.completion_tokens == text.index(stop) + len(stop)


@pytest.mark.parametrize("pieces, stops, expect", [
    (["ab", "cU", "ser: x"], ["User:"], ("abc", True)),
    (["ab", "cU", "sa"], ["User:"], ("abcUsa", False)),
    (["\n", "Us", "er:"], ["\nUser:"], ("", True)),
    (["xx", "yy"], [], ("xxyy", False)),
    (["xa<", "<b"], ["<<", "a<<b"], ("x", True)),  # the earliest start wins
])
def test_stop_text_holds_back_only_what_may_start_a_stop(pieces, stops, expect):
    stop = StopText(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = stop.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += stop.flush()
    assert (out, hit) == expect


def test_end_of_text_finishes_with_stop(model_path, alone):
    engine = load(model_path, 1)

    class EosOnThirdStep(RecordingExecutor):
        def forward_sample(self, batch, rows):
            tokens = super().forward_sample(batch, rows)
            return [engine.tokenizer.eos_id] * len(rows) if len(self.batches) == 3 else tokens

    engine.executor = EosOnThirdStep(engine.executor)
    scheduler = Scheduler(engine, n_slots=1)
    sink = Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("Hello"), 10), sink)
    run_all(scheduler)
    assert sink.tokens == alone("Hello", 2, stop_at_eos=False)[0]  # prefill + 1 decode step, then EOS
    assert sink.finished == Finished("stop", 6, 2)


@pytest.mark.parametrize("ids, max_tokens, error", [
    ([], 4, ValueError),
    ([1, VOCAB], 4, ValueError),
    ([1, 5, 6], 0, ValueError),
    ([1] * 90, 7, ContextOverflow),
])
def test_submit_refuses_requests_it_cannot_run(model_path, ids, max_tokens, error):
    engine = load(model_path, 1)
    scheduler = Scheduler(engine, n_slots=1)
    with pytest.raises(error):
        scheduler.submit(Request(ids, max_tokens), Recorder())
    assert not scheduler.busy


@pytest.mark.parametrize("n_slots, max_step_tokens, logit_rows, message", [
    (0, 16, 64, "n_slots must be >= 1"),
    (4, 4, 64, "must exceed n_slots"),
    (8, 16, 4, "logit rows"),
])
def test_scheduler_refuses_settings_it_cannot_honour(model_path, n_slots, max_step_tokens, logit_rows, message):
    engine = load(model_path, max(n_slots, 1))
    engine.executor.max_logit_rows = logit_rows
    with pytest.raises(ValueError, match=message):
        Scheduler(engine, n_slots=n_slots, max_step_tokens=max_step_tokens)


def test_an_executor_failure_fails_that_step_only(model_path, alone):
    engine = load(model_path, 2)

    class FailOnce(RecordingExecutor):
        def forward_sample(self, batch, rows):
            if not self.batches:
                self.batches.append(batch)
                raise MemoryError("out of memory")
            return super().forward_sample(batch, rows)

    engine.executor = FailOnce(engine.executor)
    scheduler = Scheduler(engine, n_slots=2)
    failed, later = Recorder(), Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("abc"), 4), failed)
    scheduler.step()
    assert failed.events == [Finished("error", 4, 0, "MemoryError: out of memory")]
    scheduler.submit(Request(engine.tokenizer.encode("abc"), 4, stop_at_eos=False), later)
    run_all(scheduler)
    assert later.tokens == alone("abc", 4, stop_at_eos=False)[0]


def test_a_failing_sink_cancels_only_its_own_request(model_path, alone):
    engine = load(model_path, 2)
    scheduler = Scheduler(engine, n_slots=2)

    def broken(event):
        raise ConnectionError("client gone")

    good = Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("abc"), 30, stop_at_eos=False), broken)
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 6, stop_at_eos=False), good)
    steps = run_all(scheduler)
    assert good.tokens == alone("Hello, world", 6, stop_at_eos=False)[0]
    assert steps < 10  # the broken request did not run on to its 30 tokens


def test_batched_on_the_gpu_executor_matches_running_alone(model_path, gpu):
    f = read_gguf(model_path)
    model = Model.from_header(f.header)

    def gpu_engine(n_slots: int) -> Engine:
        executor = GpuExecutor(model.plan, f.tensor_bytes, n_slots=n_slots, n_ctx=N_CTX, device=gpu)
        return Engine(model, executor, N_CTX)

    single = gpu_engine(1)
    expect = [[e.token_id for e in single.generate(p, 8, stop_at_eos=False) if e.token_id is not None]
              for p in PROMPTS]
    engine = gpu_engine(3)
    scheduler = Scheduler(engine, n_slots=3, max_step_tokens=16)
    sinks = [Recorder() for _ in PROMPTS]
    for prompt, sink in zip(PROMPTS, sinks, strict=True):
        scheduler.submit(Request(engine.tokenizer.encode(prompt), 8, stop_at_eos=False), sink)
    run_all(scheduler)
    assert [s.tokens for s in sinks] == expect


class Follows:
    """Wraps an executor, counting the submits queued with `follow` (their tokens sampled on the
    device) and all submits; it runs ahead `run_ahead` steps, up to `steps_per_submit` a submit."""

    def __init__(self, inner, run_ahead: int, steps_per_submit: int = 1) -> None:
        self.inner, self.run_ahead, self.steps_per_submit = inner, run_ahead, steps_per_submit
        self.follows, self.steps = 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def submit_sample(self, batch, rows, follow=False, **options):
        self.follows += follow
        self.steps += 1
        return self.inner.submit_sample(batch, rows, follow=follow, **options)


def four_requests(engine: Engine, executor: Follows) -> tuple[list, list]:
    """Tokens and ends of four requests: sequences that end mid-run (length, end of text) and one
    that arrives while the others decode."""
    engine.executor = executor
    hot = SamplingParams(temperature=1.2, top_k=30, seed=3)
    scheduler = Scheduler(engine, n_slots=3, max_step_tokens=32)
    sinks = [Recorder() for _ in range(4)]
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 14, stop_at_eos=False), sinks[0])
    scheduler.submit(Request(engine.tokenizer.encode("abc"), 6, hot, stop_at_eos=False), sinks[1])
    scheduler.submit(Request(engine.tokenizer.encode("x"), 20, hot), sinks[2])  # may end at end of text
    for _ in range(5):
        scheduler.step()
    scheduler.submit(Request(engine.tokenizer.encode("0123456789"), 5, stop_at_eos=False), sinks[3])
    run_all(scheduler)
    return [s.tokens for s in sinks], [s.finished for s in sinks]


def test_running_ahead_on_the_gpu_gives_what_stepping_from_the_host_gives(model_path, gpu):
    """Step n + 1 queued before step n's ids are read: same tokens as waiting for each step, also
    when sequences end mid-run (length, end of text) and a request arrives while running ahead."""
    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    runs = {}
    for ahead in (0, 3):
        engine = Engine(model, GpuExecutor(model.plan, f.tensor_bytes, n_slots=3, n_ctx=N_CTX, device=gpu), N_CTX)
        executor = Follows(engine.executor, run_ahead=ahead)
        runs[ahead] = (*four_requests(engine, executor), executor)
    (host_tokens, host_ends, host), (ahead_tokens, ahead_ends, queued) = runs[0], runs[3]
    assert ahead_tokens == host_tokens and ahead_ends == host_ends
    assert host.follows == 0 and queued.follows >= 10
    assert [len(t) for t in host_tokens[:2]] == [14, 6]


@pytest.mark.parametrize("backend", ["numpy", "webgpu"])
def test_several_decode_steps_a_submit_give_what_one_a_submit_gives(model_path, backend, request):
    """Decode steps run several to a submit (each fed the ids the one before sampled, on the
    executor): the same tokens and ends as one step a submit, in fewer submits; no sequence gets
    tokens past its length limit from the steps queued past its end."""
    f = read_gguf(model_path)
    model = Model.from_header(f.header)

    def executor():
        if backend == "webgpu":
            gpu = request.getfixturevalue("gpu")
            return GpuExecutor(model.plan, f.tensor_bytes, n_slots=3, n_ctx=N_CTX, device=gpu)
        return CpuExecutor(model.plan, f.tensor_bytes, n_slots=3, n_ctx=N_CTX)

    runs = {}
    for steps in (1, 4):
        engine = Engine(model, executor(), N_CTX)
        counted = Follows(engine.executor, run_ahead=3, steps_per_submit=steps)
        runs[steps] = (*four_requests(engine, counted), counted)
    (one_tokens, one_ends, one), (many_tokens, many_ends, many) = runs[1], runs[4]
    assert many_tokens == one_tokens and many_ends == one_ends
    assert [len(t) for t in many_tokens[:2]] == [14, 6]
    assert many.steps < one.steps - 5


def test_a_first_token_is_read_before_steps_queue_behind_it(model_path, gpu):
    """Running ahead starts once a sequence's first token is out: the prompt's step is read with
    nothing queued behind it (the time to first token), then the queue fills as before."""
    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    engine = Engine(model, GpuExecutor(model.plan, f.tensor_bytes, n_ctx=N_CTX, device=gpu), N_CTX)
    engine.executor = executor = Follows(engine.executor, run_ahead=3)
    follows_when_read = []

    def sink(event) -> None:
        if isinstance(event, TokenEvent):
            follows_when_read.append(executor.follows)

    scheduler = Scheduler(engine, n_slots=1)
    scheduler.submit(Request(engine.tokenizer.encode("Hello, world"), 12, stop_at_eos=False), sink)
    run_all(scheduler)
    assert follows_when_read[0] == 0  # the first token: no step queued behind the prompt's
    # then the second token's step is built from the host, three queued behind it, and so on
    assert follows_when_read[1] == 3 and executor.follows == 10


@pytest.mark.parametrize("backend", ["numpy", "webgpu"])
def test_a_grammar_masks_on_the_executor_as_the_host_would(model_path, backend, request):
    """A grammar alone: its masks go to the executor, which samples under them (on the GPU before its
    sampler). Oracle: the same request with logprobs, sampled on the host from the logits read back
    (the mask applied there), on the same executor. Every token keeps to the grammar; a plain
    request beside it keeps its own tokens."""
    from realm_wasm.grammar import Grammar, GrammarEngine, TokenVocabulary

    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    executor = (GpuExecutor(model.plan, f.tensor_bytes, n_slots=3, n_ctx=N_CTX, device=request.getfixturevalue("gpu"))
                if backend == "webgpu" else CpuExecutor(model.plan, f.tensor_bytes, n_slots=3, n_ctx=N_CTX))
    engine = Engine(model, executor, N_CTX)
    grammar = GrammarEngine(Grammar.from_gbnf('root ::= [a-f]+ ("," [0-9]+)* "."'),
                            TokenVocabulary.from_tokenizer(engine.tokenizer))
    prompt = engine.tokenizer.encode("hello")
    hot = SamplingParams(temperature=1.5, seed=4)
    runs = {}
    for logprobs in (None, 0):
        scheduler = Scheduler(engine, n_slots=3)
        masked, plain = Recorder(), Recorder()
        scheduler.submit(Request(prompt, 12, hot, grammar=grammar, logprobs=logprobs), masked)
        scheduler.submit(Request(prompt, 12, hot), plain)
        run_all(scheduler)
        runs[logprobs] = masked.tokens, plain.tokens
    assert runs[None] == runs[0]
    text = engine.tokenizer.decode(runs[None][0])
    assert grammar.matcher().advance(text.encode()) and text[0] in "abcdef", text


class Fed(Follows):
    """Also counts the tokens fed into steps, and the KV copies."""

    def __init__(self, inner) -> None:
        super().__init__(inner, inner.run_ahead)
        self.fed, self.copies = 0, []

    def submit_sample(self, batch, rows, follow=False, **options):
        self.fed += len(batch) * options.get("steps", 1)
        return super().submit_sample(batch, rows, follow=follow, **options)

    def copy_kv(self, src, dst, n_tokens):
        self.copies.append((src, dst, n_tokens))
        self.inner.copy_kv(src, dst, n_tokens)


@pytest.mark.parametrize("backend", ["numpy", "webgpu"])
def test_sequences_of_one_prompt_read_it_once(model_path, alone, backend, request):
    """n sequences of one prompt submitted together (an n > 1 request): the first reads the prompt,
    the others wait for that read, copy its KV entries and feed only the prompt's last token; each
    gives the tokens it gives alone. A later prompt sharing a running one's prefix copies it too."""
    f = read_gguf(model_path)
    model = Model.from_header(f.header)
    executor = (GpuExecutor(model.plan, f.tensor_bytes, n_slots=4, n_ctx=N_CTX, device=request.getfixturevalue("gpu"))
                if backend == "webgpu" else CpuExecutor(model.plan, f.tensor_bytes, n_slots=4, n_ctx=N_CTX))
    engine = Engine(model, executor, N_CTX)
    engine.executor = counted = Fed(executor)
    scheduler = Scheduler(engine, n_slots=4, max_step_tokens=16)
    text = "The quick brown fox jumps over the lazy dog"
    prompt = engine.tokenizer.encode(text)
    hot = [SamplingParams(temperature=0.9, seed=s) for s in range(3)]
    sinks = [Recorder() for _ in hot]
    for sampling, sink in zip(hot, sinks, strict=True):
        scheduler.submit(Request(prompt, 6, sampling, stop_at_eos=False), sink)
    run_all(scheduler)
    for sampling, sink in zip(hot, sinks, strict=True):
        assert sink.tokens == alone(text, 6, sampling, stop_at_eos=False)[0]
    assert [s.finished.cached_tokens for s in sinks] == [0, len(prompt) - 1, len(prompt) - 1]
    assert counted.fed == len(prompt) + 2 + 3 * 5  # the prompt once, two last tokens, then the decodes
    assert [n for _, _, n in counted.copies] == [len(prompt) - 1] * 2
    # a prompt extending a running sequence's: that sequence's slot is copied, the rest read
    long_run, extended = Recorder(), Recorder()
    scheduler.submit(Request(prompt, 40, stop_at_eos=False), long_run)
    while not long_run.tokens:
        scheduler.step()
    more = prompt + engine.tokenizer.encode(", and runs", add_bos=False)
    scheduler.submit(Request(more, 4, stop_at_eos=False), extended)
    run_all(scheduler)
    assert extended.finished.cached_tokens >= len(prompt) - 1
    assert extended.tokens == alone(text + ", and runs", 4, stop_at_eos=False)[0]


def test_a_follow_up_prompt_reuses_the_kv_of_its_prefix(model_path, alone):
    """A chat's next turn: the slot that served the first turn keeps its KV entries, and the second
    prompt (first prompt + answer + a new message) feeds only what is new, with the same tokens."""
    engine = load(model_path, 2)
    scheduler = Scheduler(engine, n_slots=2)
    first = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    turn1 = Recorder()
    scheduler.submit(Request(first, 8, stop_at_eos=False), turn1)
    run_all(scheduler)
    # the last generated token was never fed: the slot holds the prompt and the first 7
    second = first + turn1.tokens + engine.tokenizer.encode(" and then", add_bos=False)
    turn2, other = Recorder(), Recorder()
    scheduler.submit(Request(engine.tokenizer.encode("abc"), 3, stop_at_eos=False), other)  # takes the other slot
    scheduler.submit(Request(second, 6, stop_at_eos=False), turn2)
    run_all(scheduler)
    assert turn1.finished.cached_tokens == 0
    assert turn2.finished.cached_tokens == len(first) + 7
    fresh = load(model_path, 1)
    expect = [e.token_id for e in fresh.generate(second, 6, stop_at_eos=False) if e.token_id is not None]
    assert turn2.tokens == expect
    short = Recorder()  # a shared prefix under MIN_REUSE tokens is fed again
    scheduler.submit(Request(engine.tokenizer.encode("abcd"), 2, stop_at_eos=False), short)
    run_all(scheduler)
    assert short.finished.cached_tokens == 0
