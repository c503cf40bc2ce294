"""Tool calling: the grammar a model's tool calls follow, and the calls read back out of its text.

A chat request's `tools` (OpenAI's [{"type": "function", "function": {"name", "description",
"parameters"}}]) go to the model's chat template, which tells the model about them; the model then
writes its calls in its template's format, which Realm recognizes by a marker in the template's
text (FORMATS). The calls are generated under a grammar (constrained sampling, grammar.py): each
names one of the tools and its arguments follow that tool's `parameters` schema, so every call the
answer carries parses and validates. `tool_choice` says where the grammar applies:

    "none"                     nowhere: the answer is text, nothing is parsed
    "auto" (the default)       from the first place the text opens a call (a lazy grammar: free text before)
    "required"                 from the first token: one call (one or more with parallel_tool_calls)
    {"type": "function", "function": {"name": N}}     from the first token: exactly one call of N

The Hermes format (Qwen2.5, Hermes, SmolLM3 and Realm's own "chatml-tools" template) writes a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and several calls one after another, a newline between. `ToolCallParser` splits a streamed answer
into its content and its calls (OpenAI's `tool_calls`, arguments streamed as they are written).

Pure Python, so it runs in Pyodide as well as in the server.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest
from .grammar import JSON_BASE_GBNF, GrammarError, gbnf_literal, json_schema_rules

# OpenAI's rule for function names; it also keeps them free of anything a JSON string must escape
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(InvalidRequest):
    """Tools a request cannot use; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCallFormat:
    """How a family of chat templates writes a tool call: `opening` name `between` arguments `closing`."""

    name: str
    marker: str  # text in a template that says it asks for calls written this way
    trigger: str  # the text that opens a call: where a lazy ("auto") grammar starts to apply
    opening: str  # the trigger and what follows it up to the function's name
    between: str  # from the end of the name to the start of the arguments' JSON object
    closing: str  # after the arguments' object: the end of the call
    separator: str  # between two calls

    def gbnf(self, tools: Sequence[Tool], several: bool) -> str:
        """GBNF for one call (or, `several`, one or more) of one of `tools`, arguments by their schemas."""
        rules: dict[str, str] = {}
        for tool in tools:
            try:
                json_schema_rules(tool.parameters, f"args-{tool.index}", rules)
            except GrammarError as e:
                raise ToolError(f"tools[{tool.index}].function.parameters: {e}",
                                f"tools[{tool.index}].function.parameters") from e
        calls = " | ".join(f"{gbnf_literal(tool.name + self.between)} args-{tool.index}" for tool in tools)
        call = f"{gbnf_literal(self.opening)} ( {calls} ) {gbnf_literal(self.closing)}"
        more = f" ( {gbnf_literal(self.separator)} call )*" if several else ""
        helpers = "".join(f"{name} ::= {body}\n" for name, body in rules.items())
        return f"root ::= call{more}\ncall ::= {call}\n{helpers}{JSON_BASE_GBNF}"


HERMES = ToolCallFormat("hermes", marker="<tool_call>", trigger="<tool_call>",
                        opening='<tool_call>\n{"name": "', between='", "arguments": ',
                        closing="}\n</tool_call>", separator="\n")
FORMATS = (HERMES,)


def format_of(template: str) -> ToolCallFormat | None:
    """The tool-call format a chat template's text asks for, if it is one Realm knows."""
    return next((f for f in FORMATS if f.marker in template), None)


@dataclass(frozen=True)
class Tool:
    index: int  # its place in the request's tools
    name: str
    parameters: dict[str, Any]  # the JSON schema of its arguments


@dataclass(frozen=True)
class ToolChoice:
    """A request's tools and how they may be called (see the module's docstring)."""

    tools: tuple[Tool, ...]
    mode: str  # "none", "auto" or "required" (a named function is "required" of that one tool)
    parallel: bool  # several calls in one answer

    @classmethod
    def from_request(cls, tools: Sequence[dict[str, Any]], tool_choice: Any, parallel: bool | None) -> ToolChoice:
        """From OpenAI's fields (their JSON shape already validated); ToolError names a field whose
        value cannot be used: a name twice, a tool_choice naming no tool."""
        parsed, seen = [], set()
        for i, tool in enumerate(tools):
            function = tool["function"]
            name = function["name"]
            if not TOOL_NAME.fullmatch(name):
                raise ToolError(f"tools[{i}].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -, got {name!r}",
                                f"tools[{i}].function.name")
            if name in seen:
                raise ToolError(f"tools[{i}].function.name {name!r} names two tools", f"tools[{i}].function.name")
            seen.add(name)
            parameters = function.get("parameters") or {}
            if parameters.get("type", "object") != "object":  # arguments are a JSON object (OpenAI's rule)
                raise ToolError(f"tools[{i}].function.parameters must be an object schema",
                                f"tools[{i}].function.parameters.type")
            parameters = {"type": "object", **parameters}
            parsed.append(Tool(i, name, parameters))
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            named = [t for t in parsed if t.name == name]
            if not named:
                raise ToolError(f"tool_choice names function {name!r}, which is not among the tools",
                                "tool_choice.function.name")
            return cls(tuple(named), "required", False)
        return cls(tuple(parsed), choice, bool(parallel))  # default: one call (llama-server's default)

    @property
    def constrained(self) -> bool:
        return self.mode != "none"

    def gbnf(self, fmt: ToolCallFormat) -> str:
        return fmt.gbnf(self.tools, self.parallel)


# --- reading calls out of the streamed text --------------------------------------------------------

@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int  # the call's place in the answer's tool_calls
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str  # the next piece of the arguments' JSON text


Delta = Content | CallStart | CallArguments


def _held(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back until known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits an answer's text, as it streams, into content and tool calls. The grammar makes the
    calls' layout exactly the format's, so the parser follows it literally: text that strays from
    it (there is none under the grammar) is content."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.buffer = ""  # text read but not yet given out
        self.state = "content"  # content -> name -> arguments -> after (-> name again, for another call)
        self.calls = 0  # calls opened so far
        self.closed = 0  # calls whose closing was read

    def feed(self, text: str) -> list[Delta]:
        self.buffer += text
        deltas: list[Delta] = []
        while True:
            step = getattr(self, f"_{self.state}")()
            if step is None:
                return deltas
            deltas.extend(step)

    def finish(self) -> list[Delta]:
        """What is still held back at the end of the answer, if it is content. (In a call cut short
        by max_tokens, what is held back is the start of the closing or of a name: not given out.)"""
        text, self.buffer = self.buffer, ""
        return [Content(text)] if text and self.state in ("content", "after") else []

    # each state's step: the deltas it can give out, or None when it needs more text

    def _content(self) -> list[Delta] | None:
        at = self.buffer.find(self.fmt.opening)
        if at < 0:
            keep = _held(self.buffer, self.fmt.opening)
            out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
            return [Content(out)] if out else None
        out, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(self.fmt.opening):], "name"
        return [Content(out)] if out else []

    def _name(self) -> list[Delta] | None:
        at = self.buffer.find(self.fmt.between)
        if at < 0:
            return None
        name, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(self.fmt.between):], "arguments"
        self.calls += 1
        return [CallStart(self.calls - 1, "call_" + secrets.token_hex(12), name)]

    def _arguments(self) -> list[Delta] | None:
        at = self.buffer.find(self.fmt.closing)
        if at < 0:
            keep = _held(self.buffer, self.fmt.closing)
            out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
            return [CallArguments(self.calls - 1, out)] if out else None
        out, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(self.fmt.closing):], "after"
        self.closed += 1
        return [CallArguments(self.calls - 1, out)] if out else []

    def _after(self) -> list[Delta] | None:
        again = self.fmt.separator + self.fmt.opening
        if again.startswith(self.buffer):
            if self.buffer == again:
                self.buffer, self.state = "", "name"
                return []
            return None  # all of it may still open the next call
        if self.buffer.startswith(again):
            self.buffer, self.state = self.buffer[len(again):], "name"
            return []
        self.state = "content"  # text after the calls: there is none under the grammar
        return []
