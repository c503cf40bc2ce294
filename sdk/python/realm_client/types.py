"""What the client returns, and the pieces the sync and async clients share (bodies, SSE parsing)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from .errors import RealmError, error_from

Message = dict[str, Any]  # {"role": "user", "content": "..."}


class GenerationParams(TypedDict, total=False):
    """Sampling and length settings every generating call takes; omitted ones are the server's defaults."""

    max_tokens: int
    temperature: float  # 0 = greedy; the server's default is 1
    top_p: float
    top_k: int
    seed: int
    stop: str | Sequence[str]
    lora: Sequence[dict[str, Any]]  # LoRA adapters [{"id": ..., "scale": ...}]; [] = none, omitted = tenant's default
    speculation: dict[str, Any]  # speculative decoding {"method": "lookup" | "draft", "max_draft": k, "ngram": n}
    n: int  # choices to generate (Completion.choices); choice i samples with seed + i
    logprobs: int  # each token's logprob and this many most likely alternatives (0..20)
    presence_penalty: float  # OpenAI's, -2..2: a token generated before loses this much
    frequency_penalty: float  # OpenAI's, -2..2: ... this much per time it was generated
    repetition_penalty: float  # llama.cpp's: logits of the last repeat_last_n tokens divided (> 0) / multiplied
    repeat_last_n: int  # default 64; 0 disables, -1 the whole context
    logit_bias: dict[int, float]  # token id -> bias in [-100, 100] added to its logit
    user: str  # an end-user id for the server's log
    response_format: dict[str, Any]  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema"}}
    grammar: str  # llama-server's GBNF grammar the output follows (not with response_format)
    tools: Sequence[dict[str, Any]]  # chat: [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice: str | dict[str, Any]  # "none" | "auto" (default) | "required" | {"type": "function", "function": ...}
    parallel_tool_calls: bool  # several calls in one answer (default false)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and its most likely alternatives (most likely first)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def parse_logprobs(logprobs: dict[str, Any] | None) -> list[TokenLogprob] | None:
    """The logprobs of a choice or chunk, from the chat shape (content[...]) or the legacy one."""
    if not logprobs:
        return None
    if "content" in logprobs:
        return [TokenLogprob(e["token"], e["logprob"], tuple((t["token"], t["logprob"]) for t in e["top_logprobs"]))
                for e in logprobs["content"]]
    return [TokenLogprob(token, logprob, tuple(top.items())) for token, logprob, top in
            zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)]


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the request's tools: `arguments` is JSON text that follows its parameters schema."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)

    def message(self) -> dict[str, Any]:
        """The call as an assistant turn's tool_calls entry (to send the conversation back)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed piece of a tool call: its first piece has the id and name, then arguments text follows."""

    index: int  # the call's place among the answer's calls
    id: str | None
    name: str | None
    arguments: str


def parse_tool_calls(calls: list[dict[str, Any]] | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls or ())


def join_tool_calls(deltas: Sequence[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The calls a stream's ToolCallDeltas spell, in order."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, [d.id or "", d.name or "", ""])
        call[2] += d.arguments
    return tuple(ToolCall(*calls[i]) for i in sorted(calls))


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop", "length", or "tool_calls" (the answer ends with calls)
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    tool_calls: tuple[ToolCall, ...] = ()  # a chat answer's calls of the request's tools


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    drafted_tokens: int | None = None  # a request that speculated: tokens drafted, and those accepted
    accepted_tokens: int | None = None
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused (not computed again)

    @classmethod
    def of(cls, usage: dict[str, Any]) -> Usage:
        """A response's usage (its completion_tokens_details only repeat the drafts, as OpenAI names them)."""
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return cls(**{k: v for k, v in usage.items() if k in cls.__dataclass_fields__}, cached_tokens=cached)


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    text: str
    finish_reason: str  # "stop", "length" or "tool_calls"
    usage: Usage
    choices: tuple[Choice, ...] = ()  # every choice (n of them); text and finish_reason are the first's

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs if self.choices else None

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.choices[0].tool_calls if self.choices else ()


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text; the last chunk of a stream has `finish_reason` set and usually no text."""

    text: str
    finish_reason: str | None = None
    index: int = 0  # the choice it belongs to (n > 1)
    logprobs: list[TokenLogprob] | None = None  # its tokens' logprobs, when asked
    tool_calls: tuple[ToolCallDelta, ...] = ()  # pieces of tool calls (join them with join_tool_calls)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    context_length: int
    chat_template: str  # "gguf" (the model's own), "plain", "file" or one of Realm's by name ("chatml-tools")
    tool_calls: str | None = None  # the tool-call format of its template ("hermes"); None: no tool calling


def generation_body(model: str, prompt: str | list[int] | None, messages: Sequence[Message] | None,
                    params: GenerationParams, stream: bool) -> dict[str, Any]:
    """A completions/chat request body; parameters left out (or None) take the server's defaults."""
    unknown = set(params) - set(GenerationParams.__annotations__)
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"model": model, **{k: v for k, v in params.items() if v is not None}}
    if isinstance(body.get("stop"), tuple):
        body["stop"] = list(body["stop"])
    if "logit_bias" in body:  # JSON keys are strings
        body["logit_bias"] = {str(token): bias for token, bias in body["logit_bias"].items()}
    if messages is not None:
        body["messages"] = list(messages)
        if "logprobs" in body:  # chat spells it as a switch and a count
            body["logprobs"], body["top_logprobs"] = True, body["logprobs"]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def parse_completion(body: dict[str, Any]) -> Completion:
    choices = tuple(Choice(c["index"], (c["message"]["content"] or "") if "message" in c else c["text"],
                           c["finish_reason"], parse_logprobs(c.get("logprobs")),
                           parse_tool_calls(c.get("message", {}).get("tool_calls"))) for c in body["choices"])
    first = choices[0]
    return Completion(body["id"], body["model"], first.text, first.finish_reason, Usage.of(body["usage"]), choices)


def parse_models(body: dict[str, Any]) -> list[ModelInfo]:
    return [ModelInfo(m["id"], m["context_length"], m["chat_template"], m.get("tool_calls")) for m in body["data"]]


class SSEDecoder:
    """Turns the lines of a server-sent-events stream into Chunks; keeps finish_reason and usage."""

    def __init__(self) -> None:
        self.data: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def line(self, line: str) -> Chunk | None:
        """Feed one line; returns a Chunk when an event with text or a finish reason completes."""
        if line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
            return None
        if line or not self.data:  # comments, other fields, or a blank line with nothing gathered
            return None
        data, self.data = "\n".join(self.data), []
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:
            raise error_from(500, event)
        if event.get("usage"):
            self.usage = Usage.of(event["usage"])
        if not event.get("choices"):
            return None
        choice = event["choices"][0]
        text = choice["delta"].get("content") or "" if "delta" in choice else choice.get("text", "")
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        logprobs = parse_logprobs(choice.get("logprobs"))
        calls = tuple(ToolCallDelta(d["index"], d.get("id"), d["function"].get("name"),
                                    d["function"].get("arguments", ""))
                      for d in choice.get("delta", {}).get("tool_calls") or ())
        if not text and choice.get("finish_reason") is None and logprobs is None and not calls:
            return None
        return Chunk(text, choice.get("finish_reason"), choice.get("index", 0), logprobs, calls)

    def check_complete(self) -> None:
        if not self.done:
            raise RealmError("the stream ended before [DONE]")


def ws_generate_message(gen_id: str, model: str, prompt: str | list[int] | None,
                        messages: Sequence[Message] | None, params: GenerationParams) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    return {"type": "generate", "id": gen_id, **generation_body(model, prompt, messages, params, stream=False)}


def ws_chunk(message: dict[str, Any]) -> tuple[Chunk | None, Usage | None]:
    """A WebSocket message for one generation -> (chunk to yield, usage when it is the last)."""
    kind = message.get("type")
    if kind == "token":
        return Chunk(message["text"]), None
    if kind == "done":
        return Chunk("", message["finish_reason"]), Usage.of(message["usage"])
    raise error_from(message.get("status", 500), message, message.get("retry_after"))
