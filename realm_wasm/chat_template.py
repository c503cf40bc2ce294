"""Chat messages -> prompt text: the model's own chat template when its GGUF has one, else a plain one.

The GGUF template (`tokenizer.chat_template`, Jinja) runs in jinja2's immutable sandbox with the
variables such templates expect: `messages`, `add_generation_prompt` (always true), `bos_token`,
`eos_token`, plus `raise_exception(msg)` and `strftime_now(fmt)`. Template errors (including a
template's own `raise_exception`, e.g. "roles must alternate") become `ChatTemplateError`, an
`InvalidRequest`: the messages are the caller's to fix.

Pure Python (jinja2 is too), so it runs in Pyodide as well as in the server.

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
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequest
from .tokenizer import Tokenizer

log = logging.getLogger("realm")

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
# A new line opening any role's turn ends the assistant's: a base model goes on writing the
# conversation ("I don't know.\nSystem: What is the ...") after its answer.
PLAIN_STOP = tuple(dict.fromkeys(f"\n{name}:" for name in PLAIN_ROLES.values()))


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


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """Renders chat messages for one model; `source` says which template: "gguf" or "plain"."""

    def __init__(self, tokenizer: Tokenizer, template: str | None) -> None:
        self.tokenizer = tokenizer
        self._template: jinja2.Template | None = None
        self.source = "plain"
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(template)
                self.source = "gguf"
            except jinja2.TemplateError as e:  # unusable: serve the plain template rather than nothing
                log.warning("the model's chat template does not compile (%s); using the plain template", e)

    @classmethod
    def from_metadata(cls, tokenizer: Tokenizer, metadata: dict[str, Any]) -> ChatTemplate:
        return cls(tokenizer, metadata.get("tokenizer.chat_template"))

    def _token_text(self, token_id: int | None) -> str:
        return self.tokenizer.tokens[token_id] if token_id is not None else ""

    def render(self, messages: Sequence[dict[str, Any]]) -> ChatPrompt:
        if self._template is None:
            lines = [f"{PLAIN_ROLES[m['role']]}: {message_text(m['content'])}\n" for m in messages]
            return ChatPrompt("".join(lines) + "Assistant:", True, PLAIN_STOP)
        bos = self._token_text(self.tokenizer.bos_id)
        plain = [{**m, "content": message_text(m["content"])} for m in messages]
        try:
            text = self._template.render(messages=plain, add_generation_prompt=True, bos_token=bos,
                                         eos_token=self._token_text(self.tokenizer.eos_id))
        except ChatTemplateError:
            raise
        except Exception as e:  # any failure inside a template is the request's problem, not the server's
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        return ChatPrompt(text, not (bos and text.startswith(bos)), ())
