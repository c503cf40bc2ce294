"""The inference API without its transport: models, tenants, admission, and generations as chunks.

    service = Service([load_model(path, n_slots=8)], tenants)
    async with service.serving():                        # each model's stepping thread runs meanwhile
        tenant = service.authenticate(client_host, api_key)          # 401 / 403
        job = await service.prepare(tenant, body, "chat")            # every 4xx about the body
        generation = service.start(job, tenant)                      # admission: 400 / 429 / 503
        async for chunk in generation.chunks(include_usage=True):   # OpenAI's stream chunks
            ...
        answer = await generation.answer()               # or: the whole answer, from those chunks

`Generation.chunks` is the one path from scheduler events to what a client reads: the SSE stream
sends its chunks as they are, the JSON answer joins them (`answer`), the WebSocket turns them into
token and done messages. A generation that ends any other way than "stop" or "length" raises its
ApiError, except one its own client cancelled: that one finishes with "cancelled".

Every model runs in its own background thread that steps a `realm_wasm.scheduler.Scheduler` (the
executor is not thread-safe); its events reach asyncio through `loop.call_soon_threadsafe`, a few
steps' at a time (`Outbox`, HAND_OVER_S). A client that goes away cancels its generation, which
frees its KV slot at the next step.

LoRA adapters: each model's engine holds adapters by name. Those loaded at start (`realm serve
--lora NAME=FILE`) are the server's: a tenant uses the ones its `lora_allowed` names, and its `lora`
default when a request names none. A tenant with `lora_upload` loads its own (`load_adapter`), which
only it sees and uses (the engine names them "TENANT/ID"); without a tenants file the one open
tenant's adapters are the server's. Loading and unloading run on the model's stepping thread,
between steps; an unloaded adapter's running generations finish with it.

Speculative decoding: a request's `speculation` ({"method": "lookup" | "draft", "max_draft",
"ngram"}) drafts tokens its model verifies in one step (realm_wasm/speculative.py): the same
tokens, sooner where drafts are good. "draft" needs the model loaded with a draft model (`realm
serve --draft FILE`); its usage then counts drafted_tokens and accepted_tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from realm_wasm.chat_template import TEMPLATES, ChatTemplate, ChatTemplateError
from realm_wasm.engine import PREFILL_CHUNK, Engine
from realm_wasm.errors import InvalidRequest, RealmError
from realm_wasm.gguf import model_name
from realm_wasm.grammar import GrammarCache, GrammarEngine, GrammarError, LazyGrammar
from realm_wasm.lora import Adapter, read_adapter
from realm_wasm.plan import head_input
from realm_wasm.sampling import LogitRules, SamplingParams, TokenLogprob
from realm_wasm.scheduler import Event, Finished, Scheduler, TokenEvent
from realm_wasm.scheduler import Request as GenerationRequest
from realm_wasm.speculative import Speculation
from realm_wasm.tokenizer import Tokenizer, TokenizerError
from realm_wasm.tool_calls import (
    CallArguments,
    CallStart,
    Content,
    ToolCallFormat,
    ToolCallParser,
    ToolChoice,
    ToolError,
)

from .errors import ApiError, ConfigError, api_error
from .metrics import Metrics
from .schema import (
    CHAT_SCHEMA,
    COMPLETION_SCHEMA,
    DETOKENIZE_SCHEMA,
    EMBEDDINGS_SCHEMA,
    TOKENIZE_SCHEMA,
    refuse_unsupported,
    validate,
)
from .tenants import Limiter, Tenant, Tenants, is_loopback, retry_after_header

log = logging.getLogger("realm.server")


# --- models and their stepping threads -------------------------------------------------------------

@dataclass
class ServedModel:
    """One loaded model as the API serves it."""

    name: str
    engine: Engine
    n_slots: int  # the engine's executor must have been built with this many KV slots
    max_step_tokens: int = PREFILL_CHUNK
    chat_template: str | None = None  # one of chat_template.TEMPLATES by name, or a Jinja file: not the GGUF's
    chat: ChatTemplate = field(init=False)
    max_prompt_chars: int = field(init=False)  # longer text cannot fit the context: refused untokenized
    grammars: GrammarCache = field(init=False)  # structured output's compiled grammars (its stepping thread's)

    def __post_init__(self) -> None:
        tokenizer = self.engine.tokenizer
        self.chat = (ChatTemplate.from_metadata(tokenizer, self.engine.model.header.metadata)
                     if self.chat_template is None else named_chat_template(tokenizer, self.chat_template))
        self.grammars = GrammarCache(tokenizer)
        self.max_prompt_chars = self.engine.n_ctx * max(len(t) for t in tokenizer.tokens)


def named_chat_template(tokenizer: Tokenizer, name_or_path: str) -> ChatTemplate:
    """One of Realm's chat templates (chat_template.TEMPLATES) by name, or a Jinja file's."""
    if name_or_path in TEMPLATES:
        return ChatTemplate(tokenizer, TEMPLATES[name_or_path], name_or_path)
    try:
        text = Path(name_or_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"chat template {name_or_path!r} is neither one of Realm's ({', '.join(TEMPLATES)}) "
                          f"nor a readable UTF-8 file: {e}") from e
    template = ChatTemplate(tokenizer, text, "file")
    if template.source != "file":
        raise ConfigError(f"chat template file {name_or_path!r} is not a valid Jinja template")
    return template


def load_model(path: str | Path, name: str | None = None, backend: str = "auto", n_ctx: int = 2048,
               n_slots: int = 4, adapters: dict[str, str | Path] | None = None, max_adapters: int = 0,
               max_lora_rank: int = 16, draft: str | Path | None = None,
               chat_template: str | None = None) -> ServedModel:
    """Load a GGUF file for serving, named after the file unless `name` is given, with the server's
    LoRA `adapters` (id -> file) and room for `max_adapters` in all, of rank up to `max_lora_rank`,
    a `draft` model (same vocabulary) for requests that speculate with "draft", and a
    `chat_template` (a name or a file, see named_chat_template) instead of the GGUF's."""
    path = Path(path)
    for adapter_id in adapters or {}:
        check_adapter_id(adapter_id, ConfigError)
    engine = Engine.load(path, backend=backend, n_ctx=n_ctx, n_slots=n_slots, adapters=adapters,
                         max_adapters=max_adapters, max_lora_rank=max_lora_rank)
    if draft is not None:
        engine.set_draft(Engine.load(draft, backend=backend, n_ctx=n_ctx, n_slots=n_slots))
    return ServedModel(name or model_name(path), engine, n_slots, chat_template=chat_template)


ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_id(adapter_id: str, error: Callable[[str], Exception]) -> None:
    if not ADAPTER_ID.fullmatch(adapter_id):
        raise error(f"adapter id {adapter_id!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                    "letter or digit")


# Tokens reach the loop at most this often (a generation's first token, a finished generation, and
# the last tokens before the stepping thread idles, at once): the loop and the stepping thread share
# the GIL, and each hand-over costs the steps the loop's wake-up, its sends and the GIL's trips
# between threads, whether it carries one token or five. At ~1,000 tok/s, five tokens a hand-over;
# still one SSE event each.
HAND_OVER_S = 0.005


class Outbox:
    """Events the stepping thread made for one asyncio loop, handed over in one `call_soon_threadsafe`
    every HAND_OVER_S at most, and in none while the last one is still to run (it takes what came
    since, too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: deque[tuple[Callable[[Event], None], Event]] = deque()
        self.posted = False  # a hand-over is scheduled and has not begun: it will see what is queued now
        self.urgent = False  # a queued event begins or ends a generation: hand it over now
        self.last_post = -math.inf

    def put(self, on_event: Callable[[Event], None], event: Event) -> None:
        """(stepping thread) Queue an event for `on_event` until a `post` hands it over."""
        self.events.append((on_event, event))
        # a first token at once: time to first token is what a waiting client feels most
        self.urgent = self.urgent or isinstance(event, Finished) or event.index == 0

    def post(self, idle: bool) -> None:
        """(stepping thread, after a step) Have the loop deliver what is queued, unless a hand-over
        is already due or the last was under HAND_OVER_S ago (`idle`: there will be no next step)."""
        if not self.events or self.posted:
            return
        now = time.perf_counter()
        if idle or self.urgent or now - self.last_post >= HAND_OVER_S:
            self.posted, self.urgent, self.last_post = True, False, now
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody listens
                self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        """(the loop) Every queued event, in order; cleared first, so that a later `post` is never lost."""
        self.posted = False
        while self.events:
            on_event, event = self.events.popleft()
            on_event(event)


class ModelWorker:
    """Steps one model's scheduler on a background thread; delivers events on the asyncio loop."""

    def __init__(self, model: ServedModel, shares: dict[str, float]) -> None:
        self.model = model
        self.scheduler = Scheduler(model.engine, model.n_slots, model.max_step_tokens, shares, model.engine.draft)
        self._outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}  # one per loop that submits (in practice one)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"realm-{model.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping:
            try:
                worked = self.scheduler.step()
            except Exception:  # a bug, not bad input: fail what runs rather than hang every client
                log.exception("scheduler step failed for %s", self.model.name)
                self.scheduler.cancel_all()
                self._post(idle=True)
                continue
            self._post(idle=not (worked and self.scheduler.busy))
            if not worked:
                self._wake.wait()
                self._wake.clear()
            else:
                # let the event loop have the GIL now, not after the interpreter's 5 ms switch interval:
                # a new request's every hand-over (read, tokenize, submit, deliver) would wait that long
                time.sleep(0)
        self.scheduler.cancel_all()
        self._post(idle=True)

    def _post(self, idle: bool) -> None:
        for outbox in list(self._outboxes.values()):
            outbox.post(idle)

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> int:
        """Queue a generation; `on_event` runs on the calling asyncio loop for every event."""
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.setdefault(loop, Outbox(loop))

        def sink(event: Event) -> None:
            outbox.put(on_event, event)

        seq_id = self.scheduler.submit(request, sink)
        self._wake.set()
        return seq_id

    def cancel(self, seq_id: int) -> None:
        self.scheduler.cancel(seq_id)
        self._wake.set()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the stepping thread between two steps (what changes the engine's adapters)."""
        if not self.alive:
            raise ApiError(503, f"the worker of {self.model.name!r} is not running (is the app's lifespan in use?)")
        done = self.scheduler.call(fn)
        self._wake.set()
        return await asyncio.wrap_future(done)


# --- jobs: a checked request, then a running generation --------------------------------------------

def token_piece(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text as logprobs name it (a piece of a multi-byte character shows as U+FFFD)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def legacy_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs; text_offset counts characters of the pieces from `offset`
    (0 at the completion's first token: Realm never echoes the prompt)."""
    pieces = [token_piece(tokenizer, e.token_id) for e in entries]
    return {"tokens": pieces, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_piece(tokenizer, t): lp for t, lp in e.top} for e in entries],
            "text_offset": list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=offset))}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's chat logprobs: content[{token, logprob, bytes, top_logprobs}]."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_piece(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def join_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The logprobs of a whole answer from its chunks' (each field's lists concatenated)."""
    if not parts:
        return None
    return {key: (list(itertools.chain.from_iterable(p[key] for p in parts)) if isinstance(value, list) else value)
            for key, value in parts[0].items()}


@dataclass(frozen=True)
class Shape:
    """How one endpoint's JSON looks (OpenAI's text completion vs chat completion)."""

    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[str], dict[str, Any]]  # the full text -> the answer choice's payload
    delta: Callable[[str], dict[str, Any]]  # a streamed piece -> the chunk choice's payload
    text: Callable[[dict[str, Any]], str]  # a chunk choice -> its piece of text (delta's inverse)
    opening: dict[str, Any] | None  # the payload of a first chunk before any text
    closing: dict[str, Any]  # the payload of the chunk that carries the finish reason
    strip_leading_space: bool  # chat content starts at its first visible character
    logprobs: Callable[[Tokenizer, list[TokenLogprob], int], dict[str, Any]]  # (tokens, text offset) -> logprobs


SHAPES = {
    "completion": Shape("text_completion", "text_completion", "cmpl-",
                        choice=lambda text: {"text": text, "logprobs": None},
                        delta=lambda text: {"text": text, "logprobs": None},
                        text=lambda choice: choice["text"],
                        opening=None, closing={"text": "", "logprobs": None}, strip_leading_space=False,
                        logprobs=legacy_logprobs),
    "chat": Shape("chat.completion", "chat.completion.chunk", "chatcmpl-",
                  choice=lambda text: {"message": {"role": "assistant", "content": text}, "logprobs": None},
                  delta=lambda text: {"delta": {"content": text}},
                  text=lambda choice: choice["delta"].get("content", ""),
                  opening={"delta": {"role": "assistant", "content": ""}}, closing={"delta": {}},
                  strip_leading_space=True, logprobs=chat_logprobs),
}


@dataclass
class Job:
    """A validated request: what to generate, for which endpoint, and how to answer."""

    kind: str  # a SHAPES key
    model: ServedModel
    request: GenerationRequest
    stream: bool
    include_usage: bool
    lora: list[dict[str, Any]] = field(default_factory=list)  # the adapters applied, as the response says
    n: int = 1  # choices: choice i is `request` sampled with seed + i
    user: str | None = None  # the caller's end-user id, for the log
    tool_format: ToolCallFormat | None = None  # the answer's tool calls are read out of its text this way
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def shape(self) -> Shape:
        return SHAPES[self.kind]

    def requests(self) -> list[GenerationRequest]:
        """One scheduler request per choice."""
        sampling = self.request.sampling
        return [dataclasses.replace(self.request, sampling=dataclasses.replace(
            sampling, seed=(sampling.seed + i) & 0xFFFFFFFF)) for i in range(self.n)]

    def applied(self) -> dict[str, Any]:
        """What an answer adds to say which LoRA adapters applied (nothing when none did)."""
        return {"lora": self.lora} if self.lora else {}


class ChoiceText:
    """One choice's streamed text as the payloads of its chunks: the text itself (a completion), or
    chat's content deltas, starting at the first visible character (the plain template leaves a
    space after 'Assistant:'), and its tool calls' deltas when the request has tools."""

    def __init__(self, shape: Shape, tool_format: ToolCallFormat | None) -> None:
        self.shape = shape
        self.stripping = shape.strip_leading_space
        self.parser = ToolCallParser(tool_format) if tool_format is not None else None

    @property
    def called(self) -> bool:
        """Whether the answer holds a whole tool call: its finish reason is then "tool_calls"."""
        return self.parser is not None and self.parser.closed > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._payloads(self.parser.feed(text) if self.parser is not None else [Content(text)])

    def finish(self) -> list[dict[str, Any]]:
        return self._payloads(self.parser.finish()) if self.parser is not None else []

    def _payloads(self, deltas: list[Content | CallStart | CallArguments]) -> list[dict[str, Any]]:
        payloads = []
        for delta in deltas:
            if isinstance(delta, Content):
                text = delta.text
                if self.stripping:
                    text = text.lstrip()
                    self.stripping = not text
                if text:
                    payloads.append(self.shape.delta(text))
            elif isinstance(delta, CallStart):
                payloads.append({"delta": {"tool_calls": [{"index": delta.index, "id": delta.id, "type": "function",
                                                           "function": {"name": delta.name, "arguments": ""}}]}})
            else:
                payloads.append({"delta": {"tool_calls": [{"index": delta.index,
                                                           "function": {"arguments": delta.text}}]}})
        return payloads


def join_tool_calls(calls: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Add a chunk's tool_calls deltas to the calls joined so far (by index), as OpenAI's clients do."""
    for delta in deltas:
        call = calls.get(delta["index"])
        if call is None:
            call = calls[delta["index"]] = {"id": delta["id"], "type": "function",
                                            "function": {"name": delta["function"]["name"], "arguments": ""}}
        call["function"]["arguments"] += delta["function"].get("arguments", "")


def adapter_card(adapter_id: str, model: str, adapter: Adapter, owner: str | None) -> dict[str, Any]:
    return {"id": adapter_id, "object": "adapter", "model": model, "owned_by": owner or "server",
            "rank": adapter.rank, "alpha": adapter.alpha, "tensors": len(adapter.pairs)}


def usage(events: list[Finished], speculated: bool) -> dict[str, Any]:
    """OpenAI's usage of a request's choices (the prompt counted once); a request that speculated
    adds its drafts, also as OpenAI's predicted-output counts."""
    prompt, completion = events[0].prompt_tokens, sum(e.completion_tokens for e in events)
    # the prompt's tokens read from KV entries computed before (OpenAI's cached_tokens): those every
    # choice found there (the first of n choices reads the prompt; the others copy what it read)
    cached = min(e.cached_tokens for e in events)
    counts: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}
    if speculated:
        drafted, accepted = sum(e.drafted_tokens for e in events), sum(e.accepted_tokens for e in events)
        counts |= {"drafted_tokens": drafted, "accepted_tokens": accepted,
                   "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                                 "rejected_prediction_tokens": drafted - accepted}}
    return counts


def failure(event: Finished) -> ApiError:
    """The error for a generation that ended without finishing (the worker failed or shut down)."""
    if event.reason == "cancelled":
        return ApiError(503, "the generation was cancelled (the server is shutting down)")
    if isinstance(event.exception, RealmError):  # out of memory, a lost device: by its code
        error = api_error(event.exception)
        error.message = f"generation failed: {error.message}"
        return error
    return ApiError(500, f"generation failed: {event.error}")


class Generation:
    """A job running on its model's scheduler, one sequence per choice: their events (choice index,
    event) queue here until `chunks` reads them."""

    def __init__(self, job: Job, worker: ModelWorker) -> None:
        self.job, self.worker = job, worker
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seq_ids: list[int] = []
        self.unfinished = job.n  # choices whose Finished has not been delivered
        self.cancelled_by_client = False

    @property
    def finished(self) -> bool:
        return self.unfinished == 0

    def ready(self) -> bool:
        """Whether `chunks` has its next chunk without waiting (all of them, once finished)."""
        return self.finished or not self.events.empty()

    def cancel(self) -> None:
        """Stop generating (the client asked, or left); the slots free at the next step."""
        if not self.finished:
            self.cancelled_by_client = True
            for seq_id in self.seq_ids:
                self.worker.cancel(seq_id)

    def chunk(self, payload: dict[str, Any], finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        shape = self.job.shape
        return {"id": shape.id_prefix + self.job.id, "object": shape.chunk_object, "created": self.job.created,
                "model": self.job.model.name,
                "choices": [{"index": index, **payload, "finish_reason": finish_reason}]}

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """OpenAI's stream chunks: (chat) one announcing the role per choice, one per piece of text
        or of a tool call (and its tokens' logprobs, when asked), one per choice with its finish
        reason ("stop", "length", "tool_calls" when the answer ends with tool calls, or "cancelled"
        when this generation's own client cancelled it), then one with the usage when asked. Raises
        the ApiError of a generation that failed or that the server cancelled."""
        job, shape = self.job, self.job.shape
        texts = [ChoiceText(shape, job.tool_format) for _ in range(job.n)]
        offsets = [0] * job.n  # characters of logprob pieces so far (legacy text_offset)
        tokenizer = job.model.engine.tokenizer
        if shape.opening is not None:
            for index in range(job.n):
                yield self.chunk(shape.opening, None, index)
        done: list[Finished] = []
        while len(done) < job.n:
            index, event = await self.events.get()
            if isinstance(event, TokenEvent):
                payloads = texts[index].feed(event.text)
                if event.logprob is not None:  # on the token's first chunk (its text may be held back)
                    first = payloads[0] if payloads else shape.delta("")
                    payloads[:1] = [{**first, "logprobs": shape.logprobs(tokenizer, [event.logprob], offsets[index])}]
                    offsets[index] += len(token_piece(tokenizer, event.logprob.token_id))
                for payload in payloads:
                    yield self.chunk(payload, None, index)
                continue
            asked_to_stop = event.reason == "cancelled" and self.cancelled_by_client
            if event.reason not in ("stop", "length") and not asked_to_stop:
                self.cancel()  # the other choices are of no use without this one
                raise failure(event)
            done.append(event)
            for payload in texts[index].finish():
                yield self.chunk(payload, None, index)
            reason = "tool_calls" if event.reason == "stop" and texts[index].called else event.reason
            yield {**self.chunk(shape.closing, reason, index), **job.applied()}
        if include_usage:
            yield {**self.chunk({}, None), "choices": [], "usage": usage(done, job.request.speculation is not None)}

    async def answer(self) -> dict[str, Any]:
        """The whole (non-streamed) answer, joined from the chunks the stream would have sent."""
        shape, n = self.job.shape, self.job.n
        parts: list[list[str]] = [[] for _ in range(n)]
        calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        finish_reasons: list[str | None] = [None] * n
        used = None
        async for chunk in self.chunks(include_usage=True):
            if not chunk["choices"]:
                used = chunk["usage"]
                continue
            choice = chunk["choices"][0]
            index = choice["index"]
            parts[index].append(shape.text(choice))
            join_tool_calls(calls[index], choice.get("delta", {}).get("tool_calls", ()))
            finish_reasons[index] = choice["finish_reason"] or finish_reasons[index]
            if choice.get("logprobs"):
                logprobs[index].append(choice["logprobs"])
        choices = [{"index": i, **shape.choice("".join(parts[i])), "finish_reason": finish_reasons[i]}
                   for i in range(n)]
        for choice, pieces, called in zip(choices, logprobs, calls, strict=True):
            if pieces:
                choice["logprobs"] = join_logprobs(pieces)
            if called:  # OpenAI's shape: content null when the answer is calls only
                message = choice["message"]
                message["content"] = message["content"] or None
                message["tool_calls"] = [called[i] for i in sorted(called)]
        return {"id": shape.id_prefix + self.job.id, "object": shape.object, "created": self.job.created,
                "model": self.job.model.name, "choices": choices, "usage": used, **self.job.applied()}


def read_chunk(shape: Shape, chunk: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None]:
    """A chunk's piece of text, finish reason and usage (each empty where the chunk has none)."""
    if not chunk["choices"]:
        return "", None, chunk["usage"]
    choice = chunk["choices"][0]
    return shape.text(choice), choice["finish_reason"], None


# GGUF's {arch}.pooling_type (llama.cpp's enum) -> how token states become one embedding. A decoder
# model declares none: its embedding is the mean over the tokens, as llama-server's --pooling mean.
POOLING: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    1: ("mean", lambda states: states.mean(axis=0)),
    2: ("cls", lambda states: states[0]),
    3: ("last", lambda states: states[-1]),
}
MEAN_POOLING = 1


def pooling_of(model: ServedModel) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    metadata = model.engine.model.header.metadata
    declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
    return POOLING.get(declared, POOLING[MEAN_POOLING])


def embedding(states: np.ndarray, pool: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The pooled final hidden states, L2-normalized (as llama-server's embeddings are)."""
    pooled = pool(states.astype(np.float64))
    return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)


# --- the service -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 256  # requests queued or running over all tenants (503 beyond)
    default_max_tokens: int = 256  # a request's max_tokens when it gives none (or null), cut to the context left
    body_timeout_s: float = 30.0  # a request body must arrive within this, plus 1 s per MiB (408 after)
    max_adapter_bytes: int = 512 << 20  # an uploaded LoRA adapter file

    @property
    def ws_max_bytes(self) -> int:
        """The largest WebSocket frame uvicorn takes (its `ws_max_size`; its default is 16 MiB): a
        message of max_body_bytes characters at 4 UTF-8 bytes each, so that every larger one is a
        413 from the API, and a frame past even that is closed (1009) before it is buffered whole."""
        return 4 * self.max_body_bytes + 4096


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


class Service:
    """`models` served to `tenants` (None: open access, loopback clients only) under `settings`."""

    def __init__(self, models: Sequence[ServedModel], tenants: Tenants | None = None,
                 settings: ApiSettings = ApiSettings()) -> None:
        names = [m.name for m in models]
        if not models or len(set(names)) != len(names):
            raise ValueError(f"need at least one model and unique names, got {names}")
        self.models = {m.name: m for m in models}
        self.tenants = tenants or Tenants.open_access()
        self.settings = settings
        self.limiters = {t.id: Limiter(t) for t in self.tenants.by_id.values()}
        self.workers = {m.name: ModelWorker(m, self.tenants.shares) for m in models}
        self.in_flight = 0
        self.metrics = Metrics(self.workers)
        for tenant in self.tenants.by_id.values():  # a default adapter must exist, or all its requests fail
            for name in self.model_names(tenant):
                missing = [a for a, _ in tenant.lora if a not in self.models[name].engine.adapters]
                if missing:
                    raise ConfigError(f"tenant {tenant.id!r}: default adapter(s) {missing} are not loaded for "
                                      f"model {name!r} (realm serve --lora ID=FILE)")

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Run every model's stepping thread while the context is open (the app's lifespan)."""
        for worker in self.workers.values():
            worker.start()
        try:
            yield
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers.values()))

    # --- who is calling ---

    def authenticate(self, client_host: str, api_key: str | None) -> Tenant:
        if self.tenants.open and not is_loopback(client_host):
            raise ApiError(403, "this server has no tenants configured and serves loopback clients only")
        tenant = self.tenants.authenticate(api_key)
        if tenant is None:
            message = "invalid API key" if api_key else "missing API key (send Authorization: Bearer KEY)"
            raise ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})
        return tenant

    def model_for(self, tenant: Tenant, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"model {name!r} does not exist (see GET /v1/models)", "model", code="model_not_found")
        if not tenant.may_use_model(name):
            raise ApiError(403, f"tenant {tenant.id!r} may not use model {name!r}", "model")
        return model

    def model_names(self, tenant: Tenant) -> list[str]:
        return [name for name in self.models if tenant.may_use_model(name)]

    @staticmethod
    def model_card(model: ServedModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": 0, "owned_by": "realm",
                "context_length": model.engine.n_ctx, "chat_template": model.chat.source,
                "tool_calls": model.chat.tool_format.name if model.chat.tool_format else None}

    def health(self) -> dict[str, Any]:
        models = {}
        for name, worker in self.workers.items():
            s = worker.scheduler.stats()
            models[name] = {"executor": worker.model.engine.executor.name, "slots": s.n_slots,
                            "running": s.running, "queued": s.queued, "tokens_generated": s.tokens_generated}
        return {"status": "ok", "models": models}

    # --- from a request body to a running generation ---

    async def prepare(self, tenant: Tenant, body: dict[str, Any], kind: str) -> Job:
        """Validate a completion/chat body into a Job: every 4xx about the request's content is raised here."""
        body = refuse_unsupported(body)
        validate(body, CHAT_SCHEMA if kind == "chat" else COMPLETION_SCHEMA, "")
        model = self.model_for(tenant, body["model"])
        tools = self.tool_choice(model, body) if kind == "chat" else None
        ids, template_stop = await self.prompt_ids(model, body, kind)
        n_ctx = model.engine.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(400, f"prompt is {len(ids)} tokens; the context of {model.name!r} holds {n_ctx}, "
                           "with room for at least one generated token", "messages" if kind == "chat" else "prompt")
        # every generation is bounded: by the max_tokens asked for, which must fit the context, or (absent
        # or null) by the server's default_max_tokens cut to what the context has left
        chat_bound = kind == "chat" and body.get("max_completion_tokens") is not None  # chat's newer name wins
        param = "max_completion_tokens" if chat_bound else "max_tokens"
        max_tokens = body.get(param)
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, n_ctx - len(ids))
        elif len(ids) + max_tokens > n_ctx:
            raise ApiError(400, f"prompt of {len(ids)} tokens + {param} {max_tokens} exceeds the context of "
                           f"{n_ctx} tokens of {model.name!r}", param)
        stop = body.get("stop") or ()
        seed = body.get("seed")
        sampling = SamplingParams(
            temperature=float(_default(body.get("temperature"), 1.0)), top_k=int(body.get("top_k") or 0),
            top_p=float(_default(body.get("top_p"), 1.0)),
            seed=(secrets.randbits(32) if seed is None else seed) & 0xFFFFFFFF)
        asked = body.get("lora")
        lora = [(a["id"], float(_default(a.get("scale"), 1.0))) for a in asked] if asked is not None else tenant.lora
        rules, logprobs = self.logit_rules(model, body), self.logprobs(body, kind)
        speculation = self.speculation(model, body.get("speculation"))
        grammar = await self.grammar(model, body, tools)
        if speculation is not None and (rules.active or logprobs is not None or grammar is not None):
            raise ApiError(400, "speculation cannot be combined with logprobs, logit_bias, penalties, response_format, "
                           "grammar or tools (their tokens are sampled on the host, one at a time)", "speculation")
        request = GenerationRequest(ids, max_tokens, sampling, tenant.id,
                                    stop=(*([stop] if isinstance(stop, str) else stop), *template_stop),
                                    speculation=speculation,
                                    lora=tuple((self.adapter_name(tenant, model, a), scale) for a, scale in lora),
                                    rules=rules, logprobs=logprobs, grammar=grammar)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Job(kind, model, request, bool(body.get("stream")), include_usage,
                   [{"id": a, "scale": scale} for a, scale in lora], n=int(_default(body.get("n"), 1)),
                   user=body.get("user") or body.get("safety_identifier"),
                   tool_format=model.chat.tool_format if tools is not None and tools.constrained else None)

    async def grammar(self, model: ServedModel, body: dict[str, Any],
                      tools: ToolChoice | None) -> GrammarEngine | LazyGrammar | None:
        """The grammar the output must follow (response_format json_object / json_schema,
        llama-server's GBNF `grammar`, or the tool calls': realm_wasm/tool_calls.py), compiled on
        the model's stepping thread, where its masks are computed while sampling (grammar.py)."""
        structured = body.get("response_format") not in (None, {"type": "text"}) or body.get("grammar") is not None
        if tools is not None and tools.constrained:
            if structured:
                raise ApiError(400, "tools cannot be combined with response_format or grammar (the calls follow "
                               "their own grammar)", "response_format" if body.get("grammar") is None else "grammar")
            fmt = model.chat.tool_format
            try:
                gbnf = tools.gbnf(fmt)
                engine = await self.workers[model.name].call(lambda: model.grammars.engine("gbnf", gbnf))
            except ToolError as e:
                raise ApiError(400, str(e), e.param) from e
            except GrammarError as e:
                raise ApiError(400, f"the tools' grammar: {e}", "tools") from e
            return LazyGrammar(engine, fmt.trigger.encode()) if tools.mode == "auto" else engine
        if not structured:
            return None
        try:
            return await self.workers[model.name].call(
                lambda: model.grammars.for_request(body.get("response_format"), body.get("grammar")))
        except GrammarError as e:
            raise ApiError(400, str(e), e.param) from e

    @staticmethod
    def tool_choice(model: ServedModel, body: dict[str, Any]) -> ToolChoice | None:
        """The request's tools and tool_choice (None: no tools), for a template that supports them;
        the messages' tool calls need one too."""
        tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
        fmt = model.chat.tool_format
        calls_in = next((i for i, m in enumerate(body["messages"]) if m.get("tool_calls")), None)
        for param, used in (("tools", tools), ("messages", calls_in is not None)):
            if used and fmt is None:
                raise ApiError(400, f"the chat template of {model.name!r} ({model.chat.source}) does not support tool "
                               f"calling; serve it with one that does: realm serve --chat-template "
                               f"{model.name}=chatml-tools", param if param == "tools" else f"messages[{calls_in}]"
                               ".tool_calls")
        for i, message in enumerate(body["messages"]):
            if message.get("content") is None and not (message["role"] == "assistant" and message.get("tool_calls")):
                raise ApiError(400, f"missing required field messages[{i}].content (only an assistant turn with "
                               "tool_calls may leave it out)", f"messages[{i}].content")
        if not tools:
            for param, value in (("tool_choice", choice if choice != "none" else None),
                                 ("parallel_tool_calls", parallel)):
                if value is not None:
                    raise ApiError(400, f"{param} needs tools", param)
            return None
        try:
            return ToolChoice.from_request(tools, choice, parallel)
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from e

    @staticmethod
    def logit_rules(model: ServedModel, body: dict[str, Any]) -> LogitRules:
        """logit_bias and the penalties of a request (ranges checked by the schema)."""
        vocab = model.engine.tokenizer.vocab_size
        bias = []
        for key, value in (body.get("logit_bias") or {}).items():
            param = f"logit_bias.{key}"
            if not (key.isdigit() and int(key) < vocab):
                raise ApiError(400, f"logit_bias keys must be token ids below the vocab of {vocab}, got {key!r}",
                               param)
            if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
                raise ApiError(400, f"{param} must be a number in [-100, 100], got {value!r}", param)
            bias.append((int(key), float(value)))
        last_n = int(_default(body.get("repeat_last_n"), 64))
        return LogitRules(tuple(bias), float(body.get("presence_penalty") or 0.0),
                          float(body.get("frequency_penalty") or 0.0),
                          float(_default(body.get("repetition_penalty"), 1.0)),
                          model.engine.n_ctx if last_n == -1 else last_n)

    @staticmethod
    def logprobs(body: dict[str, Any], kind: str) -> int | None:
        """How many alternatives each token's logprob comes with (None: no logprobs)."""
        if kind == "completion":
            return body.get("logprobs")
        top = body.get("top_logprobs")
        if not body.get("logprobs"):
            if top is not None:
                raise ApiError(400, "top_logprobs needs \"logprobs\": true", "top_logprobs")
            return None
        return int(_default(top, 0))

    @staticmethod
    def speculation(model: ServedModel, asked: dict[str, Any] | None) -> Speculation | None:
        """The request's speculation (validated by the schema); "draft" needs the model's draft model."""
        if asked is None:
            return None
        if asked["method"] == "draft" and model.engine.draft is None:
            raise ApiError(400, f"model {model.name!r} has no draft model (realm serve --draft FILE): "
                           "speculate with \"lookup\"", "speculation.method")
        return Speculation(asked["method"], **{k: asked[k] for k in ("max_draft", "ngram") if k in asked})

    async def prompt_ids(self, model: ServedModel, body: dict[str, Any],
                         kind: str) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the prompt (chat: rendered with the model's template) and the template's stops."""
        tokenizer = model.engine.tokenizer
        if kind == "chat":
            try:
                # templates and tokenizing are pure Python: off the event loop
                chat = await asyncio.to_thread(model.chat.render, body["messages"], body.get("tools"))
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages") from e
            text, add_bos, stop, param = chat.text, chat.add_bos, chat.stop, "messages"
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list) and isinstance(prompt[0], int):
                if max(prompt) >= tokenizer.vocab_size:
                    raise ApiError(400, f"prompt has token ids outside the vocab of {tokenizer.vocab_size}", "prompt")
                return prompt, ()
            text, add_bos, stop, param = (prompt[0] if isinstance(prompt, list) else prompt), True, (), "prompt"
        if len(text) > model.max_prompt_chars:
            raise ApiError(400, f"prompt of {len(text)} characters cannot fit the context of "
                           f"{model.engine.n_ctx} tokens of {model.name!r}", param)
        try:
            return await asyncio.to_thread(tokenizer.encode, text, add_bos), stop
        except TokenizerError as e:  # this text (e.g. a template's newline) has no spelling in the vocab
            raise ApiError(400, f"the prompt cannot be tokenized by {model.name!r}: {e}", param) from e

    # --- tokens and embeddings ---

    def named_or_only_model(self, tenant: Tenant, name: str | None) -> ServedModel:
        """The model a request names, or the only one the tenant may use."""
        names = self.model_names(tenant)
        if name is None and len(names) != 1:
            raise ApiError(400, f"say which model (\"model\": one of {names})", "model")
        return self.model_for(tenant, name or names[0])

    async def tokenize(self, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
        """llama-server's /tokenize: {"content": text} -> {"tokens": [ids]} (or [{id, piece}])."""
        validate(body, TOKENIZE_SCHEMA, "")
        model = self.named_or_only_model(tenant, body.get("model"))
        text, tokenizer = body["content"], model.engine.tokenizer
        if len(text) > model.max_prompt_chars:
            raise ApiError(400, f"content of {len(text)} characters is longer than any prompt of {model.name!r}",
                           "content")
        ids = await asyncio.to_thread(tokenizer.encode, text, bool(body.get("add_special", False)),
                                      bool(body.get("parse_special", True)))
        if not body.get("with_pieces"):
            return {"tokens": ids}

        def piece(token_id: int) -> str | list[int]:
            raw = tokenizer.token_bytes(token_id)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return list(raw)

        return {"tokens": [{"id": i, "piece": piece(i)} for i in ids]}

    def detokenize(self, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
        """llama-server's /detokenize: {"tokens": [ids]} -> {"content": text}."""
        validate(body, DETOKENIZE_SCHEMA, "")
        model = self.named_or_only_model(tenant, body.get("model"))
        vocab = model.engine.tokenizer.vocab_size
        if any(t >= vocab for t in body["tokens"]):
            raise ApiError(400, f"tokens has ids outside the vocab of {vocab}", "tokens")
        return {"content": model.engine.tokenizer.decode(body["tokens"])}

    async def embeddings(self, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's /v1/embeddings: each input's final hidden states, pooled (pooling_of) and
        L2-normalized. Texts get BOS as prompts do; token ids are taken as they are. Each input
        runs on the model's stepping thread between steps, in a free KV slot."""
        validate(body, EMBEDDINGS_SCHEMA, "")
        model = self.model_for(tenant, body["model"])
        width = model.engine.model.plan.buffers[head_input(model.engine.model.plan)][1]
        if body.get("dimensions") not in (None, width):
            raise ApiError(400, f"{model.name!r} embeds in {width} dimensions, not {body['dimensions']}", "dimensions")
        given = body["input"]
        inputs = [given] if isinstance(given, str) or isinstance(given[0], int) else given
        tokenizer, n_ctx = model.engine.tokenizer, model.engine.n_ctx
        worker, (_, pool) = self.workers[model.name], pooling_of(model)
        token_lists = []
        for i, item in enumerate(inputs):
            param = f"input[{i}]" if inputs is given else "input"
            if isinstance(item, str):
                if len(item) > model.max_prompt_chars:
                    raise ApiError(400, f"{param} is longer than the context of {model.name!r}", param)
                ids = await asyncio.to_thread(tokenizer.encode, item, True)
            else:
                ids = item
            if not ids or len(ids) > n_ctx or max(ids) >= tokenizer.vocab_size:
                raise ApiError(400, f"{param} must be 1 to {n_ctx} tokens with ids below {tokenizer.vocab_size}", param)
            token_lists.append(ids)
        total = sum(len(ids) for ids in token_lists)
        limiter = self.limiters[tenant.id]  # the tenant's limits, as a generation of `total` tokens
        if limiter.exceeds_bucket(total):
            raise ApiError(400, f"input of {total} tokens is more than tenant {tenant.id!r} may use in a minute "
                           f"({tenant.tokens_per_minute})", "input")
        refused = limiter.try_acquire(total)
        if refused is not None:
            raise ApiError(429, refused[1], headers={"Retry-After": retry_after_header(refused[0])})
        data = []
        try:
            for i, ids in enumerate(token_lists):
                try:
                    states = await worker.call(lambda ids=ids: worker.scheduler.hidden_states(ids))
                except InvalidRequest as e:
                    raise ApiError(503, f"cannot embed now: {e}", headers={"Retry-After": "1"}) from e
                vector = embedding(states, pool)
                base64_asked = body.get("encoding_format") == "base64"
                encoded = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if base64_asked
                           else vector.tolist())
                data.append({"object": "embedding", "index": i, "embedding": encoded})
        finally:
            limiter.release(0)
        return {"object": "list", "data": data, "model": model.name,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # --- LoRA adapters ---

    def _upload_name(self, tenant: Tenant, adapter_id: str) -> str:
        """The engine's name of a tenant's own adapter (the open tenant's are the server's)."""
        return adapter_id if self.tenants.open else f"{tenant.id}/{adapter_id}"

    def adapter_name(self, tenant: Tenant, model: ServedModel, adapter_id: str) -> str:
        """The engine's name of the adapter a tenant asks for: its own, else a server adapter it may use."""
        adapters = model.engine.adapters
        own = f"{tenant.id}/{adapter_id}"
        if not self.tenants.open and own in adapters:
            return own
        if "/" not in adapter_id and adapter_id in adapters:  # never another tenant's "TENANT/ID"
            if not tenant.may_use_lora(adapter_id):
                raise ApiError(403, f"tenant {tenant.id!r} may not use adapter {adapter_id!r}", "lora")
            return adapter_id
        raise ApiError(404, f"no adapter {adapter_id!r} is loaded for model {model.name!r} (see GET /v1/adapters)",
                       "lora", code="adapter_not_found")

    async def adapter_cards(self, tenant: Tenant) -> list[dict[str, Any]]:
        """The adapters a tenant may use, on every model it may use (read on each model's stepping
        thread, which is the one that changes them)."""
        cards = []
        for name in self.model_names(tenant):
            for engine_name, adapter in await self.workers[name].call(self.models[name].engine.adapters.items):
                owner, _, adapter_id = engine_name.rpartition("/")
                if (owner == tenant.id) or (not owner and tenant.may_use_lora(adapter_id)):
                    cards.append(adapter_card(adapter_id, name, adapter, owner or None))
        return cards

    def _adapter_model(self, tenant: Tenant, model_name: str | None) -> ServedModel:
        names = self.model_names(tenant)
        if model_name is None and len(names) != 1:
            raise ApiError(400, f"say which model the adapter is for (?model=NAME, one of {names})", "model")
        return self.model_for(tenant, model_name or names[0])

    async def load_adapter(self, tenant: Tenant, adapter_id: str, data: bytes, model_name: str | None) -> dict:
        """Load an uploaded adapter file as the tenant's own (as the server's, when open)."""
        if not tenant.lora_upload:
            raise ApiError(403, f"tenant {tenant.id!r} may not load adapters (lora_upload)", "id")
        check_adapter_id(adapter_id, lambda message: ApiError(400, message, "id"))
        model = self._adapter_model(tenant, model_name)
        adapter = await asyncio.to_thread(read_adapter, data, model.engine.model.plan, adapter_id)
        await self.workers[model.name].call(lambda: model.engine.load_adapter(self._upload_name(tenant, adapter_id),
                                                                              adapter))
        log.info("adapter %s loaded for tenant=%s model=%s (rank %d, %d tensors)", adapter_id, tenant.id, model.name,
                 adapter.rank, len(adapter.pairs))
        return adapter_card(adapter_id, model.name, adapter, None if self.tenants.open else tenant.id)

    async def unload_adapter(self, tenant: Tenant, adapter_id: str, model_name: str | None) -> None:
        """Unload one of the tenant's own adapters (the open tenant: any); its running generations finish."""
        model = self._adapter_model(tenant, model_name)
        name = self._upload_name(tenant, adapter_id)
        if name not in model.engine.adapters:
            raise ApiError(404, f"tenant {tenant.id!r} has no adapter {adapter_id!r} loaded for {model.name!r}", "id",
                           code="adapter_not_found")
        await self.workers[model.name].call(lambda: model.engine.unload_adapter(name))

    def start(self, job: Job, tenant: Tenant) -> Generation:
        """Admit a job under the server's and the tenant's limits and hand it to its model's scheduler."""
        req = job.request
        cost = job.n * (len(req.prompt_ids) + req.max_tokens)
        limiter = self.limiters[tenant.id]
        worker = self.workers[job.model.name]
        if limiter.exceeds_bucket(cost):
            raise ApiError(400, f"(prompt tokens + max_tokens) x n = {cost} is more than tenant {tenant.id!r} may "
                           f"use in a minute ({tenant.tokens_per_minute})", "max_tokens")
        if not worker.alive:
            raise ApiError(503, f"the worker of {job.model.name!r} is not running (is the app's lifespan in use?)")
        if self.in_flight >= self.settings.max_in_flight:
            raise ApiError(503, f"the server has {self.in_flight} requests in flight; retry shortly",
                           headers={"Retry-After": "1"})
        refused = limiter.try_acquire(cost)
        if refused is not None:
            wait, reason = refused
            raise ApiError(429, reason, headers={"Retry-After": retry_after_header(wait)})
        self.in_flight += 1
        generation = Generation(job, worker)
        t0 = time.perf_counter()
        observe = self.metrics.request(tenant.id, job.model.name, job.kind)
        unused = [0]  # reserved tokens the choices did not generate: given back once all have finished

        def end_choice(unused_tokens: int) -> None:
            generation.unfinished -= 1
            unused[0] += unused_tokens
            if generation.finished:
                self.in_flight -= 1
                limiter.release(unused[0])

        def deliver_to(index: int) -> Callable[[Event], None]:
            def deliver(event: Event) -> None:  # on the loop, whether or not anyone still reads
                if isinstance(event, Finished):
                    end_choice(req.max_tokens - event.completion_tokens)
                    observe.finished(event, count_prompt=index == 0, last=generation.finished)
                    log.info("%s %s[%d] tenant=%s%s model=%s prompt=%d completion=%d finish=%s %.2fs", job.kind,
                             job.id, index, tenant.id, f" user={job.user!r}" if job.user else "", job.model.name,
                             event.prompt_tokens, event.completion_tokens, event.reason, time.perf_counter() - t0)
                elif event.index == 0 and event.token_id is not None:
                    observe.first_token()
                generation.events.put_nowait((index, event))
            return deliver

        requests = job.requests()
        try:
            for index, request in enumerate(requests):
                generation.seq_ids.append(worker.submit(request, deliver_to(index)))
        except BaseException:  # refused at once (prepare() checked this already): no Finished will release it
            for seq_id in generation.seq_ids:  # the choices already queued end as cancelled, releasing theirs
                worker.cancel(seq_id)
            for _ in requests[len(generation.seq_ids):]:
                end_choice(req.max_tokens)
            raise
        return generation
