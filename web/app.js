// Realm page: renders what the worker (worker.js, protocol documented there) reports and sends it
// the user's requests. Nothing heavy runs on this thread.

const $ = (id) => document.getElementById(id);

// Prompt styles for a base model (no chat template): it answers "Question: …\nAnswer:" well, then
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
};

// The adapter features Realm's kernels choose variants by.
const KERNEL_FEATURES = ["shader-f16", "subgroups", "timestamp-query"];

// Used when the page is served without /config.json (e.g. from a plain static host).
const DEFAULT_CONFIG = { pyodideBaseUrl: "pyodide/", bundleUrl: "dist/realm_wasm.zip", defaultModel: null, models: [] };

// Which executor runs the model: ?backend=webgpu|numpy|auto in the page's URL preselects it.
const BACKENDS = ["auto", "webgpu", "numpy"];

const state = {
  worker: null,
  ready: false,
  busy: null, // "load" | "generate" while the worker works on one
  modelLoaded: false,
  nextId: 1,
  config: DEFAULT_CONFIG,
  tokenIds: [], // of the current generation, exposed as #output's data-token-ids
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

function refreshButtons() {
  const idle = state.ready && !state.busy;
  $("load").disabled = !idle;
  $("clear-cache").disabled = !idle;
  $("generate").disabled = !(idle && state.modelLoaded);
  $("stop").disabled = !state.busy;
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
  select.replaceChildren();
  for (const m of state.config.models) {
    select.append(new Option(`${m.name} (${formatBytes(m.size)})`, m.url, false, m.url === state.config.defaultModel));
  }
  select.append(new Option("Other URL…", "custom"));
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
  $("model-info").textContent = `${model.name || "unnamed"} — architecture ${model.architecture}, `
    + `${model.tensorCount} tensors (${types}), ${formatBytes(model.bytes)}, `
    + `${fromCache ? "from the browser cache" : "downloaded"} in ${ms(took)}; context ${model.nCtx} tokens`;
  $("backend-info").textContent = `${model.backendNote}; wasm heap ${formatBytes(wasmHeapBytes)}`;
  const info = $("model-info").dataset;
  info.architecture = model.architecture;
  info.tensorCount = model.tensorCount;
  info.fromCache = fromCache;
  info.backend = model.backend;
  info.wasmHeapBytes = wasmHeapBytes;
  info.loadMs = Math.round(took);
}

function forgetModel(why) {
  state.modelLoaded = false;
  $("model-info").textContent = "";
  $("backend-info").textContent = "";
  setBody("model", why);
}

function renderStats({ ttftMs, tokensPerSecond, tokens }) {
  const parts = [];
  if (ttftMs !== null && ttftMs !== undefined) parts.push(`TTFT ${ms(ttftMs)}`);
  if (tokensPerSecond !== null && tokensPerSecond !== undefined) parts.push(`${tokensPerSecond.toFixed(1)} tok/s`);
  if (tokens !== undefined) parts.push(`${tokens} tokens`);
  $("stats").textContent = parts.join(" · ");
}

function renderCache({ available, entries, usage, quota }) {
  if (!available) {
    $("cache-info").textContent = "no browser cache here (needs https or localhost)";
    return;
  }
  const total = entries.reduce((sum, e) => sum + (e.bytes || 0), 0);
  const room = quota ? `, ${formatBytes(usage)} of ${formatBytes(quota)} used` : "";
  $("cache-info").textContent = `${entries.length} cached model${entries.length === 1 ? "" : "s"} `
    + `(${formatBytes(total)}${room})`;
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
      $("runtime-timings").textContent = `Pyodide ${ms(t.pyodideMs)}, numpy ${ms(t.numpyMs)}, `
        + `runtime ${ms(t.runtimeMs)} (total ${ms(t.totalMs)})`;
      Object.assign(ERROR_TITLES, msg.errorTitles);
      renderGpu(msg.gpu);
      setBody("runtime", "ready");
      setBody("realmVersion", v.realm);
      break;
    }
    case "progress":
      renderProgress(msg);
      break;
    case "loaded":
      state.busy = null;
      state.modelLoaded = true;
      renderModel(msg);
      setBody("model", "loaded");
      break;
    case "cancelled":
      state.busy = null;
      $("progress-text").textContent = "loading stopped";
      setBody("model", "none");
      break;
    case "token":
      $("answer").append(msg.text);
      if (msg.tokenId !== null) state.tokenIds.push(msg.tokenId);
      $("output").dataset.tokenIds = state.tokenIds.join(",");
      renderStats(msg);
      break;
    case "done":
      state.busy = null;
      renderStats(msg);
      // the exact numbers, for scripts (bench/bench_browser.py)
      Object.assign($("stats").dataset, { ttftMs: msg.ttftMs ?? "", tokensPerSecond: msg.tokensPerSecond ?? "",
        tokens: msg.tokens });
      setBody("generation", msg.reason);
      break;
    case "cache":
      renderCache(msg);
      break;
    case "warning":
      showWarning(msg.code, msg.message);
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
    } else {
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
  });
}

function readNumber(id, fallback) {
  const value = Number($(id).value);
  return Number.isFinite(value) ? value : fallback;
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
  $("generate").addEventListener("click", () => {
    clearError();
    state.busy = "generate";
    const style = STYLES[$("style").value];
    const prompt = style.prompt($("prompt").value);
    $("output-prompt").textContent = prompt;
    $("answer").textContent = "";
    state.tokenIds = [];
    $("output").dataset.tokenIds = "";
    $("stats").textContent = "";
    setBody("generation", "running");
    send({
      type: "generate",
      id: state.nextId++,
      prompt,
      maxTokens: Math.round(readNumber("max-tokens", 64)),
      temperature: readNumber("temperature", 0),
      topK: Math.round(readNumber("top-k", 0)),
      topP: readNumber("top-p", 1),
      seed: Math.round(readNumber("seed", 0)),
      stop: style.stop,
    });
    refreshButtons();
  });
  $("stop").addEventListener("click", () => send({ type: "stop" }));
  $("style").addEventListener("change", () => {
    $("prompt").value = $("style").value === "qa" ? "What is the capital of France?"
      : "Question: What is the capital of France?\nAnswer:";
  });
  $("clear-cache").addEventListener("click", () => send({ type: "clearCache" }));
  $("error-dismiss").addEventListener("click", clearError);
}

async function main() {
  setBody("runtime", "starting");
  const asked = new URLSearchParams(location.search).get("backend");
  if (BACKENDS.includes(asked)) $("backend").value = asked;
  wireControls();
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
