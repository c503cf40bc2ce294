// Realm worker: boots Pyodide, runs the Python runtime, downloads models, streams tokens.
// The page (app.js) and the engine module (realm-engine.mjs) only send requests and render; every
// slow thing happens here, off the UI thread.
//
// Protocol. Every message is a plain object with a `type`. Requests may carry an `id`, echoed on
// every event they cause. One load or generation runs at a time (another one gets a "busy" error).
//
// page -> worker
//   {type: "init", pyodideBaseUrl, bundleUrl, hostUrl, pythonPackages}
//        boot Pyodide from pyodideBaseUrl, load numpy and pythonPackages (jinja2 for the chat
//        templates: wheel file names relative to pyodideBaseUrl, or package names Pyodide's own
//        distribution knows), unpack the runtime zip (bundleUrl) and import the Python host
//        (hostUrl, realm_web_host.py). Sent once, first.
//   {type: "load", id, url, backend}
//        download a model (from the Cache API when it holds `url` and a HEAD request finds the
//        server's file unchanged, else the network, storing it there on the way) and stream it,
//        chunk by chunk, into the Python model sink. A damaged cached copy is downloaded again.
//        A split model (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf and its other shards
//        beside it) is loaded from its first shard's url: the other shards follow it, each cached.
//        backend: "auto" (WebGPU unless the adapter is a CPU fallback) | "webgpu" | "numpy"
//   {type: "generate", id, prompt | messages, maxTokens, temperature, topK, topP, seed, stop, speculation, lora,
//    responseFormat, grammar}
//        prompt: text to complete as it is; messages: [{role: "system" | "user" | "assistant",
//        content}], rendered with the model's chat template in Python (a base model's is the plain
//        one). A chat's next turn sends the whole conversation again: the KV cache still holds the
//        previous turn, so only the new message is read (done.cachedTokens says how much was reused).
//        stop: strings that end the generation (cut from the text, in Python: realm_wasm/scheduler.py)
//        speculation: null, or {method: "lookup", max_draft, ngram} as the server's API takes it:
//        drafted tokens verified several a step, the same tokens (done.draftedTokens/acceptedTokens)
//        lora: null, or [{id, scale}] as the server's API takes it: loaded adapters to apply
//   {type: "loadAdapter", id, url, name}
//        download a LoRA adapter (llama.cpp's GGUF adapter format) as a model is downloaded (its own
//        Cache API store, progress events), checked against the loaded model from its header on,
//        and hold it under `name` (the id a generation's `lora` names). A new model has none.
//   {type: "unloadAdapter", id, name}
//   {type: "stop"}               stop the running load or generation (it ends with its usual event)
//   {type: "unload", id}         free the loaded model (its GPU buffers, its KV cache)
//   {type: "stats", id}          what is loaded now, and the memory it holds
//   {type: "clearCache"}         delete every cached model file
//
// worker -> page
//   {type: "status", text}                                  boot progress, for display
//   {type: "ready", versions: {realm, python, numpy, pyodide}, timings: {pyodideMs, packagesMs,
//        runtimeMs, totalMs}, gpu: {available, reason} | {available, vendor, architecture, device,
//        description, isFallbackAdapter, features: [...], limits: {...}}, errorTitles: {code: title}}
//   {type: "progress", id, loaded, total, percent, fromCache, file, files}   total/percent null when
//        unknown; loaded/total count every file of a split model, file/files say which one streams
//   {type: "loaded", id, model: {architecture, name, tensorCount, tensorTypes, bytes, backend,
//        backendNote, nCtx, chatTemplate, ...}, fromCache, ms, wasmHeapBytes}
//        backend: "webgpu" | "numpy", the executor that runs it; backendNote says why;
//        chatTemplate: "gguf" (an instruct model's own template) | "plain" (a base model);
//        wasmHeapBytes: the size of Pyodide's wasm memory once the model is ready
//   {type: "token", id, index, text, tokenId, ttftMs, tokensPerSecond}
//        ttftMs: from the request to the first token; tokensPerSecond: decode rate, the tokens
//        after the first over the time since the first (null until there are two)
//   {type: "cancelled", id}                                  a load ended by "stop"
//   {type: "done", id, reason: "finished" | "stopped", finishReason: "stop" | "length" | "abort",
//        tokens, promptTokens, cachedTokens, draftedTokens, acceptedTokens, ttftMs, tokensPerSecond, totalMs}
//        finishReason: end of text or a stop sequence | max tokens | "stop" was sent (OpenAI's
//        words, and WebLLM's "abort"); cachedTokens: prompt tokens whose KV entries were reused
//        (null when stopped); draftedTokens/acceptedTokens: with speculation, tokens drafted and
//        accepted (null without it, or when stopped)
//   {type: "unloaded", id}
//   {type: "adapterLoaded", id, adapter: {id, rank, alpha, tensors, bytes}, adapters: [...], fromCache, ms}
//   {type: "adapterUnloaded", id, name, adapters: [...]}      adapters: every loaded one, in load order
//   {type: "stats", id, model: {...as in "loaded"} | null, kvTokens, wasmHeapBytes, gpuBuffers, gpuBytes}
//        gpuBuffers, gpuBytes: the GPU buffers the model's device allocated (WebGPU has no memory
//        query: the device counts its own, realm_wasm/gpu/browser.py), 0 on numpy
//   {type: "cache", available, entries: [{url, bytes, files}], usage, quota}   after init, load, clearCache
//        a split model is one entry: its first shard's url, `files` the shards cached
//   {type: "warning", code, message}                             something degraded, work goes on
//        code: "no-webgpu" (models run on the CPU) | "cache" | "device-lost": the model's GPU device
//        was lost (a driver reset, the GPU process gone): the worker makes a new one and loads the
//        model and its adapters again by itself (from the cache), with "progress" and "loaded"
//        events without an id, then a second "device-lost" warning saying so (recovered: false,
//        then true, with `adapters` as "adapterLoaded" lists them); requests sent meanwhile wait
//        for it. The
//        generation that was running, if any, ends with an error "device-lost". If a reload fails,
//        its "error" has no id (an adapter that does not load again is left out).
//   {type: "error", id, code, message, fatal}
//        code: a RealmError code (realm_wasm/errors.py: "bad-model", "bad-adapter", "no-adapter",
//              "adapter-conflict", "bad-request", "context-overflow",
//              "no-webgpu", "unsupported-on-gpu", "gpu", "out-of-memory", "device-lost", "no-model", ...),
//              or the worker's own: "network" | "busy" | "boot" | "runtime" | "crashed".
//        fatal: true when this worker cannot go on (Pyodide died or never booted): the page
//        should start a new worker.

const MODEL_CACHE = "realm-models-v1";
// adapters are cached as models are, in a store of their own: the page's cache report lists models
const ADAPTER_CACHE = "realm-adapters-v1";
const PROGRESS_EVERY_MS = 100;

let pyodide = null;
let host = null; // the Python WorkerHost (PyProxy)
let job = null; // {kind, id, stopped, abort}: the one load or generation running now
let lastModel = null; // {url, backend} of the loaded model: what a lost device reloads
let recovery = null; // a Promise while a lost device is replaced and the model loaded again
const adapterUrls = new Map(); // name -> url of the model's loaded adapters: what a lost device reloads

// Python exception class name -> error code the page understands, from Python (HOST.error_codes():
// every RealmError subclass and its code), filled at init.
let pythonErrors = {};

const post = (msg) => self.postMessage(msg);

// Turn anything thrown (Python exception, JS error, wasm trap) into {code, message, fatal}.
function describeError(err, fallbackCode) {
  if (pyodide && err instanceof pyodide.ffi.PythonError) {
    // the traceback ends with "<module.>Type: message", and the message may span several lines
    const text = String(err.message).trim();
    const at = text.search(new RegExp(`^([\\w.]+\\.)?${err.type}: `, "m"));
    const message = at < 0 ? text.split("\n").pop() : text.slice(text.indexOf(": ", at) + 2);
    return { code: pythonErrors[err.type] || fallbackCode, message, fatal: false };
  }
  const text = String((err && err.message) || err);
  if (err instanceof RangeError && /allocat|memory/i.test(text)) {
    return { code: "out-of-memory", message: `the browser ran out of memory: ${text}`, fatal: false };
  }
  // A wasm trap or an abort inside Pyodide leaves the interpreter unusable.
  if (err instanceof WebAssembly.RuntimeError || /Pyodide (has suffered|already fatally)/.test(text)) {
    return { code: "crashed", message: `the Python runtime crashed: ${text}`, fatal: true };
  }
  return { code: fallbackCode, message: text, fatal: false };
}

function postError(id, err, fallbackCode) {
  post({ type: "error", id, ...describeError(err, fallbackCode) });
}

// A macrotask turn without setTimeout's 4 ms clamping: lets "stop" messages in between tokens.
function yieldToEvents() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function toPlain(proxy) {
  const value = proxy.toJs({ dict_converter: Object.fromEntries });
  proxy.destroy();
  return value;
}

// a split model's shard after the first (gguf-split's names): NAME-0000i-of-0000N.gguf, i > 1
const LATER_SHARD = /-(?!00001-)\d{5}-of-(\d{5}\.gguf)$/;

async function cacheReport() {
  if (!self.caches) { // only secure contexts (https, localhost) have the Cache API
    post({ type: "cache", available: false, entries: [], usage: null, quota: null });
    return;
  }
  const entries = new Map(); // url -> entry; a split model's shards count as one model, its first
  const cache = await caches.open(MODEL_CACHE);
  for (const request of await cache.keys()) {
    const response = await cache.match(request);
    const bytes = Number(response.headers.get("content-length")) || null;
    const url = request.url.replace(LATER_SHARD, "-00001-of-$1");
    const entry = entries.get(url) || { url, bytes: 0, files: 0 };
    entries.set(url, { url, bytes: entry.bytes === null || bytes === null ? null : entry.bytes + bytes, files: entry.files + 1 });
  }
  const { usage = null, quota = null } = navigator.storage ? await navigator.storage.estimate() : {};
  post({ type: "cache", available: true, entries: [...entries.values()], usage, quota });
}

async function fetchOk(url, what) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${what}: HTTP ${response.status} for ${url}`);
  return response;
}

async function init({ pyodideBaseUrl, bundleUrl, hostUrl, pythonPackages = ["jinja2"] }) {
  const t0 = performance.now();
  const base = new URL(pyodideBaseUrl.endsWith("/") ? pyodideBaseUrl : pyodideBaseUrl + "/", self.location.href);
  post({ type: "status", text: `booting Pyodide from ${base.href}` });
  const { loadPyodide } = await import(new URL("pyodide.mjs", base).href);
  pyodide = await loadPyodide({ indexURL: base.href });
  self.pyodide = pyodide; // reachable from devtools (and the e2e tests) for inspection
  const t1 = performance.now();

  post({ type: "status", text: "loading numpy and jinja2" });
  // a wheel's file name is a URL next to Pyodide's own files; anything else, a package of its lock
  const packages = pythonPackages.map((p) => (p.endsWith(".whl") ? new URL(p, base).href : p));
  await pyodide.loadPackage(["numpy", ...packages], { messageCallback: () => {} });
  pyodide.runPython("import numpy, jinja2"); // counted here, not in the runtime's time
  const t2 = performance.now();

  post({ type: "status", text: "loading the Realm runtime" });
  const [bundle, hostSource] = await Promise.all([
    fetchOk(bundleUrl, "runtime bundle").then((r) => r.arrayBuffer()),
    fetchOk(hostUrl, "worker host").then((r) => r.text()),
  ]);
  const dir = "/realm";
  pyodide.FS.mkdirTree(dir);
  pyodide.unpackArchive(bundle, "zip", { extractDir: dir });
  pyodide.FS.writeFile(`${dir}/realm_web_host.py`, hostSource);
  pyodide.runPython(`import sys\nif ${JSON.stringify(dir)} not in sys.path: sys.path.insert(0, ${JSON.stringify(dir)})`);
  host = pyodide.pyimport("realm_web_host").HOST;
  host.watch_device_loss((reason) => { recovery = recovery || recoverDevice(String(reason)); });
  const versions = { ...toPlain(host.versions()), pyodide: pyodide.version };
  pythonErrors = toPlain(host.error_codes());
  const errorTitles = toPlain(host.error_titles());
  const t3 = performance.now();

  const gpu = toPlain(await host.gpu()); // the one GPU probe, in Python (realm_wasm/gpu/browser.py)
  post({
    type: "ready",
    versions,
    timings: { pyodideMs: t1 - t0, packagesMs: t2 - t1, runtimeMs: t3 - t2, totalMs: t3 - t0 },
    gpu,
    errorTitles,
  });
  if (!gpu.available) {
    post({ type: "warning", code: "no-webgpu",
      message: `WebGPU is not available (${gpu.reason}): models will run on the CPU (numpy), slowly.` });
  }
  await cacheReport();
}

// A cache entry we push each chunk into once Python has taken it, so the cache write goes at the
// pace of the load (tee() would buffer without bound whenever Python is slower than the network).
function cacheWriter(cache, url, headers) {
  let controller;
  const body = new ReadableStream({ start: (c) => { controller = c; } });
  const stored = cache.put(url, new Response(body, { headers }));
  stored.catch(() => {}); // awaited later (keepInCache / forgetCached); silence "unhandled" until then
  return {
    stored,
    push: (chunk) => controller.enqueue(chunk),
    close: () => controller.close(),
    fail: (err) => controller.error(err),
  };
}

// Open a file: the cached copy when it is sound and still the server's file, else the network
// (and a writer into the cache). `useCache: false` skips the cached copy (and replaces it).
async function openDownload(url, signal, cacheName, useCache = true) {
  let cache = null;
  try {
    cache = await caches.open(cacheName);
  } catch (err) {
    post({ type: "warning", code: "cache", message: `cache unavailable, downloading: ${err.message}` });
  }
  const cached = cache && useCache && (await cache.match(url));
  const usable = cached && (await usableCached(cache, url, cached, signal));
  if (usable) return { url, response: usable, fromCache: true, writer: null };

  let response;
  try {
    // with a Cache API store, it is the one copy: not a second one in the HTTP cache (nor one read from it)
    response = await fetch(url, { signal, cache: cache ? "no-store" : "default" });
  } catch (err) {
    if (signal.aborted) throw err;
    throw Object.assign(new Error(`could not download ${url}: ${err.message}`), { code: "network" });
  }
  if (!response.ok) {
    throw Object.assign(new Error(`the server answered HTTP ${response.status} ${response.statusText} for ${url}`),
      { code: "network" });
  }
  return { url, response, fromCache: false, writer: cache && cacheWriter(cache, url, response.headers) };
}

// The cached copy of `url` as a response to read, or null when it must be downloaded again (it is
// deleted then): it is damaged, or the server's file is no longer the one it copies.
async function usableCached(cache, url, cached, signal) {
  // a Cache API body is a blob on disk: its size and first bytes are read without reading the file
  const blob = await cached.blob();
  const damage = await cacheDamage(cached, blob);
  if (damage) {
    post({ type: "warning", code: "cache", message: `the cached copy of ${url} was damaged (${damage}): downloading it again` });
  }
  if (damage || (await serverFileChanged(url, cached, signal))) {
    await cache.delete(url);
    return null;
  }
  return new Response(blob, { headers: cached.headers });
}

const GGUF_MAGIC = "GGUF"; // the first 4 bytes of every model and adapter file
// What is wrong with a cached body, or null: it must have the size it was stored with and be a GGUF file.
async function cacheDamage(cached, blob) {
  const stored = fileSize(cached);
  if (stored !== null && blob.size !== stored) return `${blob.size} bytes where ${stored} were stored`;
  const magic = new TextDecoder().decode(await blob.slice(0, GGUF_MAGIC.length).arrayBuffer());
  return magic === GGUF_MAGIC ? null : "it does not start like a GGUF file";
}

// A file is known by its ETag (else its Last-Modified date, the header a cross-origin server always
// lets a page read) and its size, as its response headers give them.
function fileIdentity(response) {
  return { etag: response.headers.get("etag"), modified: response.headers.get("last-modified"), size: fileSize(response) };
}

function sameFile(a, b) {
  if (a.size !== b.size) return false;
  return a.etag && b.etag ? a.etag === b.etag : Boolean(a.modified) && a.modified === b.modified;
}

// Servers (some static hosts) that refuse HEAD: the cached copy is kept, as it is offline.
const HEAD_UNSUPPORTED = new Set([405, 501]);

// Whether the server's file at `url` differs from the cached copy, asked with a HEAD request (the
// browser's own HTTP cache bypassed). No answer (offline) keeps the copy; a missing file drops it.
async function serverFileChanged(url, cached, signal) {
  let head;
  try {
    head = await fetch(url, { method: "HEAD", cache: "no-store", signal });
  } catch (err) {
    if (signal.aborted) throw err;
    return false;
  }
  if (!head.ok) return !HEAD_UNSUPPORTED.has(head.status);
  return !sameFile(fileIdentity(cached), fileIdentity(head));
}

// The file's size, when the response says it: a compressed body's length is not the file's.
function fileSize(response) {
  const encoding = response.headers.get("content-encoding");
  if (encoding && encoding !== "identity") return null;
  return Number(response.headers.get("content-length")) || null;
}

// Stream `url` (from `cacheName`, else the network, cached on the way) into a Python sink
// (realm_web_host.py: a model's or an adapter's), posting progress; returns what the sink's end()
// gave (a PyProxy), or null when it failed or was stopped (the error or "cancelled" is posted).
// A split model is its first shard's URL: once that header is read the sink names the other shards,
// which stream in after it, each cached on its own. The sink's own error code (`badCode`:
// "bad-model") gets the URL in front of its message. A cached copy the sink rejects is deleted and
// the load starts again with that file from the network (`refetch`): a damaged copy must not show
// as a broken model.
async function download({ id, url, cacheName, badCode, openSink, refetch = new Set() }) {
  const abort = new AbortController();
  job = { kind: "load", id, stopped: false, abort };
  const files = [url]; // every file to stream, in order
  let sizes = null; // every file's size (null where unknown), once the first header names them
  let sink = null;
  let opened = null;
  let reader = null;
  let result = null;
  let fromCache = true; // every file came from the cache
  let before = 0; // bytes of the files streamed before this one
  try {
    for (let file = 0; file < files.length; file++) {
      opened = await openDownload(files[file], abort.signal, cacheName, !refetch.has(files[file]));
      const { writer } = opened;
      fromCache = fromCache && opened.fromCache;
      const total = fileSize(opened.response);
      if (!sink) sink = await openSink();
      sink.begin(total);
      reader = opened.response.body.getReader();
      let loaded = 0;
      let lastPost = 0;
      const progress = () => {
        const known = sizes || [total];
        const whole = known.includes(null) ? null : known.reduce((a, b) => a + b, 0);
        const percent = whole ? (100 * (before + loaded)) / whole
          : total ? (100 * (file + loaded / total)) / files.length : null;
        post({ type: "progress", id, loaded: before + loaded, total: whole, percent, fromCache: opened.fromCache,
          file: file + 1, files: files.length });
      };
      progress();
      for (;;) {
        if (job.stopped) throw new Error("stopped");
        const { done, value } = await reader.read();
        if (done) break;
        await sink.feed(value);
        if (writer) writer.push(value);
        loaded += value.byteLength;
        if (file === 0 && sizes === null) {
          const more = sink.more_files();
          if (more !== undefined) {
            files.push(...toPlain(more));
            sizes = [total, ...(await shardSizes(files.slice(1), cacheName, abort.signal))];
          }
        }
        if (performance.now() - lastPost > PROGRESS_EVERY_MS) {
          lastPost = performance.now();
          progress();
        }
      }
      progress();
      sink.file_done();
      if (writer) writer.close();
      if (file === files.length - 1) result = await sink.end();
      if (writer) await keepInCache(writer.stored, files[file]);
      before += loaded;
      if (file < files.length - 1) opened = null; // this file is whole (and cached): a later failure is not its
    }
    return { result, fromCache };
  } catch (err) {
    abort.abort(); // ends the network download
    if (reader) reader.cancel().catch(() => {});
    if (sink) sink.abort();
    const failed = opened && opened.url;
    const writer = opened && opened.writer;
    if (writer) writer.fail(err);
    // A file that failed must not come from the cache next time; one stopped before it was read
    // (while it was revalidated) or while read from the cache may.
    if (failed && (!job.stopped || writer)) await forgetCached(failed, writer && writer.stored, cacheName);
    if (!job.stopped && opened && opened.fromCache) {
      const { message } = describeError(err, "runtime");
      post({ type: "warning", code: "cache", message: `the cached copy of ${failed} failed (${message}): downloading it again` });
      if (sink) sink.destroy();
      sink = null;
      return await download({ id, url, cacheName, badCode, openSink, refetch: new Set([...refetch, failed]) });
    }
    if (job.stopped) {
      post({ type: "cancelled", id });
    } else if (err.code === "network" || err.code === "bad-model") {
      post({ type: "error", id, code: err.code, message: err.message, fatal: false });
    } else {
      const described = describeError(err, "runtime");
      if (described.code === badCode) described.message = `${url}: ${described.message}`;
      post({ type: "error", id, ...described });
    }
    return null;
  } finally {
    if (sink) sink.destroy();
    job = null;
    await cacheReport().catch(() => {});
  }
}

// The sizes of a split model's other shards (null where unknown), asked of the server (HEAD) before
// they download, so that progress counts the whole model and a missing shard fails before the
// others have arrived. Without an answer (offline) a shard counts with its cached copy's size.
async function shardSizes(urls, cacheName, signal) {
  const cache = self.caches ? await caches.open(cacheName).catch(() => null) : null;
  const asked = await Promise.allSettled(urls.map(async (url, i) => {
    let head = null;
    try {
      head = await fetch(url, { method: "HEAD", cache: "no-store", signal });
    } catch (err) {
      if (signal.aborted) throw err;
    }
    if (head && head.ok) return fileSize(head);
    if (head && !HEAD_UNSUPPORTED.has(head.status)) {
      throw Object.assign(new Error(`split model: shard ${i + 2} of ${urls.length + 1} is missing ` +
        `(the server answered HTTP ${head.status} for ${url})`), { code: "bad-model" });
    }
    const cached = cache && (await cache.match(url));
    return cached ? fileSize(cached) : null;
  }));
  const failed = asked.find((a) => a.status === "rejected"); // the first missing shard, in order
  if (failed) throw failed.reason;
  return asked.map((a) => a.value);
}

// Pyodide's wasm memory (no public accessor in Pyodide 0.27)
const wasmHeapBytes = () => pyodide._module.HEAPU8.byteLength;

async function loadModel({ id, url, backend = "auto" }) {
  const started = performance.now();
  lastModel = null; // open_model unloads the one before, whether or not this one loads
  const done = await download({ id, url, cacheName: MODEL_CACHE, badCode: "bad-model",
    openSink: () => host.open_model(url, backend) });
  if (!done) return false;
  const model = toPlain(host.model_ready(done.result));
  done.result.destroy();
  lastModel = { url, backend };
  post({ type: "loaded", id, model, fromCache: done.fromCache, ms: performance.now() - started,
    wasmHeapBytes: wasmHeapBytes() });
  return true;
}

// The model's GPU device was lost (realm_web_host.py has unloaded the model): once the generation it
// broke has ended, make a new device and load the model again, as the page would on "load".
async function recoverDevice(reason) {
  const model = lastModel;
  try {
    if (!model) return;
    const lost = `The GPU device was lost (${reason})`;
    post({ type: "warning", code: "device-lost", recovered: false,
      message: `${lost}: creating a new one and loading the model again.` });
    while (job) await new Promise((resolve) => setTimeout(resolve, 10));
    const started = performance.now();
    if (await loadModel(model)) {
      const adapters = await reloadAdapters();
      post({ type: "warning", code: "device-lost", recovered: true, adapters: toPlain(host.adapters()),
        message: `${lost}: a new device was created and the model loaded again`
          + `${adapters ? `, with its adapters (${adapters}),` : ""} in ${Math.round(performance.now() - started)} ms.` });
    }
  } finally {
    recovery = null;
  }
}

// The adapters the model had before its device was lost, from the browser's cache (their downloads
// put them there); one that does not load again is left out, with the error its download posted.
async function reloadAdapters() {
  const names = [];
  for (const [name, url] of [...adapterUrls]) {
    const done = await downloadAdapter(undefined, url, name);
    if (done) {
      done.result.destroy();
      names.push(name);
    } else {
      adapterUrls.delete(name);
    }
  }
  return names.join(", ");
}

// An adapter's file into the model under `name` (checked before anything downloads: no model, a
// name taken is an error at once), through the adapters' cache.
function downloadAdapter(id, url, name) {
  return download({ id, url, cacheName: ADAPTER_CACHE, badCode: "bad-adapter", openSink: () => host.open_adapter(name) });
}

async function loadAdapter({ id, url, name }) {
  const started = performance.now();
  const done = await downloadAdapter(id, url, name);
  if (!done) return;
  const adapter = toPlain(done.result);
  adapterUrls.set(adapter.id, url);
  post({ type: "adapterLoaded", id, adapter, adapters: toPlain(host.adapters()),
    fromCache: done.fromCache, ms: performance.now() - started });
}

async function keepInCache(stored, url) {
  try {
    await stored;
  } catch (err) {
    // Usually QuotaExceededError: the model works now, it will just be downloaded again next time.
    post({ type: "warning", code: "cache", message: `could not keep ${url} in the browser cache: ${err.message}` });
  }
}

async function forgetCached(url, stored, cacheName) {
  if (stored) await stored.catch(() => {});
  try {
    const cache = await caches.open(cacheName);
    await cache.delete(url);
  } catch {
    // no cache, nothing to forget
  }
}

async function generate({
  id, prompt, messages, maxTokens, temperature, topK, topP, seed, stop = [], speculation = null, lora = null,
  responseFormat = null, grammar = null,
}) {
  job = { kind: "generate", id, stopped: false, abort: null };
  const started = performance.now();
  let tokens = 0;
  let firstAt = null;
  let finished = null; // the host's last event: why it ended, token counts, reused KV
  let generation = null;
  let step = null;
  try {
    generation = host.start_generation.callKwargs({
      prompt: prompt ?? null, messages: messages ? pyodide.toPy(messages) : null, max_tokens: maxTokens,
      temperature, top_k: topK, top_p: topP, seed, stop: pyodide.toPy(stop),
      speculation: speculation ? pyodide.toPy(speculation) : null, lora: lora ? pyodide.toPy(lora) : null,
      response_format: responseFormat ? pyodide.toPy(responseFormat) : null, grammar,
    });
    step = generation.step;
    for (;;) {
      if (job.stopped) break; // closed below: the KV slot keeps what was fed
      // one plain call per scheduler step, which may block on the GPU's read-back inside (JSPI):
      // its events, several tokens where the read-back held several decode steps
      const value = await step.callPromising();
      if (value === undefined || value === null) break;
      const now = performance.now();
      for (const event of toPlain(value)) {
        if (event.kind === "finished") {
          finished = event;
          continue;
        }
        if (event.tokenId !== null && event.tokenId !== undefined) tokens += 1;
        if (firstAt === null) firstAt = now;
        // decode speed: tokens after the first, over the time since the first
        const rate = tokens > 1 ? (tokens - 1) / ((now - firstAt) / 1000) : null;
        post({
          type: "token", id, index: tokens - 1, text: event.text, tokenId: event.tokenId ?? null,
          ttftMs: firstAt - started, tokensPerSecond: rate,
        });
      }
      await yieldToEvents();
    }
    const end = performance.now();
    post({
      type: "done", id, reason: finished ? "finished" : "stopped",
      finishReason: finished ? finished.reason : "abort",
      tokens,
      promptTokens: finished ? finished.promptTokens : null,
      cachedTokens: finished ? finished.cachedTokens : null,
      draftedTokens: finished?.draftedTokens ?? null,
      acceptedTokens: finished?.acceptedTokens ?? null,
      ttftMs: firstAt === null ? null : firstAt - started,
      tokensPerSecond: tokens > 1 ? (tokens - 1) / ((end - firstAt) / 1000) : null,
      totalMs: end - started,
    });
  } catch (err) {
    postError(id, err, "runtime");
  } finally {
    if (step) step.destroy();
    if (generation) {
      generation.close();
      generation.destroy();
    }
    job = null;
  }
}

async function clearCache() {
  await caches.delete(MODEL_CACHE);
  await caches.delete(ADAPTER_CACHE);
  await cacheReport();
}

async function handle(msg) {
  switch (msg.type) {
    case "init":
      try {
        await init(msg);
      } catch (err) {
        post({ type: "error", code: "boot", message: `could not start the runtime: ${describeError(err, "boot").message}`, fatal: true });
      }
      return;
    case "stop":
      if (job) {
        job.stopped = true;
        if (job.abort) job.abort.abort();
      }
      return;
    case "clearCache":
      try {
        await clearCache();
      } catch (err) {
        postError(msg.id, err, "runtime");
      }
      return;
  }
  if (!host) {
    post({ type: "error", id: msg.id, code: "boot", message: "the runtime has not started", fatal: false });
    return;
  }
  if (msg.type === "stats") { // answered even while a job runs
    post({ type: "stats", id: msg.id, ...toPlain(host.stats()), wasmHeapBytes: wasmHeapBytes() });
    return;
  }
  if (recovery) await recovery; // the model is being loaded again on a new device: then this request
  if (job) {
    post({ type: "error", id: msg.id, code: "busy", message: `still busy with a ${job.kind}; stop it first`, fatal: false });
  } else if (msg.type === "load") {
    adapterUrls.clear(); // a new model has none
    await loadModel(msg);
  } else if (msg.type === "generate") {
    await generate(msg);
  } else if (msg.type === "loadAdapter") {
    await loadAdapter(msg);
  } else if (msg.type === "unloadAdapter") {
    try {
      host.unload_adapter(msg.name);
      adapterUrls.delete(msg.name);
      post({ type: "adapterUnloaded", id: msg.id, name: msg.name, adapters: toPlain(host.adapters()) });
    } catch (err) {
      postError(msg.id, err, "runtime");
    }
  } else if (msg.type === "unload") {
    adapterUrls.clear();
    host.unload();
    lastModel = null;
    post({ type: "unloaded", id: msg.id });
  } else {
    post({ type: "error", id: msg.id, code: "bad-request", message: `unknown request ${msg.type}`, fatal: false });
  }
}

self.onmessage = (event) => {
  handle(event.data).catch((err) => post({ type: "error", id: event.data.id, ...describeError(err, "runtime") }));
};
