// Realm client for browsers and Node >= 20, no dependencies: the OpenAI-compatible HTTP API (JSON and
// server-sent events) and the WebSocket token stream with cancel.
//
//   import { RealmClient } from "./realm-client.mjs";
//   const client = new RealmClient({ baseURL: "http://127.0.0.1:8000", apiKey: "..." });
//   const { text } = await client.complete("The capital of France is", { max_tokens: 8, temperature: 0 });
//   for await (const chunk of client.stream("Once upon a time", { max_tokens: 40 })) console.log(chunk.text);
//
//   const [vector] = await client.embeddings("some text");
//   const ids = await client.tokenize("Hello"); const text = await client.detokenize(ids);
//
// Parameters use the API's own names (max_tokens, temperature, top_p, top_k, seed, stop, n,
// presence_penalty, frequency_penalty, repetition_penalty, repeat_last_n, logit_bias {id: bias});
// `logprobs: k` asks for each token's logprob and k alternatives on both endpoints (chat's
// logprobs/top_logprobs pair is written for you);
// `model` defaults to the first model the server lists. Node 20 has WebSocket only with
// --experimental-websocket; otherwise pass one in: new RealmClient({ WebSocket: (await import("ws")).default }).

export class RealmError extends Error {
  constructor(message, { status = null, type = null, param = null, code = null, retryAfter = null } = {}) {
    super(status ? `${status} ${message}` : message);
    this.name = new.target.name;
    Object.assign(this, { status, type, param, code, retryAfter });
  }
}
export class BadRequestError extends RealmError {}        // 400, 413: see `param`
export class AuthenticationError extends RealmError {}    // 401
export class PermissionDeniedError extends RealmError {}  // 403
export class NotFoundError extends RealmError {}          // 404
export class RateLimitError extends RealmError {}         // 429: see `retryAfter` (seconds)
export class ServerError extends RealmError {}            // 5xx
export class APIConnectionError extends RealmError {}     // unreachable, or the connection broke

const ERRORS = { 400: BadRequestError, 413: BadRequestError, 401: AuthenticationError,
                 403: PermissionDeniedError, 404: NotFoundError, 429: RateLimitError };

export function errorFrom(status, body, retryAfter = null) {
  const err = (body && typeof body === "object" && body.error) || { message: String(body).slice(0, 200) };
  const Cls = ERRORS[status] ?? (status >= 500 ? ServerError : RealmError);
  return new Cls(err.message, { status, type: err.type, param: err.param, code: err.code,
                                retryAfter: retryAfter == null ? null : Number(retryAfter) });
}

function body(model, input, params, stream) {
  const out = { model, ...input };
  for (const [key, value] of Object.entries(params)) if (value != null) out[key] = value;
  if (input.messages && out.logprobs != null) Object.assign(out, { logprobs: true, top_logprobs: out.logprobs });
  if (stream) Object.assign(out, { stream: true, stream_options: { include_usage: true } });
  return out;
}

// One choice of a completion or chat response/chunk -> its text.
const choiceText = (choice) => choice.message?.content ?? choice.delta?.content ?? choice.text ?? "";

// A chat answer's tool calls -> [{ id, name, arguments }] (arguments: JSON text following the tool's schema).
const toolCalls = (message) => (message?.tool_calls ?? []).map((c) => ({ id: c.id, name: c.function.name,
                                                                         arguments: c.function.arguments }));

/** The calls a stream's chunks spell: their toolCalls pieces ({ index, id?, name?, arguments }) joined. */
export function joinToolCalls(chunks) {
  const calls = [];
  for (const piece of chunks.flatMap((chunk) => chunk.toolCalls ?? [])) {
    calls[piece.index] ??= { id: piece.id, name: piece.name, arguments: "" };
    calls[piece.index].arguments += piece.arguments;
  }
  return calls.filter(Boolean);
}

// A choice's logprobs (chat's content[...] or the legacy shape) -> [{ token, logprob, top: [[token, logprob]] }].
function parseLogprobs(logprobs) {
  if (!logprobs) return null;
  if (logprobs.content) {
    return logprobs.content.map((e) => ({ token: e.token, logprob: e.logprob,
                                          top: e.top_logprobs.map((t) => [t.token, t.logprob]) }));
  }
  return logprobs.tokens.map((token, i) => ({ token, logprob: logprobs.token_logprobs[i],
                                              top: Object.entries(logprobs.top_logprobs[i]) }));
}

// A queue whose reader awaits: WebSocket messages wait here until their generation reads them.
class Channel {
  #items = [];
  #waiters = [];
  push(item) {
    const waiter = this.#waiters.shift();
    if (waiter) waiter(item); else this.#items.push(item);
  }
  next() {
    return this.#items.length ? Promise.resolve(this.#items.shift()) : new Promise((r) => this.#waiters.push(r));
  }
}

export class RealmClient {
  #fetch; #WebSocket; #model = null;

  constructor({ baseURL = globalThis.location?.origin ?? "http://127.0.0.1:8000", apiKey = null,
                fetch = globalThis.fetch, WebSocket = globalThis.WebSocket } = {}) {
    this.baseURL = baseURL.replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.#fetch = fetch;
    this.#WebSocket = WebSocket;
  }

  async #send(method, path, payload, signal) {
    const headers = { "Content-Type": "application/json" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    let response;
    try {
      response = await this.#fetch(this.baseURL + path, {
        method, headers, signal, body: payload === undefined ? undefined : JSON.stringify(payload) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new APIConnectionError(`${method} ${path}: ${e.message}`);
    }
    if (!response.ok) {
      const text = await response.text();
      let parsed = text;
      try { parsed = JSON.parse(text); } catch { /* not JSON: keep the text */ }
      throw errorFrom(response.status, parsed, response.headers.get("retry-after"));
    }
    return response;
  }

  async #json(method, path, payload) {
    return (await this.#send(method, path, payload)).json();
  }

  health() { return this.#json("GET", "/health"); }

  async models() { return (await this.#json("GET", "/v1/models")).data; }

  async defaultModel() {
    if (this.#model === null) {
      const models = await this.models();
      if (!models.length) throw new RealmError("the server lists no model this key may use");
      this.#model = models[0].id;
    }
    return this.#model;
  }

  async #complete(path, input, { model, ...params }) {
    const result = await this.#json("POST", path, body(model ?? await this.defaultModel(), input, params, false));
    const choices = result.choices.map((c) => ({ index: c.index, text: choiceText(c), finishReason: c.finish_reason,
                                                 logprobs: parseLogprobs(c.logprobs), toolCalls: toolCalls(c.message) }));
    const [first] = choices;
    return { id: result.id, model: result.model, text: first.text, finishReason: first.finishReason,
             logprobs: first.logprobs, toolCalls: first.toolCalls, choices, usage: result.usage };
  }

  /** Embeddings of a text or an array of texts: resolves to one array of numbers per text. */
  async embeddings(input, { model } = {}) {
    const result = await this.#json("POST", "/v1/embeddings", { model: model ?? await this.defaultModel(), input });
    return result.data.sort((a, b) => a.index - b.index).map((item) => item.embedding);
  }

  /** Token ids of a text (add_special: with BOS, as a prompt). */
  async tokenize(content, { model, add_special = false } = {}) {
    const payload = { model: model ?? await this.defaultModel(), content, add_special };
    return (await this.#json("POST", "/tokenize", payload)).tokens;
  }

  async detokenize(tokens, { model } = {}) {
    return (await this.#json("POST", "/detokenize", { model: model ?? await this.defaultModel(), tokens })).content;
  }

  /** Continue a prompt: resolves to { text, finishReason, usage, id, model, logprobs, choices } (choices: n of
   *  { index, text, finishReason, logprobs, toolCalls }; the top level repeats the first). */
  complete(prompt, params = {}) { return this.#complete("/v1/completions", { prompt }, params); }

  /** Answer chat messages ([{ role, content }]): resolves as complete does; with `tools`, toolCalls holds the
   *  answer's calls [{ id, name, arguments }] and finishReason is "tool_calls". */
  chat(messages, params = {}) { return this.#complete("/v1/chat/completions", { messages }, params); }

  /** Async iterable of { text, index, logprobs?, toolCalls? } chunks (index: the choice; toolCalls: pieces of
   *  calls, see joinToolCalls); the last has finishReason and usage. `signal` aborts it. */
  stream(prompt, params = {}) { return this.#stream("/v1/completions", { prompt }, params); }

  chatStream(messages, params = {}) { return this.#stream("/v1/chat/completions", { messages }, params); }

  async *#stream(path, input, { model, signal, ...params }) {
    const payload = body(model ?? await this.defaultModel(), input, params, true);
    const response = await this.#send("POST", path, payload, signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", data = [], last = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line.startsWith("data:")) { data.push(line.slice(5).replace(/^ /, "")); continue; }
          if (line !== "" || !data.length) continue;
          const event = data.join("\n");
          data = [];
          if (event === "[DONE]") {
            if (last) yield last;
            return;
          }
          const parsed = JSON.parse(event);
          if (parsed.error) throw errorFrom(500, parsed);
          if (parsed.usage && last) last.usage = parsed.usage;
          const choice = parsed.choices?.[0];
          if (!choice) continue;
          const text = choiceText(choice), index = choice.index ?? 0, logprobs = parseLogprobs(choice.logprobs);
          const calls = (choice.delta?.tool_calls ?? []).map((d) => ({
            index: d.index, id: d.id, name: d.function.name, arguments: d.function.arguments ?? "" }));
          // the finishing chunk waits for the usage event that follows it (with n > 1, earlier choices' go out)
          if (choice.finish_reason) {
            if (last) yield last;
            last = { text, index, finishReason: choice.finish_reason, usage: null };
          } else if (text || logprobs || calls.length) {
            yield { text, index, ...(logprobs && { logprobs }), ...(calls.length && { toolCalls: calls }) };
          }
        }
      }
      throw new APIConnectionError("the stream ended before [DONE]");
    } finally {
      reader.cancel().catch(() => {}); // leaving early closes the response: the server cancels
    }
  }

  /** Open a WebSocket session: resolves to a RealmSocket once the server says it is ready. */
  async connect() {
    if (!this.#WebSocket) {
      throw new RealmError("no WebSocket here: on Node 20 run with --experimental-websocket or pass { WebSocket }");
    }
    const url = `${this.baseURL.replace(/^http/, "ws")}/ws`;
    const socket = new RealmSocket(new this.#WebSocket(url));
    await socket.opened;
    if (this.apiKey) socket.send({ type: "auth", api_key: this.apiKey }); // browsers cannot send headers
    await socket.ready;
    return socket;
  }
}

export class RealmSocket {
  #ws; #channels = new Map(); #control = new Channel(); #next = 0;

  constructor(ws) {
    this.#ws = ws;
    this.models = [];
    this.opened = new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new APIConnectionError(`cannot open ${ws.url}`));
    });
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      // a generation the caller stopped reading has no channel any more: its messages are dropped
      if (message.id == null) this.#control.push(message);
      else this.#channels.get(message.id)?.push(message);
    };
    ws.onclose = (event) => {
      const closed = { type: "closed", reason: event.reason || `code ${event.code}` };
      for (const channel of [this.#control, ...this.#channels.values()]) channel.push(closed);
    };
    this.ready = this.#control.next().then((message) => {
      if (message.type !== "ready") throw socketError(message);
      this.models = message.models;
    });
  }

  send(message) { this.#ws.send(JSON.stringify(message)); }

  /** Start a generation ({ prompt } or { messages }, plus parameters): an async iterable with cancel(). */
  generate({ model, ...params }) {
    const id = `g${++this.#next}`;
    const channel = new Channel();
    this.#channels.set(id, channel);
    this.send(body(model ?? this.models[0], { type: "generate", id }, params, false));
    return new Generation(this, id, channel, () => this.#channels.delete(id));
  }

  close() { this.#ws.close(); }
}

function socketError(message) {
  if (message.type === "closed") return new APIConnectionError(`WebSocket closed: ${message.reason}`);
  return errorFrom(message.status ?? 500, message, message.retry_after ?? null);
}

export class Generation {
  #socket; #channel; #forget;

  constructor(socket, id, channel, forget) {
    this.#socket = socket;
    this.id = id;
    this.#channel = channel;
    this.#forget = forget;
    this.finishReason = null;
    this.usage = null;
  }

  /** Ask the server to stop; the iteration then ends with finishReason "cancelled". */
  cancel() { this.#socket.send({ type: "cancel", id: this.id }); }

  async *[Symbol.asyncIterator]() {
    try {
      for (;;) {
        const message = await this.#channel.next();
        if (message.type === "token") { yield { text: message.text }; continue; }
        if (message.type !== "done") throw socketError(message);
        this.finishReason = message.finish_reason;
        this.usage = message.usage;
        yield { text: "", finishReason: this.finishReason, usage: this.usage };
        return;
      }
    } finally {
      this.#forget();
    }
  }
}
