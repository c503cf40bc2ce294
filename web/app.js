// Realm page: renders what the worker (worker.js, protocol documented there) reports and sends it
// the user's requests. Nothing heavy runs on this thread.
//
// Two modes. Chat: a conversation (system prompt, user and assistant turns) that the worker renders
// with the model's own chat template; every turn sends the whole conversation and the worker's KV
// cache makes only the new message cost time. Completion: the model continues a prompt as typed
// (what a base model such as gemma-3-270m is for), or a "Question: …\nAnswer:" wrapper.
// Conversations are kept in localStorage (STORE_KEY) with a list of past chats.

import { renderMarkdown } from "./markdown.mjs";

const $ = (id) => document.getElementById(id);

// Prompt styles of the completion mode: a base model answers "Question: …\nAnswer:" well, then
// goes on with a new "Question:", which ends the generation (a stop sequence, cut in Python).
const STYLES = {
  completion: { prompt: (text) => text, stop: [] },
  qa: { prompt: (text) => `Question: ${text.trim()}\nAnswer:`, stop: ["\nQuestion:"] },
};

// Titles of the errors only the page and the worker raise; the runtime's come from Python with
// the "ready" message (realm_wasm/errors.py TITLES).
const ERROR_TITLES = {
  network: "The download failed.",
  busy: "Busy.",
  boot: "The runtime did not start.",
  crashed: "The runtime crashed.",
  storage: "Could not save the chats.",
};

// The adapter features Realm's kernels choose variants by.
const KERNEL_FEATURES = ["shader-f16", "subgroups", "timestamp-query"];

// Used when the page is served without /config.json: the usual static layout, and a Pyodide
// distribution that has jinja2 in its own lock file.
const DEFAULT_CONFIG = {
  pyodideBaseUrl: "pyodide/", bundleUrl: "dist/realm_wasm.zip", pythonPackages: ["jinja2"], defaultModel: null,
  models: [],
};

// Which executor runs the model: ?backend=webgpu|numpy|auto in the page's URL preselects it.
const BACKENDS = ["auto", "webgpu", "numpy"];

const STORE_KEY = "realm.chats.v1"; // {chats: [Chat], current: id}; Chat: {id, title, system, messages, updated}
const TITLE_CHARS = 48;

const state = {
  worker: null,
  ready: false,
  busy: null, // "load" | "adapter" | "generate" while the worker works on one
  modelLoaded: false,
  model: null, // the "loaded" event's model description
  adapters: [], // the model's LoRA adapters: the worker's description + {on, scale} as set here
  lostAdapters: null, // the adapters of a model whose device was lost, until it is loaded again
  nextId: 1,
  config: DEFAULT_CONFIG,
  cachedUrls: new Set(), // model URLs the browser's Cache API holds
  tokenIds: [], // of the current generation
  generation: null, // {id, kind: "chat" | "completion", target: the assistant message being written}
  chats: [],
  current: null, // the open chat
  editing: null, // index of the user message being edited
};

function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

const ms = (x) => `${Math.round(x)} ms`;

function setBody(key, value) {
  document.body.dataset[key] = value;
}

function make(tag, props = {}, children = []) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(el.dataset, value);
    else el[key] = value;
  }
  el.append(...children);
  return el;
}

// --- chats in localStorage ------------------------------------------------------------------------

function newChat() {
  return { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New chat",
    system: "", messages: [], updated: Date.now() };
}

function loadChats() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
    if (stored && Array.isArray(stored.chats)) {
      state.chats = stored.chats.filter((c) => c && Array.isArray(c.messages));
      state.current = state.chats.find((c) => c.id === stored.current) || null;
    }
  } catch {
    state.chats = []; // unreadable: start afresh rather than not at all
  }
  // an answer that was streaming when the page went away ends where it was
  for (const chat of state.chats) {
    for (const m of chat.messages) if (m.state === "streaming") m.state = "stopped";
  }
  if (!state.current) {
    state.current = state.chats[0] || newChat();
    if (!state.chats.includes(state.current)) state.chats.unshift(state.current);
  }
}

function saveChats() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ chats: state.chats, current: state.current.id }));
  } catch (err) {
    showError("storage", `${err.message} (the chat goes on, but will not survive a reload)`);
  }
}

function touch(chat) {
  chat.updated = Date.now();
  const first = chat.messages.find((m) => m.role === "user");
  if (first) chat.title = first.content.trim().replace(/\s+/g, " ").slice(0, TITLE_CHARS) || "New chat";
  // most recent first
  state.chats = [chat, ...state.chats.filter((c) => c !== chat)];
}

// --- rendering ------------------------------------------------------------------------------------

function refreshButtons() {
  const idle = state.ready && !state.busy;
  $("load").disabled = !idle;
  $("adapter-load").disabled = !(idle && state.modelLoaded);
  $("load-stop").hidden = state.busy !== "load";
  $("clear-cache").disabled = !idle;
  $("generate").disabled = !(idle && state.modelLoaded);
  $("stop").disabled = state.busy !== "generate";
  $("send").disabled = !(idle && state.modelLoaded);
  $("send").hidden = state.busy === "generate";
  $("chat-stop").hidden = state.busy !== "generate";
  $("new-chat").disabled = state.busy === "generate";
  const listed = "#chat-list button, #chat-log .actions button, #adapter-list button";
  for (const button of document.querySelectorAll(listed)) {
    button.disabled = state.busy === "generate" || (button.dataset.needsModel && !state.modelLoaded);
  }
  setBody("busy", state.busy || "");
}

function showError(code, message) {
  $("error-title").textContent = ERROR_TITLES[code] || "Error.";
  $("error-message").textContent = message;
  $("error").dataset.code = code;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  delete $("error").dataset.code;
}

function showWarning(code, message) {
  $("warning").textContent = message;
  $("warning").dataset.code = code;
  $("warning").hidden = false;
}

function send(msg) {
  state.worker.postMessage(msg);
}

function selectedModelUrl() {
  const choice = $("model-select").value;
  const raw = choice === "custom" ? $("model-url").value.trim() : choice;
  return raw ? new URL(raw, location.href).href : null;
}

function fillModelPicker() {
  const select = $("model-select");
  const chosen = select.value || state.config.defaultModel;
  select.replaceChildren();
  for (const m of state.config.models) {
    const cached = state.cachedUrls.has(new URL(m.url, location.href).href) ? " · cached" : "";
    const kind = (m.chat === true ? " · chat" : m.chat === false ? " · base" : "") + (m.files > 1 ? ` · ${m.files} files` : "");
    select.append(new Option(`${m.label || m.name} (${formatBytes(m.size)}${kind}${cached})`, m.url, false,
      m.url === chosen));
  }
  select.append(new Option("Other URL…", "custom", false, chosen === "custom"));
  $("model-url-row").hidden = select.value !== "custom";
}

function renderGpu(gpu) {
  const el = $("gpu-info");
  if (!gpu.available) {
    el.textContent = `unavailable: ${gpu.reason}`;
    el.className = "bad";
    setBody("gpu", "none");
    return;
  }
  const name = [gpu.vendor, gpu.architecture, gpu.device, gpu.description].filter(Boolean).join(" · ");
  const fallback = gpu.isFallbackAdapter ? " (software fallback adapter)" : "";
  const binding = formatBytes(gpu.limits.maxStorageBufferBindingSize);
  const has = KERNEL_FEATURES.map((f) => (gpu.features.includes(f) ? f : `no ${f}`)).join(", ");
  el.textContent = `${name || "unnamed adapter"}${fallback}; ${has}; max storage binding ${binding}`;
  el.title = `all features: ${gpu.features.join(", ")}`;
  el.className = "ok";
  setBody("gpu", gpu.architecture || gpu.vendor || "available");
}

function renderProgress({ loaded, total, percent, fromCache }) {
  const bar = $("progress");
  bar.hidden = false;
  if (percent === null) bar.removeAttribute("value");
  else bar.value = percent;
  const source = fromCache ? "from browser cache" : "downloading";
  const pct = percent === null ? "" : ` (${percent.toFixed(1)}%)`;
  $("progress-text").textContent = `${source}: ${formatBytes(loaded)} / ${formatBytes(total)}${pct}`;
}

function renderModel({ model, fromCache, ms: took, wasmHeapBytes }) {
  const types = Object.entries(model.tensorTypes).map(([t, n]) => `${t}×${n}`).join(", ");
  const template = model.chatTemplate === "gguf" ? "its own chat template" : "no chat template (base model)";
  $("model-info").textContent = `${model.name || "unnamed"} — architecture ${model.architecture}, `
    + `${model.tensorCount} tensors (${types}), ${formatBytes(model.bytes)}, `
    + `${fromCache ? "from the browser cache" : "downloaded"} in ${ms(took)}; context ${model.nCtx} tokens; ${template}`;
  $("backend-info").textContent = `${model.backendNote}; wasm heap ${formatBytes(wasmHeapBytes)}`;
  const info = $("model-info").dataset;
  info.architecture = model.architecture;
  info.tensorCount = model.tensorCount;
  info.bytes = model.bytes;
  info.fromCache = fromCache;
  info.backend = model.backend;
  info.chatTemplate = model.chatTemplate;
  info.wasmHeapBytes = wasmHeapBytes;
  info.loadMs = Math.round(took);
}

function forgetModel(why) {
  state.modelLoaded = false;
  state.model = null;
  state.lostAdapters = why === "lost" ? state.adapters : null; // their switches, for restoreAdapters
  setAdapters([]);
  $("adapter-status").textContent = "";
  $("model-info").textContent = "";
  $("backend-info").textContent = "";
  setBody("model", why);
}

function statsText({ ttftMs, tokensPerSecond, tokens, promptTokens, cachedTokens, draftedTokens, acceptedTokens }) {
  const parts = [];
  if (ttftMs !== null && ttftMs !== undefined) parts.push(`TTFT ${ms(ttftMs)}`);
  if (tokensPerSecond !== null && tokensPerSecond !== undefined) parts.push(`${tokensPerSecond.toFixed(1)} tok/s`);
  if (tokens !== undefined) parts.push(`${tokens} tokens`);
  if (promptTokens !== null && promptTokens !== undefined) {
    parts.push(`prompt ${promptTokens} tokens, ${cachedTokens ?? 0} reused from the KV cache`);
  }
  if (draftedTokens !== null && draftedTokens !== undefined) {
    parts.push(`lookup drafted ${draftedTokens}, accepted ${acceptedTokens}`);
  }
  return parts.join(" · ");
}

// The adapters a lost device's model was loaded again with, switched as they were before the loss.
function restoreAdapters(described) {
  state.adapters = state.lostAdapters || [];
  state.lostAdapters = null;
  setAdapters(described);
}

// The adapters the worker lists, keeping the switch and scale of those already here.
function setAdapters(described) {
  const before = new Map(state.adapters.map((a) => [a.id, a]));
  state.adapters = described.map((a) => ({ on: true, scale: 1, ...before.get(a.id), ...a }));
  renderAdapters();
}

function renderAdapters() {
  $("adapter-list").replaceChildren(...state.adapters.map((adapter) => {
    const on = make("input", { type: "checkbox", className: "adapter-on", checked: adapter.on });
    on.addEventListener("change", () => { adapter.on = on.checked; });
    const scale = make("input", { type: "number", className: "adapter-scale", step: 0.1, value: adapter.scale });
    scale.addEventListener("input", () => {
      adapter.scale = Number.isFinite(Number(scale.value)) ? Number(scale.value) : 1;
    });
    const unload = make("button", { type: "button", className: "adapter-unload link", textContent: "unload" });
    unload.addEventListener("click", () => send({ type: "unloadAdapter", id: state.nextId++, name: adapter.id }));
    const facts = `rank ${adapter.rank}, ${adapter.tensors} tensors, ${formatBytes(adapter.bytes)}`;
    return make("li", { dataset: { adapterId: adapter.id } }, [
      make("label", {}, [on, ` ${adapter.id}`]), make("label", {}, ["scale ", scale]),
      make("span", { className: "muted", textContent: facts }), unload]);
  }));
}

function renderCache({ available, entries, usage, quota }) {
  state.cachedUrls = new Set(entries.map((e) => e.url));
  fillModelPicker();
  if (!available) {
    $("cache-info").textContent = "no browser cache here (needs https or localhost)";
    return;
  }
  const total = entries.reduce((sum, e) => sum + (e.bytes || 0), 0);
  const room = quota ? `, ${formatBytes(usage)} of ${formatBytes(quota)} used` : "";
  $("cache-info").textContent = `${entries.length} cached model${entries.length === 1 ? "" : "s"} `
    + `(${formatBytes(total)}${room})`;
}

function renderChatList() {
  const list = $("chat-list");
  list.replaceChildren();
  for (const chat of state.chats) {
    if (!chat.messages.length && chat !== state.current) continue; // empty drafts are not history
    const open = make("button", { type: "button", className: "open", textContent: chat.title,
      title: new Date(chat.updated).toLocaleString() });
    open.addEventListener("click", () => openChat(chat));
    const remove = make("button", { type: "button", className: "delete link", textContent: "×",
      title: "Delete this chat" });
    remove.setAttribute("aria-label", `Delete chat ${chat.title}`);
    remove.addEventListener("click", () => deleteChat(chat));
    list.append(make("li", { className: chat === state.current ? "current" : "", dataset: { chatId: chat.id } },
      [open, remove]));
  }
}

// One message's content: the user's as typed (text), the assistant's as Markdown (markdown.mjs
// makes DOM nodes, never HTML from the text, so model output cannot inject markup).
function fillContent(el, message) {
  if (message.role === "assistant") el.replaceChildren(renderMarkdown(message.content));
  else el.textContent = message.content;
}

function messageNote(message) {
  if (message.state === "failed") return message.error || "failed";
  if (message.state === "stopped") return "stopped";
  if (message.state === "done" && !message.content.trim()) {
    return "The model ended its turn without a word (0 tokens). Try rephrasing, or Regenerate with a temperature above 0.";
  }
  return "";
}

function renderMessage(message, index) {
  const content = make("div", { className: "content" });
  fillContent(content, message);
  const actions = make("div", { className: "actions" });
  const last = index === state.current.messages.length - 1;
  if (message.role === "user") {
    const edit = make("button", { type: "button", className: "edit link", textContent: "Edit",
      dataset: { needsModel: "1" } });
    edit.addEventListener("click", () => startEdit(index));
    actions.append(edit);
  } else if (last) {
    const again = make("button", { type: "button", className: "regenerate link", textContent: "Regenerate",
      dataset: { needsModel: "1" } });
    again.addEventListener("click", regenerate);
    actions.append(again);
  }
  const meta = make("div", { className: "meta" });
  meta.textContent = [messageNote(message), message.stats ? statsText(message.stats) : ""].filter(Boolean).join(" · ");
  const article = make("article", { className: `message ${message.role}`,
    dataset: { role: message.role, index: String(index), state: message.state || "done" } }, [content, actions, meta]);
  if (message.stats) {
    Object.assign(article.dataset, { ttftMs: message.stats.ttftMs ?? "", tokens: message.stats.tokens ?? "",
      promptTokens: message.stats.promptTokens ?? "", cachedTokens: message.stats.cachedTokens ?? "" });
  }
  if (message.tokenIds) article.dataset.tokenIds = message.tokenIds.join(",");
  if (state.editing === index) article.replaceChildren(editor(index));
  return article;
}

function renderChat() {
  const chat = state.current;
  $("system-prompt").value = chat.system || "";
  if (chat.system) $("system-row").open = true;
  $("chat-log").replaceChildren(...chat.messages.map(renderMessage));
  $("chat-empty").hidden = chat.messages.length > 0;
  $("chat-log").dataset.chatId = chat.id;
  renderChatList();
  refreshButtons();
}

// While an answer streams only its own content is redrawn, once per frame at most.
let redrawQueued = false;
function redrawStreaming() {
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => {
    redrawQueued = false;
    const gen = state.generation;
    if (!gen || gen.kind !== "chat") return;
    const index = state.current.messages.indexOf(gen.target);
    const article = $("chat-log").querySelector(`article[data-index="${index}"] .content`);
    if (article) fillContent(article, gen.target);
    $("chat-log").lastElementChild?.scrollIntoView({ block: "end" });
  });
}

// --- chat actions ---------------------------------------------------------------------------------

function readNumber(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

function samplingSettings() {
  return {
    maxTokens: Math.round(readNumber("max-tokens", 256)),
    temperature: readNumber("temperature", 0),
    topK: Math.round(readNumber("top-k", 0)),
    topP: readNumber("top-p", 1),
    seed: Math.round(readNumber("seed", 0)),
    speculation: $("lookup").checked ? { method: "lookup", max_draft: 8 } : null,
    lora: state.adapters.filter((a) => a.on).map((a) => ({ id: a.id, scale: a.scale })),
  };
}

// What the model reads: the system prompt, then every finished turn (a failed answer is left out).
function conversation(chat, upTo) {
  const turns = chat.messages.slice(0, upTo).filter((m) => m.state !== "failed")
    .map((m) => ({ role: m.role, content: m.content }));
  return chat.system.trim() ? [{ role: "system", content: chat.system }, ...turns] : turns;
}

function startGeneration(kind, request, target = null) {
  clearError();
  const id = state.nextId++;
  state.busy = "generate";
  state.generation = { id, kind, target };
  state.tokenIds = [];
  $("stats").textContent = "";
  setBody("generation", "running");
  send({ type: "generate", id, ...samplingSettings(), ...request });
  refreshButtons();
}

function answer() {
  const chat = state.current;
  const target = { role: "assistant", content: "", state: "streaming" };
  const messages = conversation(chat, chat.messages.length);
  chat.messages.push(target);
  touch(chat);
  saveChats();
  renderChat();
  startGeneration("chat", { messages }, target);
}

function sendMessage(text) {
  if (!text.trim() || state.busy || !state.modelLoaded) return;
  state.current.system = $("system-prompt").value;
  state.current.messages.push({ role: "user", content: text });
  $("chat-input").value = "";
  answer();
}

function regenerate() {
  const chat = state.current;
  if (state.busy || chat.messages.at(-1)?.role !== "assistant") return;
  chat.messages.pop();
  answer();
}

function startEdit(index) {
  if (state.busy) return;
  state.editing = index;
  renderChat();
  $("chat-log").querySelector(".editor textarea")?.focus();
}

function editor(index) {
  const message = state.current.messages[index];
  const box = make("textarea", { value: message.content, rows: 3 });
  const save = make("button", { type: "button", className: "save", textContent: "Save & send" });
  const cancel = make("button", { type: "button", className: "secondary cancel", textContent: "Cancel" });
  save.addEventListener("click", () => {
    if (!box.value.trim() || !state.modelLoaded) return;
    state.editing = null;
    // the conversation goes on from the edited message: what followed it is replaced
    state.current.messages.splice(index, Infinity, { role: "user", content: box.value });
    answer();
  });
  cancel.addEventListener("click", () => {
    state.editing = null;
    renderChat();
  });
  return make("div", { className: "editor" }, [box, make("div", { className: "row buttons" }, [save, cancel])]);
}

function openChat(chat) {
  if (state.busy === "generate") return;
  state.current = chat;
  state.editing = null;
  saveChats();
  renderChat();
}

function deleteChat(chat) {
  if (state.busy === "generate") return;
  state.chats = state.chats.filter((c) => c !== chat);
  if (chat === state.current) state.current = state.chats.find((c) => c.messages.length) || newChat();
  if (!state.chats.includes(state.current)) state.chats.unshift(state.current);
  saveChats();
  renderChat();
}

function startNewChat() {
  if (state.busy === "generate") return;
  const empty = state.chats.find((c) => !c.messages.length);
  state.current = empty || newChat();
  if (!empty) state.chats.unshift(state.current);
  state.current.system = "";
  state.editing = null;
  saveChats();
  renderChat();
  $("chat-input").focus();
}

function setMode(mode) {
  $("mode").value = mode;
  $("chat-panel").hidden = mode !== "chat";
  $("completion-panel").hidden = mode !== "completion";
  $("chat-title").textContent = mode === "chat" ? "Chat" : "Generate";
  setBody("mode", mode);
}

// --- worker events --------------------------------------------------------------------------------

function onToken(msg) {
  const gen = state.generation;
  if (msg.tokenId !== null) state.tokenIds.push(msg.tokenId);
  $("stats").textContent = statsText(msg);
  if (!gen) return;
  if (gen.kind === "chat") {
    gen.target.content += msg.text;
    gen.target.tokenIds = state.tokenIds;
    redrawStreaming();
  } else {
    $("answer").append(msg.text);
    $("output").dataset.tokenIds = state.tokenIds.join(",");
  }
}

function onDone(msg) {
  const gen = state.generation;
  state.busy = null;
  state.generation = null;
  const stats = { ttftMs: msg.ttftMs, tokensPerSecond: msg.tokensPerSecond, tokens: msg.tokens,
    promptTokens: msg.promptTokens, cachedTokens: msg.cachedTokens, draftedTokens: msg.draftedTokens,
    acceptedTokens: msg.acceptedTokens, finishReason: msg.finishReason };
  $("stats").textContent = statsText(stats);
  // the exact numbers, for scripts (bench/bench_browser.py, bench/bench_chat_browser.py)
  Object.assign($("stats").dataset, { ttftMs: msg.ttftMs ?? "", tokensPerSecond: msg.tokensPerSecond ?? "",
    tokens: msg.tokens, promptTokens: msg.promptTokens ?? "", cachedTokens: msg.cachedTokens ?? "",
    draftedTokens: msg.draftedTokens ?? "", acceptedTokens: msg.acceptedTokens ?? "" });
  if (gen && gen.kind === "chat") {
    gen.target.state = msg.reason === "stopped" ? "stopped" : "done";
    gen.target.stats = stats;
    gen.target.tokenIds = state.tokenIds;
    touch(state.current);
    saveChats();
    renderChat();
  } else if (gen) {
    // an instruct model asked in completion style often ends its turn at once: say so
    const note = $("completion-note");
    note.hidden = msg.tokens > 0 || msg.reason !== "finished";
    note.textContent = state.model && state.model.chatTemplate === "gguf"
      ? "The model ended at once (0 tokens): it is an instruct model, which answers chat messages. Switch the mode to Chat."
      : "The model ended at once (0 tokens): it produced its end-of-text token first.";
  }
  setBody("generation", msg.reason);
}

function onMessage(msg) {
  switch (msg.type) {
    case "status":
      $("runtime-status").textContent = msg.text;
      break;
    case "ready": {
      state.ready = true;
      const v = msg.versions;
      $("runtime-status").textContent = "ready";
      $("runtime-versions").textContent = `realm_wasm ${v.realm} · Python ${v.python} · numpy ${v.numpy} · Pyodide ${v.pyodide}`;
      const t = msg.timings;
      $("runtime-timings").textContent = `Pyodide ${ms(t.pyodideMs)}, packages ${ms(t.packagesMs)}, `
        + `runtime ${ms(t.runtimeMs)} (total ${ms(t.totalMs)})`;
      Object.assign(ERROR_TITLES, msg.errorTitles);
      renderGpu(msg.gpu);
      setBody("runtime", "ready");
      setBody("realmVersion", v.realm);
      break;
    }
    case "progress":
      if (state.busy === "adapter") $("adapter-status").textContent = `downloading: ${formatBytes(msg.loaded)}`;
      else renderProgress(msg);
      break;
    case "adapterLoaded":
      state.busy = null;
      setAdapters(msg.adapters);
      $("adapter-status").textContent = `${msg.adapter.id} loaded${msg.fromCache ? " from the browser cache" : ""} `
        + `in ${ms(msg.ms)}`;
      setBody("adapter", "loaded");
      break;
    case "adapterUnloaded":
      setAdapters(msg.adapters);
      $("adapter-status").textContent = `${msg.name} unloaded`;
      setBody("adapter", "unloaded");
      break;
    case "loaded":
      state.busy = null;
      state.modelLoaded = true;
      state.model = msg.model;
      renderModel(msg);
      // an instruct model chats; a base model completes text (it can chat with the plain template too)
      setMode(msg.model.chatTemplate === "gguf" ? "chat" : "completion");
      $("adapter-status").textContent = `room for ${msg.model.maxAdapters} adapters`
        + (msg.model.maxLoraRank ? ` of rank up to ${msg.model.maxLoraRank}` : "");
      setBody("model", "loaded");
      break;
    case "cancelled":
      state.busy = null;
      $("progress-text").textContent = "loading stopped";
      setBody("model", "none");
      break;
    case "token":
      onToken(msg);
      break;
    case "done":
      onDone(msg);
      break;
    case "cache":
      renderCache(msg);
      break;
    case "warning":
      showWarning(msg.code, msg.message);
      if (msg.adapters) restoreAdapters(msg.adapters); // a lost device's model came back with them
      break;
    case "error":
      onError(msg);
      break;
  }
  refreshButtons();
}

function onError({ id, code, message, fatal }) {
  showError(code, message);
  if (id !== undefined && state.busy && code !== "busy") {
    if (state.busy === "load") {
      forgetModel("failed");
      $("progress").hidden = true;
      $("progress-text").textContent = "";
    } else if (state.busy === "adapter") {
      $("adapter-status").textContent = "the adapter did not load";
      setBody("adapter", "failed");
    } else {
      const gen = state.generation;
      if (gen && gen.kind === "chat") {
        gen.target.state = "failed";
        gen.target.error = message;
        saveChats();
        renderChat();
      }
      state.generation = null;
      setBody("generation", "failed");
    }
    state.busy = null;
  }
  // the device's buffers are gone with it: the model has to be loaded again
  if (code === "device-lost") forgetModel("lost");
  if (fatal) restartWorker();
}

// A fresh worker after a fatal error: the page stays usable, the model has to be loaded again.
function restartWorker() {
  if (state.worker) state.worker.terminate();
  state.ready = false;
  state.busy = null;
  forgetModel("none");
  setBody("runtime", "starting");
  $("runtime-status").textContent = "restarting the runtime…";
  startWorker();
}

let bootFailures = 0;

function fromWorker(msg) {
  if (msg.type === "ready") bootFailures = 0;
  // a runtime that cannot boot would restart forever: give up after the second try
  if (msg.type === "error" && msg.code === "boot" && msg.fatal && ++bootFailures >= 2) {
    showError("boot", msg.message);
    $("runtime-status").textContent = "failed to start";
    setBody("runtime", "failed");
    return;
  }
  onMessage(msg);
}

function startWorker() {
  const worker = new Worker(new URL("worker.js", import.meta.url), { type: "module" });
  state.worker = worker;
  worker.onmessage = (event) => fromWorker(event.data);
  worker.onerror = (event) => {
    event.preventDefault();
    fromWorker({ type: "error", code: "boot", message: `worker script error: ${event.message}`, fatal: true });
  };
  const absolute = (url) => new URL(url, location.href).href;
  send({
    type: "init",
    pyodideBaseUrl: absolute(state.config.pyodideBaseUrl),
    bundleUrl: absolute(state.config.bundleUrl),
    hostUrl: absolute("realm_web_host.py"),
    pythonPackages: state.config.pythonPackages,
  });
}

function wireControls() {
  $("model-select").addEventListener("change", () => {
    $("model-url-row").hidden = $("model-select").value !== "custom";
  });
  $("load").addEventListener("click", () => {
    const url = selectedModelUrl();
    if (!url) {
      showError("bad-request", "choose a model or paste its URL");
      return;
    }
    clearError();
    state.busy = "load";
    forgetModel("loading");
    renderProgress({ loaded: 0, total: null, percent: 0, fromCache: false });
    send({ type: "load", id: state.nextId++, url, backend: $("backend").value });
    refreshButtons();
  });
  $("load-stop").addEventListener("click", () => send({ type: "stop" }));
  $("adapter-load").addEventListener("click", () => {
    const raw = $("adapter-url").value.trim();
    if (!raw) {
      showError("bad-request", "paste the URL of a LoRA adapter (.gguf)");
      return;
    }
    const url = new URL(raw, location.href).href;
    // its id: the file's name, as a generation's lora names it
    const name = decodeURIComponent(new URL(url).pathname.split("/").pop() || "adapter").replace(/\.gguf$/i, "");
    clearError();
    state.busy = "adapter";
    setBody("adapter", "loading");
    $("adapter-status").textContent = `loading ${name}…`;
    send({ type: "loadAdapter", id: state.nextId++, url, name });
    refreshButtons();
  });
  $("generate").addEventListener("click", () => {
    const style = STYLES[$("style").value];
    const prompt = style.prompt($("prompt").value);
    $("output-prompt").textContent = prompt;
    $("answer").textContent = "";
    $("output").dataset.tokenIds = "";
    $("completion-note").hidden = true;
    startGeneration("completion", { prompt, stop: style.stop });
  });
  $("stop").addEventListener("click", () => send({ type: "stop" }));
  $("chat-stop").addEventListener("click", () => send({ type: "stop" }));
  $("style").addEventListener("change", () => {
    $("prompt").value = $("style").value === "qa" ? "What is the capital of France?"
      : "Question: What is the capital of France?\nAnswer:";
  });
  $("mode").addEventListener("change", () => setMode($("mode").value));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage($("chat-input").value);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage($("chat-input").value);
    }
  });
  $("system-prompt").addEventListener("change", () => {
    state.current.system = $("system-prompt").value;
    saveChats();
  });
  $("new-chat").addEventListener("click", startNewChat);
  $("clear-cache").addEventListener("click", () => send({ type: "clearCache" }));
  $("error-dismiss").addEventListener("click", clearError);
}

async function main() {
  setBody("runtime", "starting");
  const asked = new URLSearchParams(location.search).get("backend");
  if (BACKENDS.includes(asked)) $("backend").value = asked;
  wireControls();
  setMode("chat");
  loadChats();
  renderChat();
  try {
    const response = await fetch("config.json", { cache: "no-cache" });
    if (response.ok) state.config = { ...DEFAULT_CONFIG, ...(await response.json()) };
  } catch {
    // no config.json: the defaults fit the usual static layout
  }
  fillModelPicker();
  refreshButtons();
  startWorker();
}

main();
