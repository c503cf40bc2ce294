// <realm-chat>: a chat box for any page, no code needed. The model runs in this browser tab.
//
//   <script type="module" src="realm-chat.mjs"></script>
//   <realm-chat model="models/smollm2-135m-instruct-q4_1.gguf" system="You are a concise assistant."
//               max-tokens="256" temperature="0.7"></realm-chat>
//
// Attributes: model (GGUF URL, required), system (system prompt), max-tokens, temperature,
// backend ("auto" | "webgpu" | "numpy"), placeholder. It uses realm-engine.mjs (the engine API,
// from the same folder); `element.engine` is that engine once loaded, and the element fires
// "realm-ready" then one "realm-answer" (detail: the chat.completion-like answer) per reply.
// Answers are rendered as Markdown by markdown.mjs, which never turns model output into markup.

import { renderMarkdown } from "./markdown.mjs";
import { createEngine } from "./realm-engine.mjs";

const STYLE = `
:host { display: block; border: 1px solid #dde1e8; border-radius: 10px; font-family: system-ui, sans-serif;
        background: #fff; color: #1d2330; }
.log { display: flex; flex-direction: column; gap: 0.6rem; padding: 0.8rem; max-height: 28rem; overflow-y: auto; }
.msg { border-radius: 8px; padding: 0.5rem 0.8rem; max-width: 85%; line-height: 1.45; }
.msg.user { align-self: flex-end; background: #e6ecfd; white-space: pre-wrap; }
.msg.assistant { align-self: flex-start; background: #f3f4f7; }
.msg.assistant > :first-child { margin-top: 0; } .msg.assistant > :last-child { margin-bottom: 0; }
.msg pre { background: #1d2330; color: #f3f4f7; padding: 0.5rem; border-radius: 6px; overflow-x: auto; }
form { display: flex; gap: 0.5rem; padding: 0.6rem; border-top: 1px solid #dde1e8; }
textarea { flex: 1; font: inherit; padding: 0.4rem; border: 1px solid #dde1e8; border-radius: 6px; resize: vertical; }
button { font: inherit; padding: 0.4rem 0.9rem; border-radius: 6px; border: 1px solid #2f5bea; background: #2f5bea;
         color: #fff; cursor: pointer; }
button:disabled { opacity: 0.45; cursor: not-allowed; }
.status { font-size: 0.8rem; color: #667085; padding: 0 0.8rem 0.5rem; }
`;

class RealmChat extends HTMLElement {
  constructor() {
    super();
    this.messages = []; // the conversation: [{role, content}]
    this.engine = null;
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = `<style>${STYLE}</style><div class="log" part="log"></div>
      <div class="status" part="status">starting…</div>
      <form part="form"><textarea rows="2"></textarea><button type="submit" disabled>Send</button>
      <button type="button" class="stop" hidden>Stop</button></form>`; // fixed markup: no user or model text
    this.log = root.querySelector(".log");
    this.status = root.querySelector(".status");
    this.input = root.querySelector("textarea");
    this.sendButton = root.querySelector("button[type=submit]");
    this.stopButton = root.querySelector(".stop");
    root.querySelector("form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send(this.input.value);
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send(this.input.value);
      }
    });
    this.stopButton.addEventListener("click", () => this.engine?.abort());
  }

  async connectedCallback() {
    if (this.engine || this.starting) return;
    this.starting = true;
    this.input.placeholder = this.getAttribute("placeholder") || "Message the model";
    const model = this.getAttribute("model");
    if (!model) {
      this.setStatus("error", "<realm-chat> needs a model attribute (a GGUF URL)");
      return;
    }
    try {
      this.engine = await createEngine({
        model: new URL(model, document.baseURI).href,
        backend: this.getAttribute("backend") || "auto",
        onProgress: (p) => this.setStatus("loading", p.text),
      });
      this.setStatus("ready", `${this.engine.model.id} on ${this.engine.model.backend}`);
      this.sendButton.disabled = false;
      this.dispatchEvent(new CustomEvent("realm-ready", { detail: this.engine.model }));
    } catch (err) {
      this.setStatus("error", `could not start: ${err.message}`);
    }
  }

  setStatus(state, text) {
    this.dataset.state = state;
    this.status.textContent = text;
  }

  bubble(role, text) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    el.dataset.role = role;
    if (role === "assistant") el.append(renderMarkdown(text));
    else el.textContent = text;
    this.log.append(el);
    return el;
  }

  async send(text) {
    if (!text.trim() || !this.engine || this.sendButton.disabled) return;
    this.input.value = "";
    this.messages.push({ role: "user", content: text });
    this.bubble("user", text);
    const bubble = this.bubble("assistant", "");
    this.sendButton.disabled = true;
    this.stopButton.hidden = false;
    this.setStatus("answering", "answering…");
    const system = this.getAttribute("system");
    let answer = "";
    try {
      const stream = await this.engine.chat.completions.create({
        messages: system ? [{ role: "system", content: system }, ...this.messages] : this.messages,
        stream: true, stream_options: { include_usage: true },
        max_tokens: Number(this.getAttribute("max-tokens") || 256),
        temperature: Number(this.getAttribute("temperature") ?? 0.7),
      });
      let usage = null;
      for await (const chunk of stream) {
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices[0]?.delta?.content;
        if (delta) {
          answer += delta;
          bubble.replaceChildren(renderMarkdown(answer));
          this.log.scrollTop = this.log.scrollHeight;
        }
      }
      this.messages.push({ role: "assistant", content: answer });
      this.setStatus("ready", this.engine.runtimeStatsText());
      this.dispatchEvent(new CustomEvent("realm-answer", { detail: { content: answer, usage } }));
    } catch (err) {
      this.messages.pop(); // the question goes unanswered; it may be asked again
      bubble.textContent = `error: ${err.message}`;
      this.setStatus("error", err.message);
    } finally {
      this.sendButton.disabled = false;
      this.stopButton.hidden = true;
    }
  }
}

if (!customElements.get("realm-chat")) customElements.define("realm-chat", RealmChat);
