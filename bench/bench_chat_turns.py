"""Time to first token across the turns of one chat: does turn n cost its new message or its history?

    python bench/bench_chat_turns.py [--turns 10] [--max-tokens 8] [--where browser native]

A chat with the bundled SmolLM2-135M-Instruct, greedy, short answers. Each turn sends the whole
conversation (rendered with the model's chat template); the KV cache still holds the previous turn,
so only the new message should be read. For every turn it prints the prompt tokens, how many came
from the KV cache, and the time to first token; then the last turn's conversation once more from a
cold cache (an unrelated prompt in between evicts it), which is what every turn would cost without
the reuse. The whole chat runs `--repeats` times (greedy: the same answers); the fastest and the
median time of each turn are printed, since other work on the machine only ever adds time.

browser: the engine API (web/realm-engine.mjs via web/example.html) in headless Chromium, the
page's own choice of executor (numpy in Pyodide on SwiftShader). native: the same through
`Engine` on numpy in CPython.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the page helpers the e2e tests use

from harness import CHROMIUM, NativeChat, build_site_assets, chromium_flags, live_server  # noqa: E402

from realm_wasm.model_files import CHAT_MODEL, chat_model_path  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "And of Italy?", "Which of the two is larger?", "Name a river in France.",
    "Name a river in Italy.", "What language is spoken in Italy?", "What food is Italy known for?",
    "What food is France known for?", "Which country has more people?", "Summarize our chat in one sentence.",
    "Thank you!", "Goodbye.",
]
EVICT = "Once upon a time"  # a prompt sharing nothing with the chat: the next one starts cold

# One turn through the engine API: the answer, its usage and the worker's time to first token.
BROWSER_TURN = """async ({messages, maxTokens}) => {
    const engine = window.realmEngine;
    const reply = await engine.chat.completions.create({messages, max_tokens: maxTokens, temperature: 0});
    return {text: reply.choices[0].message.content, promptTokens: reply.usage.prompt_tokens,
            cachedTokens: reply.usage.prompt_tokens_details.cached_tokens, ttftMs: engine.stats().last.ttftMs};
}"""
BROWSER_EVICT = """async (prompt) => {
    await window.realmEngine.completions.create({prompt, max_tokens: 1, temperature: 0});
}"""


class BrowserChat:
    def __init__(self, page) -> None:
        self.page = page

    def turn(self, messages: list[dict], max_tokens: int) -> dict:
        return self.page.evaluate(BROWSER_TURN, {"messages": messages, "maxTokens": max_tokens})

    def evict(self) -> None:
        self.page.evaluate(BROWSER_EVICT, EVICT)


class NativeTurns:
    def __init__(self) -> None:
        self.chat = NativeChat(chat_model_path())

    def turn(self, messages: list[dict], max_tokens: int) -> dict:
        started = time.perf_counter()
        engine, template = self.chat.engine, self.chat.template
        prompt = template.render(messages)
        ids = engine.tokenizer.encode(prompt.text, add_bos=prompt.add_bos)
        events = engine.generate(ids, max_tokens=max_tokens)
        first, text = None, ""
        while True:
            try:
                event = next(events)
            except StopIteration as end:
                finished = end.value
                break
            first = first if first is not None else time.perf_counter() - started
            text += event.text
        return {"text": text, "promptTokens": finished.prompt_tokens, "cachedTokens": finished.cached_tokens,
                "ttftMs": 1000 * first}

    def evict(self) -> None:
        list(self.chat.engine.generate(EVICT, max_tokens=1))


def run(chat, turns: int, max_tokens: int, repeats: int) -> list[dict]:
    """The chat `repeats` times from a cold cache (greedy: the same answers each time), then its last
    turn cold; per turn the fastest and the median time to first token (the machine is shared)."""
    rows: list[dict] = []
    for repeat in range(repeats):
        chat.evict()  # the first time also a warm-up (first-call costs); every time an unrelated cache
        messages = []
        for n in range(turns + 1):
            if n == turns:  # the last turn's conversation again, from a cold cache
                messages.pop()
                chat.evict()
            else:
                messages.append({"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]})
            result = chat.turn(messages, max_tokens)
            if repeat == 0:
                rows.append({"turn": n + 1 if n < turns else f"{turns} cold", "ttfts": [], **result})
            assert result["text"] == rows[n]["text"] and result["cachedTokens"] == rows[n]["cachedTokens"]
            rows[n]["ttfts"].append(result["ttftMs"])
            messages.append({"role": "assistant", "content": result["text"]})
    return rows


def print_table(where: str, rows: list[dict]) -> None:
    print(f"\n{where}\n\n| turn | prompt tokens | from KV cache | new tokens read | TTFT ms, fastest "
          "| TTFT ms, median |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        new = r["promptTokens"] - r["cachedTokens"]
        ttfts = sorted(r["ttfts"])
        print(f"| {r['turn']} | {r['promptTokens']} | {r['cachedTokens']} | {new} | {ttfts[0]:,.0f} | "
              f"{ttfts[len(ttfts) // 2]:,.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the whole chat (fastest and median kept)")
    parser.add_argument("--where", nargs="+", default=["browser", "native"], choices=["browser", "native"])
    args = parser.parse_args()
    model = chat_model_path()
    if "native" in args.where:
        print_table("native (CPython, numpy)", run(NativeTurns(), args.turns, args.max_tokens, args.repeats))
    if "browser" in args.where:
        from playwright.sync_api import sync_playwright

        build_site_assets()
        with live_server((model.parent,), CHAT_MODEL) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=chromium_flags())
            page = browser.new_page()
            page.goto(f"{server.url}example.html?model=models/{CHAT_MODEL}")
            page.wait_for_function("document.body.dataset.state === 'ready'", timeout=600_000)
            backend = page.evaluate("window.realmEngine.model.backend")
            print_table(f"browser (headless Chromium, engine API, {backend} in Pyodide)",
                        run(BrowserChat(page), args.turns, args.max_tokens, args.repeats))
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
