"""The plain chat template (models without one of their own): what it writes and where it stops."""

from __future__ import annotations

import pytest

from realm_wasm.chat_template import ChatTemplate
from realm_wasm.scheduler import StopText

# one message of every role the API takes
MESSAGES = [{"role": role, "content": f"a {role} message"} for role in ("system", "developer", "user", "assistant",
                                                                        "tool")]
PLAIN = ChatTemplate(None, None)  # no template in the model's metadata (the plain one reads no tokens)
# the role prefixes the plain template writes, read from what it renders
WRITTEN_ROLES = sorted({line.split(":")[0] for line in PLAIN.render(MESSAGES).text.splitlines()})


def test_the_plain_template_writes_one_line_per_message_and_an_open_assistant_turn():
    prompt = PLAIN.render([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi?"}])
    assert prompt.text == "System: You are terse.\nUser: Hi?\nAssistant:"
    assert WRITTEN_ROLES == ["Assistant", "System", "Tool", "User"]


@pytest.mark.parametrize("role", WRITTEN_ROLES)
def test_a_base_model_writing_any_next_turn_is_stopped_at_its_line(role):
    """What a base model did: it answered, then went on with the conversation ("I don't know.\\nSystem:
    What is the"). Streamed a few characters at a time, as tokens come."""
    leaked = f" I don't know.\n{role}: What is the capital?"
    stop = StopText(PLAIN.render(MESSAGES).stop)
    shown, stopped = "", False
    for at in range(0, len(leaked), 3):
        text, stopped = stop.feed(leaked[at:at + 3])
        shown += text
        if stopped:
            break
    assert stopped and shown == " I don't know."
