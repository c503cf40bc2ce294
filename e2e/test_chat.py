"""The chat page in headless Chromium with the bundled SmolLM2-135M-Instruct (numpy in Pyodide: the
page's choice on SwiftShader; float32 matmuls, see harness.float32_matmuls): a two-turn chat against
the same conversation run natively, the KV cache reused between turns, the conversation kept across
a reload, chat history, and model output that must show as text, never as markup."""

from __future__ import annotations

import json
from pathlib import Path

from harness import GENERATE_TIMEOUT_MS, QUESTION, NativeChat, chat, float32_matmuls, in_worker, load, wait_ready

MAX_TOKENS = 12  # answers of a few words: bounded e2e time on 2 cores
FOLLOW_UP = "Repeat your last answer."  # no color in it: an answer with one needs the first turn


def start_chat(open_page, chat_model: Path, query: str = ""):
    page = open_page(query)
    wait_ready(page)
    float32_matmuls(page)
    assert page.input_value("#model-select") == f"/models/{chat_model.name}"  # the page's default
    assert "SmolLM2-135M-Instruct Q4_1" in page.inner_text("#model-select")
    assert load(page) == "loaded", page.inner_text("#error")
    assert page.get_attribute("#model-info", "data-chat-template") == "gguf"
    assert page.evaluate("document.body.dataset.mode") == "chat"
    return page


def test_two_turns_reuse_the_kv_cache_and_the_second_answer_needs_the_first(
        open_page, chat_model: Path, native: NativeChat, output_dir: Path) -> None:
    page = start_chat(open_page, chat_model)
    assert page.get_attribute("#model-info", "data-backend") == "numpy"

    first = chat(page, QUESTION, MAX_TOKENS)
    conversation = [{"role": "user", "content": QUESTION}]
    expected = native.answer(conversation, MAX_TOKENS)
    assert first["token_ids"] == expected["token_ids"]
    assert first["text"] == expected["text"].strip() and "Red" in first["text"]  # shown as Markdown
    assert first["cached_tokens"] == 0 and first["prompt_tokens"] == expected["prompt_tokens"]

    second = chat(page, FOLLOW_UP)
    conversation += [{"role": "assistant", "content": expected["text"]}, {"role": "user", "content": FOLLOW_UP}]
    expected = native.answer(conversation, MAX_TOKENS)
    assert second["token_ids"] == expected["token_ids"]
    assert "Red" in second["text"]  # what the follow-up asks for is only in the first turn
    # turn 2 read only its new message: the first prompt and answer came from the KV cache (all of the
    # answer but its last token: the answer's ")" "\n" read back in the template is one token, ")\n")
    assert second["cached_tokens"] == expected["cached_tokens"] == first["prompt_tokens"] + first["tokens"] - 1
    assert second["prompt_tokens"] == expected["prompt_tokens"] > second["cached_tokens"]
    page.screenshot(path=str(output_dir / "chat-two-turns.png"), full_page=True)
    (output_dir / "chat_two_turns.json").write_text(json.dumps({"first": first, "second": second}, indent=1) + "\n")

    # a reload keeps the conversation and lists it among the chats
    chat_id = page.get_attribute("#chat-log", "data-chat-id")
    page.reload()
    page.wait_for_selector("#chat-log article")
    assert page.get_attribute("#chat-log", "data-chat-id") == chat_id
    texts = page.locator("#chat-log article .content").all_inner_texts()
    assert texts == [QUESTION, first["text"], FOLLOW_UP, second["text"]]
    assert page.locator(f"#chat-list li[data-chat-id='{chat_id}']").inner_text().startswith(QUESTION[:20])

    # a new chat starts empty; the old one is one click away
    page.click("#new-chat")
    assert page.locator("#chat-log article").count() == 0
    assert page.locator("#chat-list li").count() == 2
    page.click(f"#chat-list li[data-chat-id='{chat_id}'] .open")
    assert page.locator("#chat-log article .content").all_inner_texts()[1] == first["text"]
    page.screenshot(path=str(output_dir / "chat-after-reload.png"), full_page=True)


def test_regenerate_edit_and_resend_and_a_system_prompt(open_page, chat_model: Path, native: NativeChat) -> None:
    page = start_chat(open_page, chat_model)
    page.click("#system-row summary")
    page.fill("#system-prompt", "You are a pirate.")
    first = chat(page, QUESTION, 8)
    system = [{"role": "system", "content": "You are a pirate."}]
    assert first["token_ids"] == native.answer([*system, {"role": "user", "content": QUESTION}], 8)["token_ids"]

    # regenerate: the last answer is replaced by a new one for the same conversation (greedy: the same)
    page.click("#chat-log article[data-role=assistant] .regenerate")
    page.wait_for_function("document.body.dataset.generation === 'finished' && document.body.dataset.busy === ''")
    assert page.locator("#chat-log article").count() == 2
    again = page.locator("#chat-log article[data-role=assistant]").get_attribute("data-token-ids")
    assert [int(i) for i in again.split(",")] == first["token_ids"]

    # edit the question and send it again: what followed it is replaced
    page.click("#chat-log article[data-role=user] .edit")
    page.fill("#chat-log .editor textarea", "What is the capital of Italy?")
    page.click("#chat-log .editor .save")
    page.wait_for_function("document.body.dataset.generation === 'finished' && document.body.dataset.busy === ''")
    assert page.locator("#chat-log article").count() == 2
    edited = page.locator("#chat-log article[data-role=assistant]").get_attribute("data-token-ids")
    expected = native.answer([*system, {"role": "user", "content": "What is the capital of Italy?"}], 8)
    assert [int(i) for i in edited.split(",")] == expected["token_ids"]
    assert page.locator("#chat-log article[data-role=user] .content").inner_text() == "What is the capital of Italy?"

    # Stop ends an answer where it is; the next turn still reuses the KV cache of what was read
    page.fill("#max-tokens", "200")
    page.fill("#chat-input", "Count from 1 to 100.")
    page.click("#send")
    page.wait_for_function("(document.querySelector('#chat-log article[data-role=assistant][data-state=streaming]')"
                           "?.textContent.length ?? 0) > 3", timeout=GENERATE_TIMEOUT_MS)
    page.click("#chat-stop")
    page.wait_for_function("document.body.dataset.generation === 'stopped' && document.body.dataset.busy === ''")
    stopped = page.locator("#chat-log article[data-role=assistant]").last
    assert stopped.get_attribute("data-state") == "stopped" and "stopped" in stopped.locator(".meta").inner_text()
    after = chat(page, "Thanks.", 4)
    assert after["cached_tokens"] > after["prompt_tokens"] // 2  # the stopped turn's tokens were kept

    # an instruct model asked in the base model's Q&A style ends its turn at once (llama.cpp too:
    # golden qa_paris is one <|im_end|>); the page says so rather than showing nothing
    page.select_option("#mode", "completion")
    page.select_option("#style", "qa")
    page.click("#generate")
    page.wait_for_function("document.body.dataset.generation === 'finished' && document.body.dataset.busy === ''")
    assert page.inner_text("#answer") == ""
    assert page.is_visible("#completion-note")
    assert "instruct model" in page.inner_text("#completion-note") and "Chat" in page.inner_text("#completion-note")


# Model output a page must never turn into markup (each also carries a marker the DOM must show).
HOSTILE = [
    "<script>window.__pwned = 'script'</script>",
    "<img src=x onerror=\"window.__pwned = 'img'\">",
    "**bold** <b onmouseover=alert(1)>not bold</b> [link](javascript:window.__pwned='link')",
    "```html\n<iframe src=\"javascript:window.__pwned='iframe'\"></iframe>\n```",
    "<svg onload=\"window.__pwned='svg'\"></svg> & &amp; &lt;b&gt;",
]

# The test-only hook: the loaded engine's generate() replaced, inside Pyodide, by one that streams
# the hostile text token by token (split mid-tag) through the real worker protocol and page.
FAKE_GENERATE = """
from realm_web_host import HOST
from realm_wasm.scheduler import Finished, TokenEvent

def hostile_steps(ids, max_tokens=64, **settings):  # sampling, stops, speculation, lora: unused
    text = TEXT
    pieces = [TokenEvent(1, text[i:i + 7], i // 7, 0.0) for i in range(0, len(text), 7)]
    for i in range(0, len(pieces), 4):  # four tokens a read-back, as the page's decode gives them
        yield pieces[i:i + 4]
    yield [Finished("stop", len(ids), len(pieces))]

HOST.loaded.engine.generate_steps = hostile_steps
"""


def test_model_output_with_markup_renders_as_text(open_page, chat_model: Path, output_dir: Path) -> None:
    page = start_chat(open_page, chat_model)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    text = "\n\n".join(HOSTILE)
    in_worker(page, FAKE_GENERATE.replace("TEXT", repr(text)))
    chat(page, "Say something dangerous.")
    answer = page.locator("#chat-log article[data-role=assistant] .content")
    shown = answer.inner_text()
    for marker in ("<script>window.__pwned = 'script'</script>", "<img src=x onerror=", "<b onmouseover=alert(1)>",
                   "<iframe src=", "<svg onload=", "&amp; &lt;b&gt;"):
        assert marker in shown, marker
    # Markdown still works, and nothing else became an element
    tags = answer.evaluate("el => [...el.querySelectorAll('*')].map(e => e.tagName.toLowerCase())")
    assert set(tags) <= {"p", "strong", "pre", "code", "br"}, tags
    assert answer.locator("strong").inner_text() == "bold"
    assert page.locator("#chat-log a").count() == 0  # the javascript: link stayed text
    assert page.evaluate("window.__pwned") is None and dialogs == []
    page.screenshot(path=str(output_dir / "chat-hostile-output.png"), full_page=True)

    # the conversation is stored as text, and shows as text again after a reload
    page.reload()
    page.wait_for_selector("#chat-log article[data-role=assistant]")
    assert "<script>window.__pwned" in page.locator("#chat-log article[data-role=assistant] .content").inner_text()
    assert page.evaluate("window.__pwned") is None


MARKDOWN_CASES = [
    # (markdown, the DOM it must become: tag names in document order, and the text)
    ("Hello **world**", ["p", "strong"], "Hello world"),
    ("# Title\ntext", ["h1", "p"], "Titletext"),
    ("- a\n- b", ["ul", "li", "li"], "ab"),
    ("1. a\n2. b", ["ol", "li", "li"], "ab"),
    ("`<b>x</b>`", ["p", "code"], "<b>x</b>"),
    ("```\n<script>alert(1)</script>\n```", ["pre", "code"], "<script>alert(1)</script>"),
    ("[site](https://example.com/x)", ["p", "a"], "site"),
    ("[x](javascript:alert(1))", ["p"], "[x](javascript:alert(1))"),
    ("[x](data:text/html,hi)", ["p"], "[x](data:text/html,hi)"),
    ("<img src=x onerror=alert(1)>", ["p"], "<img src=x onerror=alert(1)>"),
    ("> quote", ["blockquote", "p"], "quote"),
    ("a\nb", ["p", "br"], "ab"),
]


def test_markdown_renderer_builds_only_its_own_elements(open_page) -> None:
    page = open_page()
    result = page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import("./markdown.mjs");
            return cases.map(([md]) => {
                const box = document.createElement("div");
                box.append(renderMarkdown(md));
                const els = [...box.querySelectorAll("*")];
                return { tags: els.map((e) => e.tagName.toLowerCase()), text: box.textContent,
                         attrs: els.flatMap((e) => [...e.attributes].map((a) => `${a.name}=${a.value}`)) };
            });
        }""", [list(c) for c in MARKDOWN_CASES])
    for (md, tags, text), got in zip(MARKDOWN_CASES, result, strict=True):
        assert (got["tags"], got["text"]) == (tags, text), md
        for attr in got["attrs"]:  # only a checked href and the link's fixed rel/target
            assert attr.split("=")[0] in ("href", "rel", "target"), (md, attr)
            assert not attr.startswith("href=") or attr.startswith("href=https://"), (md, attr)
