// Runs the mat-vec kernel (web/kernels/matvec.wat, built) under Node for tests/test_wasm_kernels.py,
// on a memory of its own, as realm_wasm/wasm_kernels.py runs it on Pyodide's.
//   node tests/wasm_kernels.mjs KERNEL.wasm JOB.json
// JOB.json: {type_id, rows, k, n_tok, row_bytes, weights, x, y, xq}: the raw weight bytes
// [rows * row_bytes] and x (f32 [n_tok, k]) are read from the files `weights` and `x`; y
// (f32 [n_tok, rows]) and the rounded activations are written to the files `y` and `xq`.
import { readFileSync, writeFileSync } from "node:fs";

const XQ_BLOCK = 72; // bytes per rounded 32-element block of x

const [kernelPath, jobPath] = process.argv.slice(2);
const job = JSON.parse(readFileSync(jobPath, "utf8"));
const weights = readFileSync(job.weights);
const x = readFileSync(job.x);
const blocks = job.k / 32;
const xqBytes = job.n_tok * blocks * XQ_BLOCK;
const yBytes = job.n_tok * job.rows * 4;

// the buffers one after another at odd addresses: the kernel may assume no alignment of the GGUF
// bytes (GGML blocks are 18 to 210 bytes) and, from numpy, only 4-byte alignment of x and y
let top = 1001;
const place = (n, align) => { const at = Math.ceil(top / align) * align; top = at + n; return at; };
const wAt = place(weights.length, 1), xAt = place(x.length, 4), xqAt = place(xqBytes, 4), yAt = place(yBytes, 4);
const memory = new WebAssembly.Memory({ initial: Math.ceil(top / 65536) });
const heap = new Uint8Array(memory.buffer);
heap.set(weights, wAt);
heap.set(x, xAt);

const { instance } = await WebAssembly.instantiate(readFileSync(kernelPath), { env: { memory } });
const { realm_quantize: quantize, realm_matmul: matmul } = instance.exports;
quantize(xAt, xqAt, job.n_tok * blocks);
matmul(job.type_id, wAt, job.row_bytes, xqAt, yAt, job.rows, blocks, job.n_tok);
writeFileSync(job.y, heap.subarray(yAt, yAt + yBytes));
writeFileSync(job.xq, heap.subarray(xqAt, xqAt + xqBytes));
