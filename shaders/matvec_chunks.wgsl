// The mat-vec's walk along K for the K-quants (composed with matvec.wgsl), after llama.cpp's MMVQ
// idea: x quantized to int8, integer dot products, each lane owning a slice of every block.
//
// First the workgroup quantizes x[t] into workgroup memory (stage_x): int8 values with one f32
// scale per 32 elements (amax / 127, as llama.cpp's q8_1) and the sum of every 16 quantized values
// (for the blocks' mins and offsets: with the quantized x's sum, not x's, a row's errors are its
// centred weights' times x's rounding, not its offsets'), shared by all the workgroup's rows. Then lane li of a team reads chunk c = li % CHUNKS of super-block
// li / CHUNKS, of LANES / CHUNKS neighbouring blocks per step: one 16-byte load of quants per row
// (neighbouring lanes, neighbouring 16 bytes), the block's scales, and dots them with the two
// 16-element pieces of x that chunk covers (dot4I8Packed: four products an instruction); the x
// pieces are loaded once per step for all the team's rows.
// The type's snippet (chunk_<type>.wgsl) defines QK, BLOCK_BYTES, CHUNKS (chunks of a block: lanes
// per block), chunk_x(c) (first elements of chunk c's two pieces within its block) and
// chunk_dot(row, b, c, xc) (chunk c of block b of the row at byte `row`, dotted with xc).
// Consts: K, WG, LANES (a multiple of CHUNKS).

const BLOCKS: u32 = K / QK;
const PIECES: u32 = K / 16u;  // 16-element pieces of x
const BLOCKS_PER_STEP: u32 = LANES / CHUNKS;
const ONES = vec4<u32>(0x01010101u);  // sixteen int8 ones
const ROUNDING: f32 = 12582912.0;  // 1.5 * 2^23: v + ROUNDING holds round(v) in its low mantissa bits

var<workgroup> xq: array<vec4<u32>, PIECES>;  // x[t] as int8, a piece per vec4
var<workgroup> xd: array<f32, PIECES / 2u>;  // scale of each 32 elements
var<workgroup> xs: array<f32, PIECES>;  // sum of each piece, quantized

// x's side of a chunk: its two pieces' int8 values, their scales and sums.
struct XChunk {
    a: vec4<u32>,
    b: vec4<u32>,
    d: vec2<f32>,
    s: vec2<f32>,
}

// Four values times `inv`, rounded to the nearest integer (in -127..127), as packed int8.
fn int8x4(v: vec4<f32>, inv: f32) -> u32 {
    return pack4xU8(bitcast<vec4<u32>>(v * inv + ROUNDING));
}

// x[t] into xq, xd, xs: invocation lid quantizes every WG-th 32 elements. Call from uniform
// control flow.
fn stage_x(t: u32, lid: u32) {
    for (var i = lid; i < PIECES / 2u; i += WG) {
        let at = t * (K / 4u) + 8u * i;
        let v0 = x[at];
        let v1 = x[at + 1u];
        let v2 = x[at + 2u];
        let v3 = x[at + 3u];
        let v4 = x[at + 4u];
        let v5 = x[at + 5u];
        let v6 = x[at + 6u];
        let v7 = x[at + 7u];
        let m4 = max(max(max(abs(v0), abs(v1)), max(abs(v2), abs(v3))), max(max(abs(v4), abs(v5)), max(abs(v6), abs(v7))));
        let amax = max(max(m4.x, m4.y), max(m4.z, m4.w));
        let inv = select(0.0, 127.0 / amax, amax > 0.0);
        let d = amax / 127.0;
        let a = vec4<u32>(int8x4(v0, inv), int8x4(v1, inv), int8x4(v2, inv), int8x4(v3, inv));
        let b = vec4<u32>(int8x4(v4, inv), int8x4(v5, inv), int8x4(v6, inv), int8x4(v7, inv));
        xd[i] = d;
        xq[2u * i] = a;
        xq[2u * i + 1u] = b;
        xs[2u * i] = d * f32(dot16(a, ONES));
        xs[2u * i + 1u] = d * f32(dot16(b, ONES));
    }
    workgroupBarrier();
}

// Sum of the products of 16 int8 pairs, four packed per word.
fn dot16(q: vec4<u32>, v: vec4<u32>) -> i32 {
    return (dot4I8Packed(q.x, v.x) + dot4I8Packed(q.y, v.y)) + (dot4I8Packed(q.z, v.z) + dot4I8Packed(q.w, v.w));
}

// The chunks of up to four rows (only the first `count` loaded: a constant after inlining). Not an
// array: one indexed in a loop lands in local memory on NVIDIA (see matvec.wgsl).
struct RowChunks {
    r0: Chunk,
    r1: Chunk,
    r2: Chunk,
    r3: Chunk,
}

fn load_rows(rows: vec4<u32>, count: u32, b: u32, c: u32) -> RowChunks {
    let first = chunk_load(rows.x, b, c);
    var q = RowChunks(first, first, first, first);
    if count > 1u {
        q.r1 = chunk_load(rows.y, b, c);
    }
    if count > 2u {
        q.r2 = chunk_load(rows.z, b, c);
    }
    if count > 3u {
        q.r3 = chunk_load(rows.w, b, c);
    }
    return q;
}

// Chunk c of block b of the first `count` rows of `rows` (loaded in q), dotted with xc; the rest stay 0.
fn rows_chunk(q: RowChunks, rows: vec4<u32>, count: u32, b: u32, c: u32, xc: XChunk) -> vec4<f32> {
    var s = vec4<f32>(chunk_dot(q.r0, rows.x, b, c, xc), 0.0, 0.0, 0.0);
    if count > 1u {
        s.y = chunk_dot(q.r1, rows.y, b, c, xc);
    }
    if count > 2u {
        s.z = chunk_dot(q.r2, rows.z, b, c, xc);
    }
    if count > 3u {
        s.w = chunk_dot(q.r3, rows.w, b, c, xc);
    }
    return s;
}

// The partial sums of invocation `lid` over its team's rows (byte offsets in `rows`) for token t.
// Call from uniform control flow (stage_x waits for the whole workgroup).
fn walk(rows: Rows, t: u32, lid: u32) -> Sums {
    let li = lid % LANES;
    let c = li % CHUNKS;
    let b0 = li / CHUNKS;
    let first = min(b0, BLOCKS - 1u);  // lanes past the last block (short rows) load it, unused
    var next_lo = load_rows(rows.lo, LO, first, c);
    var next_hi = next_lo;
    if HI > 0u {
        next_hi = load_rows(rows.hi, HI, first, c);
    }
    stage_x(t, lid);
    var acc = Sums(vec4<f32>(), vec4<f32>());
    let pieces = chunk_x(c) / vec2<u32>(16u);  // the chunk's pieces in block 0
    for (var b = b0; b < BLOCKS; b += BLOCKS_PER_STEP) {
        let q_lo = next_lo;
        let q_hi = next_hi;
        if b + BLOCKS_PER_STEP < BLOCKS {
            next_lo = load_rows(rows.lo, LO, b + BLOCKS_PER_STEP, c);
            if HI > 0u {
                next_hi = load_rows(rows.hi, HI, b + BLOCKS_PER_STEP, c);
            }
        }
        let p = pieces + vec2<u32>(b * (QK / 16u));
        let xc = XChunk(xq[p.x], xq[p.y], vec2<f32>(xd[p.x / 2u], xd[p.y / 2u]), vec2<f32>(xs[p.x], xs[p.y]));
        acc.lo += rows_chunk(q_lo, rows.lo, LO, b, c, xc);
        if HI > 0u {
            acc.hi += rows_chunk(q_hi, rows.hi, HI, b, c, xc);
        }
    }
    return acc;
}
