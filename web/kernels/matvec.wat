;; Quantized matrix products for the numpy executor inside Pyodide (realm_wasm/wasm_kernels.py loads
;; this module and says why it is hand-written). Assembled by scripts/build_bundle.py with wabt.
;;
;;   y[t, r] = sum over k of W[r, k] * x[t, k]
;;
;; W [rows, K] stays in its GGML bytes (the GGUF file as it sits in the wasm heap); x [T, K] is
;; first rounded to 8 bits per 32-element block, as llama.cpp rounds activations inside every
;; quantized matmul. The integer products are exact; only x's rounding differs from f32 math.
;;
;; Memory: the module imports Pyodide's own linear memory and owns none. Every pointer is a
;; wasm-heap address (a numpy array's data pointer, a tensor's place in the GGUF bytes); the
;; caller allocates every buffer. Addresses are unsigned: nothing here compares pointers.
;;
;; Rounded activations ("xq"), 72 bytes per 32-element block, blocks in x's order:
;;   +0   32 x i16  q = round(x / d), |q| <= 127; i16 rather than i8 so that a weight block meets
;;                  them in i32x4.dot_i16x8_s directly, without widening x again for every row
;;   +64  f32       d = max |x| / 127
;;   +68  f32       s = d * sum(q): for the offsets of Q4_1 (w = d q + m) and Q4_K (w = d sc q - dmin m)
;;
;; Every weight type has one row function $dot_<type>(w, xq, nb) -> f32, the dot product of one
;; weight row with one token's xq (nb = K / 32 blocks). They share the block arithmetic below and
;; sit in the function table at their GGML type id, so `realm_matmul` drives them all. The shared
;; helpers are small functions that V8 inlines once a row function is hot: in Chromium 156 a build
;; with every helper inlined beforehand (binaryen's wasm-opt) ran no faster.

(module
  (import "env" "memory" (memory 0))

  (type $row_dot (func (param i32 i32 i32) (result f32)))

  ;; the row functions, at their GGML type ids (ggml.h's enum ggml_type)
  (table 15 funcref)
  (elem (i32.const 3) func $dot_q4_1)
  (elem (i32.const 6) func $dot_q5_0)
  (elem (i32.const 8) func $dot_q8_0)
  (elem (i32.const 12) func $dot_q4_k)
  (elem (i32.const 14) func $dot_q6_k)

  (global $XQ_BLOCK i32 (i32.const 72))  ;; bytes of one rounded 32-element block of x

  ;; ------------------------------------------------------------------------------------------
  ;; Entry points

  ;; x [n_blocks * 32] f32 -> xq [n_blocks * 72 bytes] (the layout above)
  (func (export "realm_quantize") (param $x i32) (param $xq i32) (param $n_blocks i32)
    (local $amax v128) (local $d f32) (local $inv f32) (local $sum v128) (local $i i32)
    (local $q0 v128) (local $q1 v128)
    (block $done
      (loop $block
        (br_if $done (i32.eqz (local.get $n_blocks)))
        ;; d = max |x| / 127, as ggml's quantize_row_q8_0
        (local.set $amax (f32x4.abs (v128.load align=4 (local.get $x))))
        (local.set $i (i32.const 16))
        (loop $max
          (local.set $amax (f32x4.max (local.get $amax)
            (f32x4.abs (v128.load align=4 (i32.add (local.get $x) (local.get $i))))))
          (br_if $max (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 16))) (i32.const 128))))
        (local.set $d (f32.div (call $hmax (local.get $amax)) (f32.const 127)))
        (local.set $inv (select (f32.div (f32.const 1) (local.get $d)) (f32.const 0)
                                (f32.gt (local.get $d) (f32.const 0))))
        ;; eight values at a time: round to nearest, narrow to i16, keep their sum
        (local.set $sum (v128.const i32x4 0 0 0 0))
        (local.set $i (i32.const 0))
        (loop $round
          (local.set $q0 (call $round4 (i32.add (local.get $x) (local.get $i)) (local.get $inv)))
          (local.set $q1 (call $round4 (i32.add (local.get $x) (i32.add (local.get $i) (i32.const 16)))
                                       (local.get $inv)))
          (local.set $sum (i32x4.add (local.get $sum) (i32x4.add (local.get $q0) (local.get $q1))))
          (v128.store align=2 (i32.add (local.get $xq) (i32.shr_u (local.get $i) (i32.const 1)))
                      (i16x8.narrow_i32x4_s (local.get $q0) (local.get $q1)))
          (br_if $round (i32.ne (local.tee $i (i32.add (local.get $i) (i32.const 32))) (i32.const 128))))
        (f32.store offset=64 align=4 (local.get $xq) (local.get $d))
        (f32.store offset=68 align=4 (local.get $xq)
                   (f32.mul (local.get $d) (f32.convert_i32_s (call $hsum_i32 (local.get $sum)))))
        (local.set $x (i32.add (local.get $x) (i32.const 128)))
        (local.set $xq (i32.add (local.get $xq) (global.get $XQ_BLOCK)))
        (local.set $n_blocks (i32.sub (local.get $n_blocks) (i32.const 1)))
        (br $block))))

  ;; y[t * rows + r] = row r of W (GGML type `type_id`, `row_bytes` apart, from w) . token t of xq,
  ;; for t < n_tok and r < rows; nb = K / 32. Row-major over r so a weight row is read from
  ;; memory once and meets every token from the cache.
  (func (export "realm_matmul") (param $type_id i32) (param $w i32) (param $row_bytes i32) (param $xq i32)
                          (param $y i32) (param $rows i32) (param $nb i32) (param $n_tok i32)
    (local $r i32) (local $t i32) (local $xq_row i32) (local $y_row i32)
    (block $done
      (loop $row
        (br_if $done (i32.eq (local.get $r) (local.get $rows)))
        (local.set $t (i32.const 0))
        (local.set $xq_row (local.get $xq))
        (local.set $y_row (i32.add (local.get $y) (i32.shl (local.get $r) (i32.const 2))))
        (loop $token
          (f32.store align=4 (local.get $y_row)
            (call_indirect (type $row_dot) (local.get $w) (local.get $xq_row) (local.get $nb) (local.get $type_id)))
          (local.set $xq_row (i32.add (local.get $xq_row) (i32.mul (local.get $nb) (global.get $XQ_BLOCK))))
          (local.set $y_row (i32.add (local.get $y_row) (i32.shl (local.get $rows) (i32.const 2))))
          (br_if $token (i32.ne (local.tee $t (i32.add (local.get $t) (i32.const 1))) (local.get $n_tok))))
        (local.set $w (i32.add (local.get $w) (local.get $row_bytes)))
        (local.set $r (i32.add (local.get $r) (i32.const 1)))
        (br $row))))

  ;; ------------------------------------------------------------------------------------------
  ;; Arithmetic shared by the row functions

  ;; round(x[0..4] * inv) to the nearest integers (ties to even), as i32x4
  (func $round4 (param $x i32) (param $inv f32) (result v128)
    (i32x4.trunc_sat_f32x4_s (f32x4.nearest
      (f32x4.mul (v128.load align=4 (local.get $x)) (f32x4.splat (local.get $inv))))))

  ;; Sixteen signed 8-bit weights . the sixteen i16 of xq at x: four i32 partial sums
  (func $dot16 (param $q v128) (param $x i32) (result v128)
    (i32x4.add
      (i32x4.dot_i16x8_s (i16x8.extend_low_i8x16_s (local.get $q)) (v128.load align=2 (local.get $x)))
      (i32x4.dot_i16x8_s (i16x8.extend_high_i8x16_s (local.get $q)) (v128.load offset=16 align=2 (local.get $x)))))

  ;; A 32-element block of signed 8-bit weights (elements 0..15 in lo, 16..31 in hi) . xq block at x
  (func $dot32 (param $lo v128) (param $hi v128) (param $x i32) (result v128)
    (i32x4.add (call $dot16 (local.get $lo) (local.get $x))
               (call $dot16 (local.get $hi) (i32.add (local.get $x) (i32.const 32)))))

  ;; acc + float(partial sums) * scale: where integer sums become floats, once per block
  (func $scaled (param $acc v128) (param $isum v128) (param $scale f32) (result v128)
    (f32x4.add (local.get $acc)
               (f32x4.mul (f32x4.convert_i32x4_s (local.get $isum)) (f32x4.splat (local.get $scale)))))

  (func $x_scale (param $x i32) (result f32) (f32.load offset=64 align=4 (local.get $x)))
  (func $x_sum (param $x i32) (result f32) (f32.load offset=68 align=4 (local.get $x)))

;; The f16 at p as f32 (GGML's block scales). Its sign to bit 31 and its magnitude bits shifted
  ;; into place, then scaled by 2^112 (the exponent bias difference), give every finite f16,
  ;; subnormals included; an f16 inf/NaN would read as a large finite number, which no quantizer writes.
  (func $f16 (param $p i32) (result f32)
    (local $h i32)
    (local.set $h (i32.load16_u align=1 (local.get $p)))
    (f32.mul (f32.reinterpret_i32 (i32.or (i32.shl (i32.and (local.get $h) (i32.const 0x8000)) (i32.const 16))
                                          (i32.shl (i32.and (local.get $h) (i32.const 0x7fff)) (i32.const 13))))
             (f32.const 0x1p112)))

  (func $hsum (param $v v128) (result f32)
    (f32.add (f32.add (f32x4.extract_lane 0 (local.get $v)) (f32x4.extract_lane 1 (local.get $v)))
             (f32.add (f32x4.extract_lane 2 (local.get $v)) (f32x4.extract_lane 3 (local.get $v)))))

  (func $hmax (param $v v128) (result f32)
    (f32.max (f32.max (f32x4.extract_lane 0 (local.get $v)) (f32x4.extract_lane 1 (local.get $v)))
             (f32.max (f32x4.extract_lane 2 (local.get $v)) (f32x4.extract_lane 3 (local.get $v)))))

  (func $hsum_i32 (param $v v128) (result i32)
    (i32.add (i32.add (i32x4.extract_lane 0 (local.get $v)) (i32x4.extract_lane 1 (local.get $v)))
             (i32.add (i32x4.extract_lane 2 (local.get $v)) (i32x4.extract_lane 3 (local.get $v)))))

  (func $low_nibbles (param $q v128) (result v128) (v128.and (local.get $q) (v128.const i8x16 15 15 15 15 15 15 15 15 15 15 15 15 15 15 15 15)))
  (func $high_nibbles (param $q v128) (result v128) (i8x16.shr_u (local.get $q) (i32.const 4)))

  ;; ------------------------------------------------------------------------------------------
  ;; 32-element block types (quants.py has their layouts)

  ;; Q8_0, 34 bytes: f16 d, 32 x i8 q; w = d * q
  (func $dot_q8_0 (param $w i32) (param $x i32) (param $nb i32) (result f32)
    (local $acc v128)
    (loop $block
      (local.set $acc (call $scaled (local.get $acc)
        (call $dot32 (v128.load offset=2 align=1 (local.get $w)) (v128.load offset=18 align=1 (local.get $w))
                     (local.get $x))
        (f32.mul (call $f16 (local.get $w)) (call $x_scale (local.get $x)))))
      (local.set $w (i32.add (local.get $w) (i32.const 34)))
      (local.set $x (i32.add (local.get $x) (global.get $XQ_BLOCK)))
      (br_if $block (local.tee $nb (i32.sub (local.get $nb) (i32.const 1)))))
    (call $hsum (local.get $acc)))

  ;; Q4_1, 20 bytes: f16 d, f16 m, 16 bytes of nibbles (elements 0..15 low, 16..31 high); w = d * q + m
  (func $dot_q4_1 (param $w i32) (param $x i32) (param $nb i32) (result f32)
    (local $acc v128) (local $offsets f32) (local $qs v128)
    (loop $block
      (local.set $qs (v128.load offset=4 align=1 (local.get $w)))
      (local.set $acc (call $scaled (local.get $acc)
        (call $dot32 (call $low_nibbles (local.get $qs)) (call $high_nibbles (local.get $qs)) (local.get $x))
        (f32.mul (call $f16 (local.get $w)) (call $x_scale (local.get $x)))))
      (local.set $offsets (f32.add (local.get $offsets)
        (f32.mul (call $f16 (i32.add (local.get $w) (i32.const 2))) (call $x_sum (local.get $x)))))
      (local.set $w (i32.add (local.get $w) (i32.const 20)))
      (local.set $x (i32.add (local.get $x) (global.get $XQ_BLOCK)))
      (br_if $block (local.tee $nb (i32.sub (local.get $nb) (i32.const 1)))))
    (f32.add (call $hsum (local.get $acc)) (local.get $offsets)))

  ;; Q5_0, 22 bytes: f16 d, u32 qh (bit j: bit 4 of element j), 16 bytes of nibbles as Q4_1's;
  ;; w = d * (q - 16)
  (func $dot_q5_0 (param $w i32) (param $x i32) (param $nb i32) (result f32)
    (local $acc v128) (local $qs v128) (local $qh v128)
    (loop $block
      (local.set $qs (v128.load offset=6 align=1 (local.get $w)))
      (local.set $qh (i32x4.splat (i32.load offset=2 align=1 (local.get $w))))
      (local.set $acc (call $scaled (local.get $acc)
        (call $dot32
          (v128.or (call $low_nibbles (local.get $qs))
                   (call $minus_16_unless_bit (i8x16.swizzle (local.get $qh)
                     (v128.const i8x16 0 0 0 0 0 0 0 0 1 1 1 1 1 1 1 1))))
          (v128.or (call $high_nibbles (local.get $qs))
                   (call $minus_16_unless_bit (i8x16.swizzle (local.get $qh)
                     (v128.const i8x16 2 2 2 2 2 2 2 2 3 3 3 3 3 3 3 3))))
          (local.get $x))
        (f32.mul (call $f16 (local.get $w)) (call $x_scale (local.get $x)))))
      (local.set $w (i32.add (local.get $w) (i32.const 22)))
      (local.set $x (i32.add (local.get $x) (global.get $XQ_BLOCK)))
      (br_if $block (local.tee $nb (i32.sub (local.get $nb) (i32.const 1)))))
    (call $hsum (local.get $acc)))

  ;; Byte i of `bytes` holds bit (i mod 8) of element i's bit 4. OR-ed onto a nibble q, the result
  ;; is the signed byte q - 16 where that bit is clear (0xF0 | q) and q + 16 - 16 where it is set.
  (func $minus_16_unless_bit (param $bytes v128) (result v128)
    (v128.andnot (v128.const i8x16 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0 0xf0)
      (i8x16.eq (v128.and (local.get $bytes) (v128.const i8x16 1 2 4 8 16 32 64 128 1 2 4 8 16 32 64 128))
                (v128.const i8x16 1 2 4 8 16 32 64 128 1 2 4 8 16 32 64 128))))

  ;; ------------------------------------------------------------------------------------------
  ;; K-quants: 256-element super-blocks (8 blocks of xq each)

  ;; Q4_K, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
  ;; (per 32 bytes: block 2j in the low nibbles, 2j + 1 in the high); w = d * sc * q - dmin * m
  (func $dot_q4_k (param $w i32) (param $x i32) (param $nb i32) (result f32)
    (local $acc v128) (local $offsets f32) (local $d f32) (local $dmin f32) (local $j i32)
    (local $q0 v128) (local $q1 v128)
    (loop $super
      (local.set $d (call $f16 (local.get $w)))
      (local.set $dmin (call $f16 (i32.add (local.get $w) (i32.const 2))))
      (local.set $j (i32.const 0))
      (loop $pair  ;; blocks 2j and 2j + 1 share 32 bytes of nibbles
        (local.set $q0 (v128.load offset=16 align=1 (i32.add (local.get $w) (i32.shl (local.get $j) (i32.const 4)))))
        (local.set $q1 (v128.load offset=32 align=1 (i32.add (local.get $w) (i32.shl (local.get $j) (i32.const 4)))))
        (local.set $acc (call $scaled (local.get $acc)
          (call $dot32 (call $low_nibbles (local.get $q0)) (call $low_nibbles (local.get $q1)) (local.get $x))
          (f32.mul (f32.mul (local.get $d) (f32.convert_i32_u (call $k4_scale (local.get $w) (local.get $j))))
                   (call $x_scale (local.get $x)))))
        (local.set $offsets (f32.add (local.get $offsets)
          (f32.mul (f32.mul (local.get $dmin) (f32.convert_i32_u (call $k4_min (local.get $w) (local.get $j))))
                   (call $x_sum (local.get $x)))))
        (local.set $x (i32.add (local.get $x) (global.get $XQ_BLOCK)))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (local.set $acc (call $scaled (local.get $acc)
          (call $dot32 (call $high_nibbles (local.get $q0)) (call $high_nibbles (local.get $q1)) (local.get $x))
          (f32.mul (f32.mul (local.get $d) (f32.convert_i32_u (call $k4_scale (local.get $w) (local.get $j))))
                   (call $x_scale (local.get $x)))))
        (local.set $offsets (f32.add (local.get $offsets)
          (f32.mul (f32.mul (local.get $dmin) (f32.convert_i32_u (call $k4_min (local.get $w) (local.get $j))))
                   (call $x_sum (local.get $x)))))
        (local.set $x (i32.add (local.get $x) (global.get $XQ_BLOCK)))
        (br_if $pair (i32.ne (local.tee $j (i32.add (local.get $j) (i32.const 1))) (i32.const 8))))
      (local.set $w (i32.add (local.get $w) (i32.const 144)))
      (br_if $super (local.tee $nb (i32.sub (local.get $nb) (i32.const 8)))))
    (f32.sub (call $hsum (local.get $acc)) (local.get $offsets)))

  ;; Q4_K's 6-bit scale and min of block j (0..7) of the super-block at w, as ggml's
  ;; get_scale_min_k4: blocks 0..3 in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins);
  ;; blocks 4..7 take their low 4 bits from the nibbles of bytes 8..11 and their top 2 bits from
  ;; the spare top bits of bytes 0..7.
  (func $k4_scale (param $w i32) (param $j i32) (result i32)
    (local $p i32)
    (local.set $p (i32.add (i32.add (local.get $w) (i32.const 4)) (local.get $j)))
    (if (result i32) (i32.lt_u (local.get $j) (i32.const 4))
      (then (i32.and (i32.load8_u (local.get $p)) (i32.const 63)))
      (else (i32.or (i32.and (i32.load8_u offset=4 (local.get $p)) (i32.const 15))
                    (i32.shl (i32.shr_u (i32.load8_u offset=0 (i32.sub (local.get $p) (i32.const 4))) (i32.const 6))
                             (i32.const 4))))))

  (func $k4_min (param $w i32) (param $j i32) (result i32)
    (local $p i32)
    (local.set $p (i32.add (i32.add (local.get $w) (i32.const 4)) (local.get $j)))
    (if (result i32) (i32.lt_u (local.get $j) (i32.const 4))
      (then (i32.and (i32.load8_u offset=4 (local.get $p)) (i32.const 63)))
      (else (i32.or (i32.shr_u (i32.load8_u offset=4 (local.get $p)) (i32.const 4))
                    (i32.shl (i32.shr_u (i32.load8_u (local.get $p)) (i32.const 6)) (i32.const 4))))))

;; Q6_K, 210 bytes: 128 bytes ql (low 4 bits), 64 bytes qh (top 2 bits), 16 x i8 scales (one per
  ;; 16 elements), f16 d; w = d * sc * (q - 32). Each half (128 elements) has 64 bytes of ql and 32
  ;; of qh; its block g (0..3) takes the low (g < 2) or high nibbles of ql[32 (g mod 2) ..][0..32]
  ;; and bits 2g, 2g + 1 of qh[0..32].
  (func $dot_q6_k (param $w i32) (param $x i32) (param $nb i32) (result f32)
    (local $acc v128) (local $d f32) (local $ql i32) (local $qh_lo v128) (local $qh_hi v128) (local $half i32)
    (loop $super
      (local.set $d (call $f16 (i32.add (local.get $w) (i32.const 208))))
      (local.set $ql (local.get $w))
      (local.set $half (i32.const 0))
      (loop $halves
        ;; the half's qh, 32 bytes at w + 128 + 32 half
        (local.set $qh_lo (v128.load offset=128 align=1 (i32.add (local.get $w) (i32.shl (local.get $half) (i32.const 5)))))
        (local.set $qh_hi (v128.load offset=144 align=1 (i32.add (local.get $w) (i32.shl (local.get $half) (i32.const 5)))))
        ;; its four blocks, g a constant in each call so that the optimizer folds the shifts
        (local.set $acc (call $q6_block (local.get $acc) (local.get $ql) (local.get $qh_lo) (local.get $qh_hi)
          (i32.add (local.get $w) (i32.add (i32.const 192) (i32.shl (local.get $half) (i32.const 3)))) (local.get $x) (local.get $d) (i32.const 0)))
        (local.set $acc (call $q6_block (local.get $acc) (local.get $ql) (local.get $qh_lo) (local.get $qh_hi)
          (i32.add (local.get $w) (i32.add (i32.const 194) (i32.shl (local.get $half) (i32.const 3)))) (i32.add (local.get $x) (i32.const 72)) (local.get $d) (i32.const 1)))
        (local.set $acc (call $q6_block (local.get $acc) (local.get $ql) (local.get $qh_lo) (local.get $qh_hi)
          (i32.add (local.get $w) (i32.add (i32.const 196) (i32.shl (local.get $half) (i32.const 3)))) (i32.add (local.get $x) (i32.const 144)) (local.get $d) (i32.const 2)))
        (local.set $acc (call $q6_block (local.get $acc) (local.get $ql) (local.get $qh_lo) (local.get $qh_hi)
          (i32.add (local.get $w) (i32.add (i32.const 198) (i32.shl (local.get $half) (i32.const 3)))) (i32.add (local.get $x) (i32.const 216)) (local.get $d) (i32.const 3)))
        (local.set $x (i32.add (local.get $x) (i32.const 288)))  ;; 4 blocks of xq
        (local.set $ql (i32.add (local.get $ql) (i32.const 64)))
        (br_if $halves (i32.ne (local.tee $half (i32.add (local.get $half) (i32.const 1))) (i32.const 2))))
      (local.set $w (i32.add (local.get $w) (i32.const 210)))
      (br_if $super (local.tee $nb (i32.sub (local.get $nb) (i32.const 8)))))
    (call $hsum (local.get $acc)))

  ;; acc + block g of a Q6_K half (ql: the half's 64 bytes, qh_lo/qh_hi: its 32 bytes of qh, sc: the
  ;; block's two scales) . the xq block at x
  (func $q6_block (param $acc v128) (param $ql i32) (param $qh_lo v128) (param $qh_hi v128) (param $sc i32)
                  (param $x i32) (param $d f32) (param $g i32) (result v128)
    (local $at i32)
    (local.set $at (i32.add (local.get $ql) (i32.shl (i32.and (local.get $g) (i32.const 1)) (i32.const 5))))
    (call $scaled (local.get $acc)
      (i32x4.add
        (i32x4.mul (call $dot16 (call $q6 (v128.load align=1 (local.get $at)) (local.get $qh_lo) (local.get $g))
                                (local.get $x))
                   (i32x4.splat (i32.load8_s (local.get $sc))))
        (i32x4.mul (call $dot16 (call $q6 (v128.load offset=16 align=1 (local.get $at)) (local.get $qh_hi) (local.get $g))
                                (i32.add (local.get $x) (i32.const 32)))
                   (i32x4.splat (i32.load8_s offset=1 (local.get $sc)))))
      (f32.mul (local.get $d) (call $x_scale (local.get $x)))))

  ;; Sixteen Q6_K codes of block g, as signed bytes q - 32: the ql nibble (low for g < 2, high else)
  ;; with bits 2g, 2g + 1 of qh on top
  (func $q6 (param $ql v128) (param $qh v128) (param $g i32) (result v128)
    (i8x16.sub
      (v128.or (call $low_nibbles (i8x16.shr_u (local.get $ql) (i32.shl (i32.shr_u (local.get $g) (i32.const 1)) (i32.const 2))))
               (i8x16.shl (v128.and (i8x16.shr_u (local.get $qh) (i32.shl (local.get $g) (i32.const 1)))
                                    (v128.const i8x16 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3 3))
                          (i32.const 4)))
      (v128.const i8x16 32 32 32 32 32 32 32 32 32 32 32 32 32 32 32 32)))
)
