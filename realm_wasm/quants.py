"""The GGML tensor types: one table row per type, with a vectorized numpy dequantizer.

A quantized tensor is a flat run of fixed-size blocks; each block holds `block_size` consecutive
elements of one row (GGML never lets a block straddle rows). Every dequantizer below maps a
uint8 array [n_blocks, type_size] to float32 [n_blocks, block_size] with whole-array numpy
operations, in the same order of float operations as ggml's reference `dequantize_row_*`, so the
results are bit-for-bit ggml's. All multi-byte fields are little-endian.

Layout vocabulary used throughout:
- `_fields` cuts a block into its struct fields (widths in bytes, in struct order).
- `_unpack(q, bits, run)` splits packed sub-byte codes. GGML packs a run of `run` bytes so that
  the run's lowest `bits` of every byte come first, then the next `bits`, and so on; e.g. Q4_0's
  16 bytes hold elements 0..15 in the low nibbles and 16..31 in the high nibbles (run 16), while a
  little-endian bit mask (Q5_0's qh) is run 1: element j is bit j.
- `_scaled(q, scale, bias)` applies one scale (and bias) per equal-sized group of a block.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import BadModel

QK_K = 256  # elements per K-quant super-block

# GGUF fields are little-endian (as is every host Realm runs on: wasm32, x86-64, arm64).
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
_U16 = np.dtype("<u2")


class UnknownQuantType(BadModel):
    """A GGML type id this table does not know."""

    def __init__(self, type_id: int) -> None:
        super().__init__(f"unknown GGML tensor type id {type_id}")
        self.type_id = type_id


@dataclass(frozen=True)
class QuantType:
    name: str  # GGML's name, e.g. "Q4_K"
    type_id: int  # GGML's enum value
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 [n, type_size] -> float32 [n, block_size]
    shader: str | None  # WGSL dequant snippet in shaders/, None where no GPU kernel reads the type


# ---------------------------------------------------------------------------------------------
# Building blocks


def _fields(blocks: np.ndarray, *widths: int) -> list[np.ndarray]:
    """Consecutive byte columns of `blocks`, one per struct field of the given widths."""
    edges = np.cumsum((0, *widths))
    return [blocks[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _f16(field: np.ndarray) -> np.ndarray:
    """A [n, 2k] byte field of k f16 values -> float32 [n, k]."""
    return field.view(_F16).astype(np.float32)


def _unpack(q: np.ndarray, bits: int, run: int) -> np.ndarray:
    """Split every byte of q [n, m] into 8 // bits codes, laid out run by run (see module doc)."""
    n, m = q.shape
    runs = q.reshape(n, m // run, run)
    if bits == 1:  # unpackbits is several times faster than shifting
        codes = np.unpackbits(runs[..., None], axis=3, bitorder="little").swapaxes(2, 3)
    else:
        mask = np.uint8((1 << bits) - 1)
        codes = np.stack([(runs >> np.uint8(shift)) & mask for shift in range(0, 8, bits)], axis=2)
    return codes.reshape(n, m * (8 // bits))


def _scaled(q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """q [n, B] integer codes -> float32 q * scale (+ bias), where scale and bias [n, G] hold one
    value per run of B // G consecutive elements."""
    n, width = q.shape
    groups = scale.shape[1]
    # the ufunc converts q chunk by chunk: no float32 copy of q besides the result
    y = np.multiply(q.reshape(n, groups, width // groups), scale[:, :, None], dtype=np.float32)
    if bias is not None:
        y += bias[:, :, None]
    return y.reshape(n, width)


def _cast(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """Plain (block size 1) types: reinterpret the bytes, convert to float32."""
    return lambda blocks: blocks.view(np.dtype(dtype)).astype(np.float32, copy=False)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32
    return (blocks.view(_U16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# 32-element blocks with one f16 scale (and maybe an f16 offset)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 16)
    return _scaled(_unpack(qs, 4, 16).view(np.int8) - 8, _f16(d))


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m, qs = _fields(blocks, 2, 2, 16)
    return _scaled(_unpack(qs, 4, 16), _f16(d), _f16(m))


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 codes 0..31: low nibbles from qs, bit 4 of element j is bit j of the u32 qh."""
    return _unpack(qs, 4, 16) | (_unpack(qh, 1, 1) << 4)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    d, qh, qs = _fields(blocks, 2, 4, 16)
    return _scaled(_five_bit(qh, qs).view(np.int8) - 16, _f16(d))


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m, qh, qs = _fields(blocks, 2, 2, 4, 16)
    return _scaled(_five_bit(qh, qs), _f16(d), _f16(m))


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 32)
    return _scaled(qs.view(np.int8), _f16(d))


def _q8_1(blocks: np.ndarray) -> np.ndarray:
    d, _sum, qs = _fields(blocks, 2, 2, 32)  # _sum = d * sum(qs), only a dot-product shortcut
    return _scaled(qs.view(np.int8), _f16(d))


# Non-linear 4-bit codebooks: IQ4's fitted levels, and MXFP4's E2M1 floats times 2 (the block
# scales carry the compensating 1/2, so products stay exact).
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_E2M1_X2 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)

# MXFP4's block scale is an E8M0 exponent byte e meaning 2^(e - 127); halved here (see above).
_E8M0_HALF = np.ldexp(np.float32(1), np.arange(256) - 128).astype(np.float32)


def _ue4m3_half(x: int) -> float:
    """NVFP4's sub-block scale: unsigned E4M3 (bias 7, bit 7 unused), halved; 0x7F (NaN) reads as 0."""
    exp, man = (x >> 3) & 0xF, x & 7
    value = math.ldexp(man, -9) if exp == 0 else math.ldexp(1 + man / 8, exp - 7)
    return 0.0 if x == 0x7F else value / 2


_UE4M3_HALF = np.array([_ue4m3_half(x) for x in range(256)], np.float32)


def _iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 16)
    return _scaled(_IQ4_LEVELS[_unpack(qs, 4, 16)], _f16(d))


def _mxfp4(blocks: np.ndarray) -> np.ndarray:
    e, qs = _fields(blocks, 1, 16)
    return _scaled(_E2M1_X2[_unpack(qs, 4, 16)], _E8M0_HALF[e])


def _nvfp4(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 4, 32)  # four 16-element sub-blocks, 8 bytes of nibbles each
    return _scaled(_E2M1_X2[_unpack(qs, 4, 8)], _UE4M3_HALF[d])


# ---------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks of 16 or 32-element groups with small integer scales


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    scales, qs, d, dmin = _fields(blocks, 16, 64, 2, 2)  # scales: low nibble scale, high nibble min
    return _scaled(_unpack(qs, 2, 32), _f16(d) * (scales & 0xF), -(_f16(dmin) * (scales >> 4)))


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    hmask, qs, packed, d = _fields(blocks, 32, 64, 12, 2)
    # 16 six-bit scales: low nibbles in bytes 0..7 (run 8), high bit pairs in bytes 8..11 (run 4)
    scales = _unpack(packed[:, :8], 4, 8) | (_unpack(packed[:, 8:], 2, 4) << 4)
    # a clear hmask bit subtracts 4 from the 2-bit code
    q = _unpack(qs, 2, 32).view(np.int8) - ((_unpack(hmask, 1, 32) ^ 1) << 2).view(np.int8)
    return _scaled(q, _f16(d) * (scales.view(np.int8) - 32))


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins. Groups 0..3 sit in the low
    6 bits of bytes 0..3 (scales) and 4..7 (mins); groups 4..7 take their low 4 bits from the
    nibbles of bytes 8..11 and their top 2 bits from the spare top bits of bytes 0..7."""
    lo_sc, lo_mn, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_mn & 63, (hi >> 4) | ((lo_mn >> 6) << 4)], axis=1)
    return scales, mins


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, packed, qs = _fields(blocks, 2, 2, 12, 128)
    scales, mins = _scale_min_k4(packed)
    return _scaled(_unpack(qs, 4, 32), _f16(d) * scales, -(_f16(dmin) * mins))


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, packed, qh, qs = _fields(blocks, 2, 2, 12, 32, 128)
    scales, mins = _scale_min_k4(packed)
    q = _unpack(qs, 4, 32) | (_unpack(qh, 1, 32) << 4)
    return _scaled(q, _f16(d) * scales, -(_f16(dmin) * mins))


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    ql, qh, scales, d = _fields(blocks, 128, 64, 16, 2)
    q = _unpack(ql, 4, 64) | (_unpack(qh, 2, 32) << 4)
    return _scaled(q.view(np.int8) - 32, _f16(d) * scales.view(np.int8))


def _q8_k(blocks: np.ndarray) -> np.ndarray:
    d, qs, _bsums = _fields(blocks, 4, 256, 32)  # _bsums: per-16 sums, only a dot-product shortcut
    return _scaled(qs.view(np.int8), d.view(_F32).astype(np.float32))


def _iq4_xs(blocks: np.ndarray) -> np.ndarray:
    d, scales_h, scales_l, qs = _fields(blocks, 2, 2, 4, 128)
    # eight 6-bit scales: low nibble from scales_l, top 2 bits from the u16 scales_h, both run 1
    scales = _unpack(scales_l, 4, 1) | (_unpack(scales_h, 2, 1) << 4)
    return _scaled(_IQ4_LEVELS[_unpack(qs, 4, 16)], _f16(d) * (scales.view(np.int8) - 32))


# ---------------------------------------------------------------------------------------------
# 1- and 2-bit types with one f16 scale: Q1_0 (weights +-d), Q2_0 (weights -d, 0, d, 2d)


def _q1_0(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 16)  # element j is bit j of qs; a set bit is +d, a clear one -d
    return _scaled(_unpack(qs, 1, 1).view(np.int8) * 2 - 1, _f16(d))


def _q2_0(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 16)  # element j is bit pair j % 4 of qs[j / 4]
    return _scaled(_unpack(qs, 2, 1).view(np.int8) - 1, _f16(d))


# ---------------------------------------------------------------------------------------------
# Ternary types: weights in {-1, 0, 1} times one f16 scale


def _trits(q: np.ndarray, count: int) -> np.ndarray:
    """TQ1_0 packs `count` base-3 digits per byte as a fraction b / 256 of 3^count: digit k is the
    integer part of 3 * frac(b * 3^k / 256). Laid out run by run like `_unpack` (run = q's width)."""
    n, m = q.shape
    powers = (3 ** np.arange(count)).astype(np.uint8)[:, None]
    shifted = q[:, None, :] * powers  # uint8 arithmetic wraps: that is the frac()
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8).reshape(n, count * m)


def _tq1_0(blocks: np.ndarray) -> np.ndarray:
    qs, qh, d = _fields(blocks, 48, 4, 2)
    q = np.concatenate([_trits(qs[:, :32], 5), _trits(qs[:, 32:], 5), _trits(qh, 4)], axis=1)
    return _scaled(q.view(np.int8) - 1, _f16(d))


def _tq2_0(blocks: np.ndarray) -> np.ndarray:
    qs, d = _fields(blocks, 64, 2)
    return _scaled(_unpack(qs, 2, 32).view(np.int8) - 1, _f16(d))


# ---------------------------------------------------------------------------------------------
# I-quants with codebooks: each code picks a row of 8 (or 4) values from a fixed grid


def _grid(levels: tuple[int, ...], width: int, bitmap: str) -> np.ndarray:
    """A codebook of `width`-value rows drawn from `levels`, stored compactly: ggml's rows are exactly
    the members, in ascending order, of all len(levels) ** width possible rows when row r's value j
    is levels[(r // len(levels) ** j) % len(levels)]; `bitmap` is the zlib-compressed, base85
    membership bit set (bit r = row r is in the grid)."""
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b85decode(bitmap)), np.uint8), bitorder="little")
    rows = np.flatnonzero(bits)[:, None] // len(levels) ** np.arange(width) % len(levels)
    return np.array(levels, np.int8)[rows]


_IQ2XXS_GRID = _grid((8, 25, 43), 8, (
    "c-nPRORB^$43oj#tB`je2YP^R=KfcCw)5@K5e=lV<VbEmf91ogR%p3E0BR^O#16P=^@J3)+t0mx___f>P^zDolEn6;is&dxI!#Zg"
    "_{KuzkVd4Mw`?l*l~*(z5~c8Qj-!-YZym34v`$TQ4<4*~)dpL;rq|+W4irx`d$&)6^vGb7UkLBrzcFbHqcf>sMFwRxr;MTG;*}m%"
    "Qlby-@@TSk)X7om@@#uKQIjUUWQ&$2&y}*gX5TV=Bc|Cuh1wL(2Kn3A3Yj<N%;gblzhT7_jxp@MF=lA5st5R^Hl2J=^JV`E{Z0D^"
    "#$6R7"
))
_IQ2XS_GRID = _grid((8, 25, 43), 8, (
    "c-mc2TdsvL2pkgnkBRPwCicH3cK=&BJX-bM<{ZTW!^|+oxJIi-qkD|rsuaR~iB<*?x~C4>8J0pJW<V>X*vo#SY&(-c)w(<-fCU6Q"
    "Vt|)*=>oJ=N8h~B3mmYKBw*Y)Ca<s*uvOak7T*la5<g=kAh?T96(5+bR(Mt@J=L5^n!u1sF+~=p=RjVCGbM+vDH*59tF!>kC`)-u"
    "3GzO}jM8X_r-*1ytubG*&a^iqGs?p-do}D8x2NWXU?%O)=7t88q040RdJ=Ak)9T+$YBcFD31^6BC_W+mG1}iEA-T}Oj@u6-pQ1yB"
    "yIl9%`W3mW#F%j~<yh(N0zSL~oH^Zy%}}tQx4=M73#xoc?jNErTmD?iDs40;(&MG>YYMNuDE=SK;cc#9vM%q_=>7msuqjC"
))
_IQ2S_GRID = _grid((8, 25, 43), 8, (
    "c-n1JU5W-F3~NE(E9iYHjPDBe{#V(wI=kPpE5rQ7#3X8F%Z9aF@G^(h-0EI3Em0|W3^QwctZ7zp0a8G#rYWS&oF&YfEj@sgh^u5F"
    "BBgC>LAkBEEtarKv-X}c)kMD5E9g)N*35uFS6j&;COQ!QC2=T0oAzp}=fs8f?3xctXeG?g^dQAA!2(KVP=j1x!<Qgx@l7F)Pu!TM"
    "d$m>{ZzEray(N$AzRb24)#*U9zYZZF^+2!@EVQ9?ARiEH!J<ErE8usn4?()-BQhW*1pE<<S|Z6aT82aQO}QP4+el6zUY~*z7~Sl6"
    "pK?p!Q_DMIhH4w7?joIO9P^#Dw9CRS7mu8OBC|vDii4FoWN_zK9m?6y$}qXC*pyH_2f!)+bXep&HXz~CYasM7Fd3(JhmM~KIbkHJ"
    "7yU4;E692~{FNElHOf~Fzm+TBn!W(JyjC6"
))
_IQ3XXS_GRID = _grid((4, 12, 20, 28, 36, 44, 52, 62), 4, (
    "c-l=-F%H5o3_M%0RAmZ7_lgPeigaLyA4Q!IuVCbv_?)J2Rn;aw-<^~BWtxCXwzFx0%xW)eST<YW5KL&L;j#hAAHoX-c)&}FY<X@1"
    "m|7IGsjrX>q7@bAuHrcP3L2_`6x)_>^v5;&o?@Fdagv_Uo9H*utGOGEJ93R6P|L2rgx{U}Y-UnrS3sKYtPIbF!WdDS7|dsT<9UQC"
    "qzhJe8+4kK5km%XvHjm=J(sMgqk-e3v^zjTJayVggoDWMJzTWE4a0T)3l-9P!ydlNePrBA?Xny*@kmBo4W|8$?wEo20v5Uy_5"
))
_IQ3S_GRID = _grid((1, 3, 5, 7, 9, 11, 13, 15), 4, (
    "c-k#d!AiqG5PdVu!e&pqA>uXNMyUCUt<-~hDT4SrX{pfmmf{D9Rs{Q#&TgE;z`Qr}-rMBob#A|%IbF{W(Id*&Lkwq!%0~0(%@Ao{"
    "OU0lD_x2OXCI^OquXIKLt}o^pYnG?L6&oz+9HeSVPSrN(A}t!YmF^Xmp*3Qy-5G8(e|b5Y-VC?q(AA>+32wuC)HmEXp@c1}PT|h8"
    "3}iuXSwt^ePGkv?U+Lf3a_=1ov?9@{igP&9v4ypFswx3&TJZ@M2_=SuX>*z&qp%+CoXl)ge8!drA@5Agyn!FG+()?*sDei}n1QT9"
    "5(J|p-wR7#Aht{0!Hx!aZfy;cl!bD4D3uqR(zW`GY5;6>@R{_|3X$jRqNR^eu)^e<Ll^vCYlKPU1;QQ+o$IB(hKom+bHx0SXmXXw"
    "yZnVo8~6jd#wQ>"
))
_IQ1S_GRID = _grid((-1, 0, 1), 8, (
    "c-k#eK}(!R7=CxE;dM-9V?RN1diSfb(^(PgE$L;EU0C#DLh=VZ*|bQ>IZZw%yXlwN6ha`hG?#HO$v6$G@ldv(umMk2dT8mb2WdTo"
    "x*h^v8VtnDuD#8?@Vw9Syw7v(LR2?w<}y}3b9YJG^C&5*&qs>Nl?x;NhAB!%0hRecnsm$a2YwJ@;QqccSPG~@n#@N5uBY$^gNY22"
    "s7}?HYgoxmY#Y+!Ajh1yxWA4l1OzVO1-XRyWBes^wA;LAoBq<x!%nuPhFWp9`{&R@7DG%<XIwD^Is3Q$Jf@<B<<hd(0^?jzIHG8v"
    "Qn*?-$Ub(LsHW&@kYNcQ%|}dP%c;av8KJU^mWiJv*28-WD<$YEG%#}+D!ES;XeDuFD(VlG#i@A4$V;H%7rH52w&LB_pg1xSvl=L<"
    "CZ@9?{WdkSxbxSuMq|l64F4MqT|O(RS}O@H(bLXvHn!_OntvSw2GXTKiD_6XGLxujp0!)qyF+V=7Bv?g3oFy??D1-6?{(2le%HQr"
    "c>Le(m#@Cb_P%)g$;r#{<KcsUbe#9?p_<1{H>jE?+1SCIq;Fwj@yPMjA_U90?}vdY$)D1%>fQq-z{36HBT$I&mG*v%J#A~V%aSj@"
    "pZtCEAg}V1eou`2@uUxU_YQ=)6;l3U7EjmAKr#y2F0kdO91c}@u6ikZ68>90+)KINV7E3oVy0wcNC7Qg*Gnz$6Ckekcj5w;yQl$8"
    "BcV}uIeIA*;9XR~L2uzcrHYS+2)y-rqrtcg6e{stpn$cM#il(dTBx(R&0u-;P1DmAvG}u@dX;b%ns9v~6p49X^c}lqEMlIFjzJBb"
    "rp$X4T{{D_p5YV7e^~xM<^E7<_56qcAaL=FI+lT|4v2#Y&dpW2-Egd@Fdf5G@Dheeu*|v(bMFD;1sQ1"
))

# The codebooks by the names ggml gives them, for the GPU kernels: realm_wasm/gpu/compose.py packs
# these same arrays into WGSL tables, so the shaders and the numpy dequantizers read identical rows.
GRIDS: dict[str, np.ndarray] = {
    "iq2xxs_grid": _IQ2XXS_GRID, "iq2xs_grid": _IQ2XS_GRID, "iq2s_grid": _IQ2S_GRID,
    "iq3xxs_grid": _IQ3XXS_GRID, "iq3s_grid": _IQ3S_GRID, "iq1s_grid": _IQ1S_GRID,
}

# Sign bytes of IQ2_XXS/IQ2_XS/IQ3_XXS: 7 stored sign bits, the 8th makes the count of minus signs even.
_KSIGNS = np.array([i | (bin(i).count("1") & 1) << 7 for i in range(128)], np.uint8)
_IQ1_DELTA = np.float32(0.125)  # IQ1 shifts its ternary grid by +-1/8


def _bitfields(words: np.ndarray, width: int, count: int) -> np.ndarray:
    """The `count` lowest `width`-bit fields of each word, lowest first: [n, k] -> [n, k * count]."""
    shifts = np.arange(0, width * count, width, dtype=words.dtype)
    fields = (words[:, :, None] >> shifts) & words.dtype.type((1 << width) - 1)
    return fields.reshape(words.shape[0], -1)


def _signed(grid: np.ndarray, idx: np.ndarray, sign_bytes: np.ndarray) -> np.ndarray:
    """Grid rows picked by idx [n, k] with bit j of sign byte i negating value j of row i -> int8 [n, k * 8]."""
    values = grid[idx].reshape(idx.shape[0], -1)
    return np.where(_unpack(sign_bytes, 1, 1).view(bool), -values, values)


def _half_step(d: np.ndarray, codes: np.ndarray, unit: float) -> np.ndarray:
    """IQ2/IQ3_XXS group scales: d * (code + 1/2) * unit."""
    return _f16(d) * (np.float32(0.5) + codes.astype(np.float32)) * np.float32(unit)


def _iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    d, qs = _fields(blocks, 2, 64)
    # per 32 values two u32: four grid row bytes, then four 7-bit sign indices and a 4-bit scale
    n = blocks.shape[0]
    idx = qs.reshape(n, 8, 8)[:, :, :4].reshape(n, 32)
    words = qs.view("<u4")[:, 1::2]
    q = _signed(_IQ2XXS_GRID, idx, _KSIGNS[_bitfields(words, 7, 4)])
    return _scaled(q, _half_step(d, words >> 28, 0.25))


def _iq2_xs(blocks: np.ndarray) -> np.ndarray:
    d, qs, scales = _fields(blocks, 2, 64, 8)
    codes = qs.view(_U16)  # 9-bit grid row, 7-bit sign index
    q = _signed(_IQ2XS_GRID, codes & 511, _KSIGNS[codes >> 9])
    return _scaled(q, _half_step(d, _unpack(scales, 4, 1), 0.25))


def _iq2_s(blocks: np.ndarray) -> np.ndarray:
    d, qs, signs, qh, scales = _fields(blocks, 2, 32, 32, 8, 8)
    idx = qs | (_unpack(qh, 2, 1).astype(np.uint16) << 8)  # 10-bit grid rows
    return _scaled(_signed(_IQ2S_GRID, idx, signs), _half_step(d, _unpack(scales, 4, 1), 0.25))


def _iq3_xxs(blocks: np.ndarray) -> np.ndarray:
    d, qs, packed = _fields(blocks, 2, 64, 32)
    words = packed.view("<u4")  # per 32 values: four 7-bit sign indices and a 4-bit scale
    q = _signed(_IQ3XXS_GRID, qs, _KSIGNS[_bitfields(words, 7, 4)])
    return _scaled(q, _half_step(d, words >> 28, 0.5))


def _iq3_s(blocks: np.ndarray) -> np.ndarray:
    d, qs, qh, signs, scales = _fields(blocks, 2, 64, 8, 32, 4)
    idx = qs | (_unpack(qh, 1, 1).astype(np.uint16) << 8)  # 9-bit grid rows
    return _scaled(_signed(_IQ3S_GRID, idx, signs), _f16(d) * (1 + 2 * _unpack(scales, 4, 1)))


def _iq1(d: np.ndarray, idx: np.ndarray, negative_delta: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """IQ1_S/IQ1_M: d * (2 * scale + 1) * (grid value +- delta), one delta sign per grid row."""
    delta = np.where(negative_delta, -_IQ1_DELTA, _IQ1_DELTA)
    q = _IQ1S_GRID[idx] + delta[:, :, None]
    return _scaled(q.reshape(idx.shape[0], -1), d * (2 * scales + 1))


def _iq1_s(blocks: np.ndarray) -> np.ndarray:
    d, qs, qh = _fields(blocks, 2, 32, 16)
    # one u16 per 32 values: four 3-bit grid row tops, a 3-bit scale, the delta's sign
    words = qh.view(_U16)
    idx = qs | (_bitfields(words, 3, 4) << 8)
    negative = np.repeat(words >> 15, 4, axis=1)
    return _iq1(_f16(d), idx, negative, (words >> 12) & 7)


def _iq1_m(blocks: np.ndarray) -> np.ndarray:
    qs, qh, packed = _fields(blocks, 32, 16, 8)
    # four u16: 3-bit scales in bits 0..11, and the f16 super-scale spread over their top nibbles
    words = packed.view(_U16)
    d = np.bitwise_or.reduce((words >> 12) << np.arange(0, 16, 4, dtype=np.uint16), axis=1)
    # one nibble per grid row: 3-bit row top, delta sign
    nibbles = _unpack(qh, 4, 1)
    idx = qs | ((nibbles & 7).astype(np.uint16) << 8)
    return _iq1(_f16(d[:, None].view(np.uint8)), idx, nibbles >> 3, _bitfields(words, 3, 4))


# ---------------------------------------------------------------------------------------------
# The table

# name, GGML type id, elements per block, bytes per block, dequantizer, GPU-readable (a WGSL snippet
# shaders/dequant_<name>.wgsl exists and composes with every kernel: tests/test_gpu_matmul.py checks it)
_ROWS: tuple[tuple[str, int, int, int, Callable[[np.ndarray], np.ndarray], bool], ...] = (
    ("F32", 0, 1, 4, _cast("<f4"), True),
    ("F16", 1, 1, 2, _cast("<f2"), True),
    ("Q4_0", 2, 32, 18, _q4_0, True),
    ("Q4_1", 3, 32, 20, _q4_1, True),
    ("Q5_0", 6, 32, 22, _q5_0, True),
    ("Q5_1", 7, 32, 24, _q5_1, True),
    ("Q8_0", 8, 32, 34, _q8_0, True),
    ("Q8_1", 9, 32, 36, _q8_1, True),
    ("Q2_K", 10, QK_K, 84, _q2_k, True),
    ("Q3_K", 11, QK_K, 110, _q3_k, True),
    ("Q4_K", 12, QK_K, 144, _q4_k, True),
    ("Q5_K", 13, QK_K, 176, _q5_k, True),
    ("Q6_K", 14, QK_K, 210, _q6_k, True),
    ("Q8_K", 15, QK_K, 292, _q8_k, True),
    ("IQ2_XXS", 16, QK_K, 66, _iq2_xxs, True),
    ("IQ2_XS", 17, QK_K, 74, _iq2_xs, True),
    ("IQ3_XXS", 18, QK_K, 98, _iq3_xxs, True),
    ("IQ1_S", 19, QK_K, 50, _iq1_s, True),
    ("IQ4_NL", 20, 32, 18, _iq4_nl, True),
    ("IQ3_S", 21, QK_K, 110, _iq3_s, True),
    ("IQ2_S", 22, QK_K, 82, _iq2_s, True),
    ("IQ4_XS", 23, QK_K, 136, _iq4_xs, True),
    ("I8", 24, 1, 1, _cast("i1"), False),
    ("I16", 25, 1, 2, _cast("<i2"), False),
    ("I32", 26, 1, 4, _cast("<i4"), False),
    ("I64", 27, 1, 8, _cast("<i8"), False),
    ("F64", 28, 1, 8, _cast("<f8"), False),
    ("IQ1_M", 29, QK_K, 56, _iq1_m, True),
    ("BF16", 30, 1, 2, _bf16, True),
    ("TQ1_0", 34, QK_K, 54, _tq1_0, True),
    ("TQ2_0", 35, QK_K, 66, _tq2_0, True),
    ("MXFP4", 39, 32, 17, _mxfp4, True),
    ("NVFP4", 40, 64, 36, _nvfp4, True),
    ("Q1_0", 41, 128, 18, _q1_0, True),
    ("Q2_0", 42, 64, 18, _q2_0, True),
)

QUANT_TYPES: tuple[QuantType, ...] = tuple(
    QuantType(name, type_id, block, size, fn, f"dequant_{name.lower()}.wgsl" if gpu else None)
    for name, type_id, block, size, fn, gpu in _ROWS
)
QUANTS_BY_ID: dict[int, QuantType] = {qt.type_id: qt for qt in QUANT_TYPES}
QUANTS_BY_NAME: dict[str, QuantType] = {qt.name: qt for qt in QUANT_TYPES}


def quant_type(type_id: int) -> QuantType:
    """The table row of a GGML type id; raises UnknownQuantType."""
    try:
        return QUANTS_BY_ID[type_id]
    except KeyError:
        raise UnknownQuantType(type_id) from None


def tensor_nbytes(type_id: int, n_elements: int) -> int:
    """Bytes that n_elements of the type occupy; n_elements must fill whole blocks."""
    qt = quant_type(type_id)
    if n_elements % qt.block_size:
        raise ValueError(f"{n_elements} elements do not fill whole {qt.name} blocks of {qt.block_size}")
    return n_elements // qt.block_size * qt.type_size


def _as_bytes(raw: bytes | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return np.frombuffer(raw, dtype=np.uint8)


def dequantize(raw: bytes | memoryview | np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's raw bytes -> float32 array of `shape` (numpy order: GGUF's dims reversed, so the
    last axis is the row that blocks run along). F32 data may come back as a read-only view of `raw`."""
    qt = quant_type(type_id)
    if shape and shape[-1] % qt.block_size:
        raise ValueError(f"{qt.name} rows of {shape[-1]} elements do not fill whole blocks of {qt.block_size}")
    buf = _as_bytes(raw)
    nbytes = tensor_nbytes(type_id, math.prod(shape))
    if buf.size != nbytes:
        raise ValueError(f"{qt.name} tensor of shape {shape} takes {nbytes} bytes, got {buf.size}")
    return qt.dequantize(buf.reshape(nbytes // qt.type_size, qt.type_size)).reshape(shape)
