// Realm engine for web developers: an OpenAI-shaped API over the Realm Web Worker (worker.js), so a
// page can run a model in the browser with a few lines and no server of its own.
//
//   import { createEngine } from "./realm-engine.mjs";
//   const engine = await createEngine({ model: "models/smollm2-135m-instruct-q4_1.gguf",
//                                       onProgress: (p) => console.log(p.text) });
//   const reply = await engine.chat.completions.create({ messages: [{ role: "user", content: "Hi!" }] });
//   console.log(reply.choices[0].message.content);
//   for await (const chunk of await engine.chat.completions.create({ messages, stream: true })) {
//     output.textContent += chunk.choices[0]?.delta?.content ?? "";
//   }
//
// createEngine(options):
//   model        URL of a GGUF file (relative URLs are resolved against the page; a split model's first
//                shard, its other shards beside it); optional, see load()
//   onProgress   called with {progress (0..1), text, loaded, total, fromCache} while booting and loading
//   backend      "auto" (WebGPU on a real GPU, else numpy) | "webgpu" | "numpy"
//   onDeviceLost called with {message, recovered} when the GPU device is lost: the worker makes a new
//                one and loads the model and its LoRA adapters again by itself (recovered false, then
//                true once loaded; engine.adapters then lists the adapters that came back); the
//                generation that was running rejects with code "device-lost", later requests wait for
//                the reload.
//   baseUrl      where worker.js, realm_web_host.py and config.json are (default: this module's folder);
//                config.json (written by `realm serve` and `realm build-site`) says where Pyodide and
//                the runtime bundle are; pyodideBaseUrl, bundleUrl, pythonPackages override it
//
// engine.chat.completions.create({messages, stream, max_tokens, temperature, top_p, top_k, seed, stop,
//                                 speculation, lora, response_format, grammar, stream_options: {include_usage}})
//   messages are rendered with the model's own chat template (from its GGUF; a base model gets a plain
//   one). stream: true resolves to an async iterable of "chat.completion.chunk" objects; otherwise
//   to one "chat.completion". A conversation's next turn re-reads only the new messages: the worker
//   keeps the KV cache of the previous turn (usage.prompt_tokens_details.cached_tokens).
//   speculation: {method: "lookup", max_draft (1-32, default 8), ngram (1-8, default 3)}, as the
//   server takes it: prompt lookup drafts tokens the model verifies several a step, the same answer;
//   usage then adds drafted_tokens, accepted_tokens and OpenAI's completion_tokens_details
//   (accepted_prediction_tokens, rejected_prediction_tokens).
//   lora: [{id, scale}] (scale default 1), as the server takes it: loaded LoRA adapters to apply.
//   response_format ({type: "json_object"} or {type: "json_schema", json_schema: {schema}}) or grammar
//   (GBNF text), as the server takes them: the output follows it, enforced while sampling.
// engine.completions.create({prompt, ...the same}) continues a text ("text_completion").
// engine.abort()      ends the running generation: its stream ends with finish_reason "abort"
// engine.load(url)    loads another model (the previous one is freed, and its adapters)
// engine.loadAdapter(url, {id})  loads a LoRA adapter (llama.cpp's GGUF adapter format) for the model,
//                     under `id` (default: the file's name); resolves to {id, rank, alpha, tensors, bytes}
// engine.unloadAdapter(id)       frees it; engine.adapters lists the loaded ones
// engine.unload()     frees the model and ends the worker; the engine cannot be used after it
// engine.stats()      {model, loadMs, fromCache, last: {ttftMs, tokensPerSecond, promptTokens,
//                      cachedTokens, completionTokens, draftedTokens, acceptedTokens, totalMs}};
//                      runtimeStatsText() in words
// engine.memory()     resolves to {wasmHeapBytes, gpuBuffers, gpuBytes, kvTokens}: the worker's wasm heap,
//                      and the GPU buffers the model's device allocated (0 on numpy), asked of the worker now
// Requests run one at a time, in the order they were made. Failures reject with a RealmEngineError
// whose `code` is the worker's (worker.js lists them: "bad-model", "network", "context-overflow", ...).

const DEFAULTS = { max_tokens: 256, temperature: 0.7, top_p: 0.95, top_k: 40 };

export class RealmEngineError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "RealmEngineError";
    this.code = code;
  }
}

// An async iterable fed by the worker's events: push() values, end() or fail() once.
class Channel {
  constructor() {
    this.items = [];
    this.waiting = null;
    this.closed = false;
    this.error = null;
  }

  push(value) {
    this.items.push(value);
    this.#wake();
  }

  end() {
    this.closed = true;
    this.#wake();
  }

  fail(error) {
    this.error = error;
    this.end();
  }

  #wake() {
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve();
    }
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.items.length) {
        yield this.items.shift();
      } else if (this.closed) {
        if (this.error) throw this.error;
        return;
      } else {
        await new Promise((resolve) => { this.waiting = resolve; });
      }
    }
  }
}

function modelName(url) {
  const file = decodeURIComponent(new URL(url).pathname.split("/").pop() || "model");
  return file.replace(/(-\d{5}-of-\d{5})?\.gguf$/i, ""); // a split model is NAME, as the server calls it
}

function checkRequest(kind, req) {
  if (!req || typeof req !== "object") throw new RealmEngineError("bad-request", "create() takes one request object");
  if (kind === "chat" && (!Array.isArray(req.messages) || req.messages.length === 0)) {
    throw new RealmEngineError("bad-request", "messages must be a non-empty array of {role, content}");
  }
  if (kind === "completion" && typeof req.prompt !== "string") {
    throw new RealmEngineError("bad-request", "prompt must be a string");
  }
  if (req.n !== undefined && req.n !== 1) throw new RealmEngineError("bad-request", "only n = 1 is supported");
  if (req.lora != null && !(Array.isArray(req.lora) && req.lora.every((a) => typeof a?.id === "string"))) {
    throw new RealmEngineError("bad-request", "lora must be an array of {id, scale}");
  }
  if (req.speculation != null && typeof req.speculation?.method !== "string") {
    throw new RealmEngineError("bad-request", 'speculation must be {method: "lookup", max_draft, ngram} or null');
  }
}

function textOf(content) {
  // OpenAI-style content parts: the text ones, joined by newlines (as the server does)
  return Array.isArray(content) ? content.filter((p) => p.type === "text").map((p) => p.text).join("\n") : content;
}

class RealmEngine {
  constructor(options) {
    this.options = options;
    this.baseUrl = new URL(options.baseUrl ?? ".", import.meta.url);
    this.handlers = new Map(); // request id -> function(event)
    this.nextId = 1;
    this.queue = Promise.resolve(); // requests run one after another
    this.running = null; // id of the generation in progress
    this.model = null;
    this.adapters = []; // the model's LoRA adapters, as the worker last listed them
    this.loadInfo = null;
    this.last = null;
    this.dead = null; // a RealmEngineError once the worker cannot go on
  }

  progress(update) {
    if (this.options.onProgress) this.options.onProgress(update);
  }

  async start() {
    let config = {};
    try {
      const response = await fetch(new URL("config.json", this.baseUrl), { cache: "no-cache" });
      if (response.ok) config = await response.json();
    } catch {
      // no config.json: the options and the usual layout (pyodide/, dist/) must do
    }
    const at = (url) => new URL(url, this.baseUrl).href;
    const o = this.options;
    this.worker = new Worker(new URL("worker.js", this.baseUrl), { type: "module" });
    this.worker.onmessage = (event) => this.onEvent(event.data);
    this.worker.onerror = (event) => {
      event.preventDefault();
      this.onEvent({ type: "error", code: "boot", message: `worker script error: ${event.message}`, fatal: true });
    };
    const ready = new Promise((resolve, reject) => { this.booting = { resolve, reject }; });
    this.worker.postMessage({
      type: "init",
      pyodideBaseUrl: at(o.pyodideBaseUrl ?? config.pyodideBaseUrl ?? "pyodide/"),
      bundleUrl: at(o.bundleUrl ?? config.bundleUrl ?? "dist/realm_wasm.zip"),
      hostUrl: at("realm_web_host.py"),
      pythonPackages: o.pythonPackages ?? config.pythonPackages ?? ["jinja2"],
    });
    this.runtime = await ready;
  }

  onEvent(msg) {
    if (msg.type === "status") {
      this.progress({ progress: 0, text: msg.text, loaded: 0, total: null, fromCache: false });
    } else if (msg.type === "ready") {
      this.booting.resolve(msg);
    } else if (msg.type === "warning" && msg.code === "device-lost") {
      if (msg.adapters) this.adapters = msg.adapters; // those loaded again with the model
      this.options.onDeviceLost?.({ message: msg.message, recovered: Boolean(msg.recovered) });
    } else if (msg.type === "loaded" && msg.id === undefined) { // the model again, on a new GPU device
      this.model = { ...this.model, ...msg.model };
      this.adapters = []; // until the "recovered" warning lists the ones loaded again
    } else if (msg.type === "error" && msg.id === undefined) {
      const error = new RealmEngineError(msg.code, msg.message);
      if (msg.fatal) this.kill(error);
    } else if (msg.id !== undefined && this.handlers.has(msg.id)) {
      this.handlers.get(msg.id)(msg);
      if (msg.type === "error" && msg.fatal) this.kill(new RealmEngineError(msg.code, msg.message));
    }
  }

  kill(error) {
    this.dead = error;
    this.booting?.reject(error);
    for (const handler of this.handlers.values()) handler({ type: "error", code: error.code, message: error.message });
    this.handlers.clear();
    this.worker?.terminate();
  }

  // Run `work(id)` after every earlier request; it resolves when its handler says so.
  request(work) {
    const run = this.queue.then(() => {
      if (this.dead) throw this.dead;
      return work(this.nextId++);
    });
    this.queue = run.catch(() => {});
    return run;
  }

  downloadProgress(msg, url) {
    const pct = msg.percent === null ? "" : ` ${msg.percent.toFixed(0)}%`;
    this.progress({ progress: msg.percent === null ? 0 : msg.percent / 100, loaded: msg.loaded, total: msg.total,
      fromCache: msg.fromCache, text: `${msg.fromCache ? "reading from the cache" : "downloading"} ${url}${pct}` });
  }

  // A request whose worker downloads `url` (a model or an adapter): progress messages, then the
  // `done` type, whose message `onDone` turns into the result, or an error.
  download(url, message, done, onDone) {
    return this.request((id) => new Promise((resolve, reject) => {
      this.handlers.set(id, (msg) => {
        if (msg.type === "progress") {
          this.downloadProgress(msg, url);
          return;
        }
        this.handlers.delete(id);
        if (msg.type === done) {
          resolve(onDone(msg));
        } else {
          reject(new RealmEngineError(msg.type === "cancelled" ? "cancelled" : msg.code, msg.message ?? "load stopped"));
        }
      });
      this.worker.postMessage({ ...message, id });
    }));
  }

  load(url, { backend = this.options.backend ?? "auto" } = {}) {
    const absolute = new URL(url, globalThis.location?.href ?? this.baseUrl).href;
    return this.download(url, { type: "load", url: absolute, backend }, "loaded", (msg) => {
      this.model = { ...msg.model, id: modelName(absolute), url: absolute };
      this.adapters = [];
      this.loadInfo = { loadMs: msg.ms, fromCache: msg.fromCache, wasmHeapBytes: msg.wasmHeapBytes };
      this.progress({ progress: 1, text: `${this.model.id} ready`, loaded: msg.model.bytes, total: msg.model.bytes,
        fromCache: msg.fromCache });
      return this.model;
    });
  }

  loadAdapter(url, { id } = {}) {
    const absolute = new URL(url, globalThis.location?.href ?? this.baseUrl).href;
    const name = id ?? modelName(absolute);
    return this.download(url, { type: "loadAdapter", url: absolute, name }, "adapterLoaded", (msg) => {
      this.adapters = msg.adapters;
      return msg.adapter;
    });
  }

  unloadAdapter(name) {
    return this.request((id) => new Promise((resolve, reject) => {
      this.handlers.set(id, (msg) => {
        this.handlers.delete(id);
        if (msg.type === "adapterUnloaded") {
          this.adapters = msg.adapters;
          resolve();
        } else {
          reject(new RealmEngineError(msg.code, msg.message));
        }
      });
      this.worker.postMessage({ type: "unloadAdapter", id, name });
    }));
  }

  // One generation: the worker's token events as {text, tokenId} into a Channel, then its end.
  generate(kind, req) {
    checkRequest(kind, req);
    const channel = new Channel();
    const stop = req.stop === undefined || req.stop === null ? [] : [].concat(req.stop);
    const settings = { ...DEFAULTS, ...req };
    const done = this.request((id) => new Promise((resolve) => {
      if (!this.model) throw new RealmEngineError("no-model", "load a model first (createEngine({model}) or engine.load(url))");
      this.running = id;
      this.handlers.set(id, (msg) => {
        if (msg.type === "token") {
          channel.push({ text: msg.text });
          return;
        }
        this.handlers.delete(id);
        this.running = null;
        if (msg.type === "done") {
          this.last = { ttftMs: msg.ttftMs, tokensPerSecond: msg.tokensPerSecond, promptTokens: msg.promptTokens,
            cachedTokens: msg.cachedTokens, completionTokens: msg.tokens, draftedTokens: msg.draftedTokens,
            acceptedTokens: msg.acceptedTokens, totalMs: msg.totalMs };
          channel.push({ finish: msg });
          channel.end();
        } else {
          channel.fail(new RealmEngineError(msg.code, msg.message));
        }
        resolve();
      });
      this.worker.postMessage({
        type: "generate", id,
        ...(kind === "chat" ? { messages: req.messages.map((m) => ({ role: m.role, content: textOf(m.content) })) }
          : { prompt: req.prompt }),
        maxTokens: settings.max_tokens, temperature: settings.temperature, topK: settings.top_k,
        topP: settings.top_p, seed: settings.seed ?? Math.floor(Math.random() * 2 ** 31), stop,
        speculation: req.speculation ?? null, lora: req.lora ?? null,
        responseFormat: req.response_format ?? null, grammar: req.grammar ?? null,
      });
    }));
    done.catch((err) => channel.fail(err));
    return channel;
  }

  async create(kind, req) {
    const channel = this.generate(kind, req);
    const id = `${kind === "chat" ? "chatcmpl" : "cmpl"}-realm-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
    const created = Math.floor(Date.now() / 1000);
    const model = this.model?.id ?? "unloaded";
    const drafts = (finish) => (finish.draftedTokens === null ? {} : {
      drafted_tokens: finish.draftedTokens, accepted_tokens: finish.acceptedTokens,
      completion_tokens_details: { accepted_prediction_tokens: finish.acceptedTokens,
        rejected_prediction_tokens: finish.draftedTokens - finish.acceptedTokens },
    });
    const usage = (finish) => ({
      prompt_tokens: finish.promptTokens ?? 0, completion_tokens: finish.tokens,
      total_tokens: (finish.promptTokens ?? 0) + finish.tokens,
      prompt_tokens_details: { cached_tokens: finish.cachedTokens ?? 0 },
      ...drafts(finish),
    });
    const object = kind === "chat" ? "chat.completion" : "text_completion";
    if (!req.stream) {
      let text = "";
      let finish = null;
      for await (const item of channel) {
        if (item.finish) finish = item.finish;
        else text += item.text;
      }
      const choice = kind === "chat" ? { index: 0, message: { role: "assistant", content: text } } : { index: 0, text };
      return { id, object, created, model, choices: [{ ...choice, finish_reason: finish.finishReason, logprobs: null }],
        usage: usage(finish) };
    }
    const includeUsage = Boolean(req.stream_options?.include_usage);
    const chunk = (choices, extra = {}) => ({ id, object: kind === "chat" ? "chat.completion.chunk" : "text_completion",
      created, model, choices, ...extra });
    const piece = (text, finishReason = null) => (kind === "chat"
      ? { index: 0, delta: finishReason ? {} : { content: text }, finish_reason: finishReason, logprobs: null }
      : { index: 0, text, finish_reason: finishReason, logprobs: null });
    return (async function* stream() {
      if (kind === "chat") yield chunk([{ index: 0, delta: { role: "assistant", content: "" }, finish_reason: null, logprobs: null }]);
      for await (const item of channel) {
        if (item.finish) {
          yield chunk([piece("", item.finish.finishReason)]);
          if (includeUsage) yield chunk([], { usage: usage(item.finish) });
        } else if (item.text) {
          yield chunk([piece(item.text)]);
        }
      }
    })();
  }

  abort() {
    if (this.running !== null) this.worker.postMessage({ type: "stop" });
  }

  async unload() {
    if (this.dead) return;
    if (this.running !== null) this.abort();
    await this.request((id) => new Promise((resolve) => {
      this.handlers.set(id, () => {
        this.handlers.delete(id);
        resolve();
      });
      this.worker.postMessage({ type: "unload", id });
    }));
    this.model = null;
    this.kill(new RealmEngineError("unloaded", "this engine was unloaded: create a new one"));
  }

  stats() {
    return { model: this.model, ...this.loadInfo, last: this.last };
  }

  // Asked of the worker at once (it answers "stats" even while a generation runs).
  memory() {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.handlers.set(id, (msg) => {
        this.handlers.delete(id);
        if (msg.type !== "stats") {
          reject(new RealmEngineError(msg.code, msg.message));
          return;
        }
        const { wasmHeapBytes, gpuBuffers, gpuBytes, kvTokens } = msg;
        resolve({ wasmHeapBytes, gpuBuffers, gpuBytes, kvTokens });
      });
      this.worker.postMessage({ type: "stats", id });
    });
  }

  runtimeStatsText() {
    const last = this.last;
    if (!last) return "no generation yet";
    const rate = last.tokensPerSecond === null ? "n/a" : `${last.tokensPerSecond.toFixed(1)} tok/s`;
    const drafts = last.draftedTokens === null ? "" : `, ${last.draftedTokens} drafted, ${last.acceptedTokens} accepted`;
    return `time to first token ${Math.round(last.ttftMs ?? 0)} ms (prompt ${last.promptTokens} tokens, `
      + `${last.cachedTokens} from the KV cache), decode ${rate}, ${last.completionTokens} tokens${drafts}`;
  }
}

/** A ready engine (Pyodide booted in its worker) with `options.model` loaded when given. */
export async function createEngine(options = {}) {
  const inner = new RealmEngine(options);
  await inner.start();
  const engine = {
    chat: { completions: { create: (req) => inner.create("chat", req) } },
    completions: { create: (req) => inner.create("completion", req) },
    load: (url, opts) => inner.load(url, opts),
    loadAdapter: (url, opts) => inner.loadAdapter(url, opts),
    unloadAdapter: (id) => inner.unloadAdapter(id),
    abort: () => inner.abort(),
    unload: () => inner.unload(),
    stats: () => inner.stats(),
    memory: () => inner.memory(),
    runtimeStatsText: () => inner.runtimeStatsText(),
    get model() { return inner.model; },
    get adapters() { return inner.adapters; },
    get runtime() { return inner.runtime; },
  };
  if (options.model) await inner.load(options.model);
  return engine;
}
