"""Chat messages -> prompt text: the model's own chat template when its GGUF has one, else a plain one.

The GGUF template (`tokenizer.chat_template`, Jinja) runs in jinja2's immutable sandbox with the
variables such templates expect: `messages`, `add_generation_prompt` (always true), `bos_token`,
`eos_token`, plus `raise_exception(msg)` and `strftime_now(fmt)`. Template errors (including a
template's own `raise_exception`, e.g. "roles must alternate") become `ChatTemplateError`, an
`InvalidRequest`: the messages are the caller's to fix.

Pure Python (jinja2 is too), so it runs in Pyodide as well as in the server.

A template that takes `tools` (it names the variable) and writes calls in a format Realm knows
(tool_calls.FORMATS) supports tool calling: `tool_format` says which. Messages reach the template
as OpenAI sends them, but for an assistant turn's tool_calls, whose arguments (a JSON string)
become the object they spell, as templates write them with `tojson`. A model whose own template
has no tools can be served with one that has: `TEMPLATES` holds Realm's own, by name.

Models without a template (base models such as the default gemma-3-270m) get the plain template,
one line per message and an open assistant turn, and generation stops at the next line that opens
any role's turn ("\\nUser:", "\\nSystem:", "\\nAssistant:", "\\nTool:"):

    System: You are terse.
    User: What is the capital of France?
    Assistant: Paris.
    User: And of Italy?
    Assistant:
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequest
from .tokenizer import Tokenizer
from .tool_calls import ToolCallFormat, format_of

log = logging.getLogger("realm")

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
# A new line opening any role's turn ends the assistant's: a base model goes on writing the
# conversation ("I don't know.\nSystem: What is the ...") after its answer.
PLAIN_STOP = tuple(dict.fromkeys(f"\n{name}:" for name in PLAIN_ROLES.values()))


# Realm's own templates, by name (realm serve --chat-template MODEL=NAME). chatml-tools: ChatML (the
# format of SmolLM2, Qwen and Hermes models) with tools described in the system turn and calls in the
# Hermes format (tool_calls.HERMES); a tool's result is a "tool" turn inside <tool_response> tags.
CHATML_TOOLS = """\
{%- set system = messages[0].content if messages and messages[0].role in ('system', 'developer') else none %}
{%- if system is not none or tools %}
<|im_start|>system
{% if system is not none %}{{ system }}{% if tools %}{{ '\\n\\n' }}{% endif %}{% endif %}
{%- if tools %}You may call functions to help with the user's request. They are described, as JSON, inside \
<tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{"name": "<function name>", "arguments": <the arguments, a JSON object>}
</tool_call>
{%- endif %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if not (loop.first and system is not none) %}
{%- if message.role == 'tool' %}
<|im_start|>tool
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
{%- if message.content or not loop.first %}
{% endif %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
TEMPLATES = {"chatml-tools": CHATML_TOOLS}


class ChatTemplateError(InvalidRequest):
    """The messages cannot be rendered with the model's template."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    add_bos: bool  # False when the template already wrote the BOS token
    stop: tuple[str, ...]  # stop sequences the template implies


def message_text(content: str | Sequence[dict[str, Any]]) -> str:
    """A message's content as one string: OpenAI-style lists of text parts are joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates read it: content one string; tool calls' arguments an object."""
    plain = {**message, "content": message_text(message.get("content") or "")}
    if message.get("tool_calls"):
        plain["tool_calls"] = [{**call, "function": {**call["function"], "arguments": _arguments(call["function"])}}
                               for call in message["tool_calls"]]
    return plain


def _arguments(function: dict[str, Any]) -> Any:
    try:
        return json.loads(function["arguments"])
    except ValueError as e:
        raise ChatTemplateError(f"a tool call's arguments are not JSON: {e}") from e


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """Renders chat messages for one model; `source` says which template: "gguf" or "plain"."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, source: str = "gguf") -> None:
        self.tokenizer = tokenizer
        self._template: jinja2.Template | None = None
        self.source = "plain"
        self.tool_format: ToolCallFormat | None = None  # set when the template supports tool calling
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(template)
                self.source = source
            except jinja2.TemplateError as e:  # unusable: serve the plain template rather than nothing
                log.warning("the model's chat template does not compile (%s); using the plain template", e)
            else:
                takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
                self.tool_format = format_of(template) if takes_tools else None

    @classmethod
    def from_metadata(cls, tokenizer: Tokenizer, metadata: dict[str, Any]) -> ChatTemplate:
        return cls(tokenizer, metadata.get("tokenizer.chat_template"))

    def _token_text(self, token_id: int | None) -> str:
        return self.tokenizer.tokens[token_id] if token_id is not None else ""

    def render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> ChatPrompt:
        """The prompt of `messages`, the model told of `tools` (OpenAI's shapes; tools need a template
        that takes them: the caller checks `tool_format`)."""
        if self._template is None:
            lines = [f"{PLAIN_ROLES[m['role']]}: {message_text(m.get('content') or '')}\n" for m in messages]
            return ChatPrompt("".join(lines) + "Assistant:", True, PLAIN_STOP)
        bos = self._token_text(self.tokenizer.bos_id)
        plain = [_for_template(m) for m in messages]
        try:
            text = self._template.render(messages=plain, tools=tools or None, add_generation_prompt=True,
                                         bos_token=bos, eos_token=self._token_text(self.tokenizer.eos_id))
        except ChatTemplateError:
            raise
        except Exception as e:  # any failure inside a template is the request's problem, not the server's
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        return ChatPrompt(text, not (bos and text.startswith(bos)), ())
