// Runs web/kernels/matvec.wasm in Node for tests/test_wasm_kernels.py, on a memory of its own.
//   node tests/wasm_kernels.mjs KERNEL.wasm JOB.json
// JOB.json: {type_id, rows, k, n_tok, row_bytes, weights, x, y, xq, repeat}: file paths for the raw
// weight bytes [rows * row_bytes], x (f32 [n_tok, k]), and where to write y (f32 [n_tok, rows]) and
// the rounded activations; `repeat` times the matmul (printed as JSON: {ms_per_matmul}).
import { readFileSync, writeFileSync } from "node:fs";

const [wasmPath, jobPath] = process.argv.slice(2);
const job = JSON.parse(readFileSync(jobPath, "utf8"));
const weights = readFileSync(job.weights);
const x = readFileSync(job.x);
const nb = job.k / 32;
const xqBytes = job.n_tok * nb * 72;
const yBytes = job.n_tok * job.rows * 4;

// one region after another, 64-byte aligned, from an arbitrary start (the kernel must not care)
let top = 1000;
const place = (n) => { const at = Math.ceil(top / 64) * 64 + 4; top = at + n; return at; };
const wAt = place(weights.length), xAt = place(x.length), xqAt = place(xqBytes), yAt = place(yBytes);
const memory = new WebAssembly.Memory({ initial: Math.ceil(top / 65536) + 1 });
const heap = new Uint8Array(memory.buffer);
heap.set(weights, wAt);
heap.set(x, xAt);

const { instance } = await WebAssembly.instantiate(readFileSync(wasmPath), { env: { memory } });
const { realm_quantize: quantize, realm_matmul: matmul } = instance.exports;
const run = () => {
  quantize(xAt, xqAt, job.n_tok * nb);
  matmul(job.type_id, wAt, job.row_bytes, xqAt, yAt, job.rows, nb, job.n_tok);
};
run();
writeFileSync(job.y, heap.subarray(yAt, yAt + yBytes));
writeFileSync(job.xq, heap.subarray(xqAt, xqAt + xqBytes));
if (job.repeat) {
  const t0 = performance.now();
  for (let i = 0; i < job.repeat; i++) run();
  console.log(JSON.stringify({ ms_per_matmul: (performance.now() - t0) / job.repeat }));
}
