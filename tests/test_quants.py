"""realm_wasm.quants against gguf-py's dequantizers, hand-built blocks and the default model's tensors."""

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from realm_wasm.quants import (
    QUANT_TYPES,
    QUANTS_BY_ID,
    QUANTS_BY_NAME,
    UnknownQuantType,
    dequantize,
    quant_type,
    tensor_nbytes,
)

MODEL = Path.home() / ".cache/realm/models/gemma-3-270m-q4_k_m.gguf"

REQUIRED = (
    "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ4_NL IQ4_XS "
    "TQ1_0 TQ2_0 MXFP4 NVFP4 IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ1_S IQ1_M Q1_0 Q2_0"
).split()
# ggml types the installed gguf-py does not list yet: (type id, elements, bytes per block) from
# llama.cpp's ggml.h and ggml-common.h
NEWER_THAN_GGUF = {"Q2_0": (42, 64, 18)}
INTEGER_TYPES = ("I8", "I16", "I32", "I64", "F64")

# Byte offsets of the f16 fields (scales, mins) inside one block. Random bytes there could spell
# inf/nan, and the comparison would then be about NaN propagation instead of layout.
F16_FIELDS = {
    "F16": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
    "Q1_0": (0,), "Q2_0": (0,),
}


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite f16 values of any magnitude and sign, as [n, 2] bytes."""
    bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    return bits.astype("<u2").view(np.uint8).reshape(n, 2)


def _random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    qt = QUANTS_BY_NAME[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, qt.type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(name, ()):
        blocks[:, offset:offset + 2] = _finite_f16(rng, n_blocks)
    if name == "IQ1_M":
        # its f16 scale is the top nibbles of the last 4 u16s; bit 14 is bit 6 of the last byte.
        # Clearing it keeps the exponent below all-ones.
        blocks[:, -1] &= 0xBF
    return blocks


def _gguf_can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    try:
        gguf_dequantize(np.zeros((1, type_size), np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


GGUF_DEQUANTIZABLE = [t.name for t in GGMLQuantizationType if _gguf_can_dequantize(t)]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


@pytest.mark.parametrize("name", GGUF_DEQUANTIZABLE)
def test_matches_gguf_bit_for_bit(name: str) -> None:
    # exact, not just close: both do ggml's float operations in ggml's order, so they round alike
    qt = QUANTS_BY_NAME[name]
    rows, blocks_per_row = 3, 64 // qt.block_size + 5
    raw = _random_blocks(name, rows * blocks_per_row).reshape(rows, blocks_per_row * qt.type_size)
    expected = gguf_dequantize(raw, GGMLQuantizationType[name])
    got = dequantize(raw, qt.type_id, (rows, blocks_per_row * qt.block_size))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(_bits(got), _bits(expected))


def test_q8_1_hand_built_block() -> None:
    qs = np.arange(-16, 16, dtype=np.int8)
    d = 0.5
    block = struct.pack("<ee", d, d * float(qs.sum())) + qs.tobytes()  # d, d * sum(qs), qs
    got = dequantize(block + block, 9, (2, 32))
    assert got[0, 0] == -8.0 and got[0, 16] == 0.0 and got[0, 31] == 7.5
    assert np.array_equal(got, np.tile(np.arange(-8.0, 8.0, 0.5), (2, 1)))


def test_q8_k_hand_built_block() -> None:
    qs = np.arange(-128, 128, dtype=np.int16).astype(np.int8)
    bsums = qs.reshape(16, 16).sum(axis=1, dtype=np.int16)
    block = struct.pack("<f", 0.125) + qs.tobytes() + bsums.astype("<i2").tobytes()  # f32 d, not f16
    got = dequantize(block, 15, (256,))
    assert got[0] == -16.0 and got[128] == 0.0 and got[255] == 15.875
    assert np.array_equal(got, np.arange(-16.0, 16.0, 0.125, dtype=np.float32))


def test_q4_k_hand_built_block() -> None:
    # 6-bit scales/mins of the 32-element sub-blocks: sub-block 0 has scale = byte 0 & 63 = 1 and
    # min = byte 4 & 63 = 0; sub-block 5 has scale = (byte 9 & 15) | (byte 1 >> 6) << 4 = 3 + 16 and
    # min = (byte 9 >> 4) | (byte 5 >> 6) << 4 = 2 + 32
    packed = bytearray(12)
    packed[0], packed[1], packed[5], packed[9] = 1, 0x40, 0x80, 0x23
    qs = bytearray(128)
    qs[0] = 0x07  # element 0: low nibble of byte 0
    qs[65] = 0x90  # element 161: bytes 64..95 hold elements 128..159 (low) and 160..191 (high)
    block = struct.pack("<ee", 0.5, 0.25) + bytes(packed) + bytes(qs)  # d, dmin
    got = dequantize(block, 12, (256,))
    assert got[0] == 3.5  # 0.5 * 1 * 7 - 0.25 * 0
    assert got[161] == 77.0  # 0.5 * 19 * 9 - 0.25 * 34
    assert got[160] == -8.5  # 0.5 * 19 * 0 - 0.25 * 34
    assert got[1] == 0.0


def test_q1_0_hand_built_block() -> None:
    # element j is bit j of the 16 bytes after d: set bits are +d, clear ones -d
    qs = bytearray(16)
    qs[0], qs[15] = 0b1000_0101, 0x80  # elements 0, 2, 7 and 127
    got = dequantize(struct.pack("<e", 0.75) + bytes(qs), 41, (128,))
    want = np.full(128, -0.75, np.float32)
    want[[0, 2, 7, 127]] = 0.75
    assert np.array_equal(got, want)


def test_q2_0_hand_built_block() -> None:
    # element j is bit pair j % 4 of byte j / 4; value d * (q - 1)
    qs = bytearray([0b01_01_01_01] * 16)  # every q = 1: zero
    qs[0], qs[9] = 0b11_10_01_00, 0b00_11_01_01  # elements 0..3: q = 0, 1, 2, 3; 38: q = 3, 39: q = 0
    got = dequantize(struct.pack("<e", -2.0) + bytes(qs), 42, (64,))
    want = np.zeros(64, np.float32)
    want[[0, 2, 3, 38, 39]] = [2.0, -2.0, -4.0, -4.0, 2.0]
    assert np.array_equal(got, want)


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(0, 10) == 40
    assert tensor_nbytes(8, 64) == 68
    assert tensor_nbytes(12, 4096) == 16 * 144
    assert tensor_nbytes(14, 0) == 0
    with pytest.raises(ValueError, match="Q4_K"):
        tensor_nbytes(12, 300)


def test_unknown_type_id() -> None:
    with pytest.raises(UnknownQuantType, match="5") as info:
        quant_type(5)  # ggml's removed Q4_2
    assert isinstance(info.value, ValueError) and info.value.type_id == 5
    with pytest.raises(UnknownQuantType, match="999"):
        dequantize(b"", 999, (0,))
    with pytest.raises(UnknownQuantType):
        tensor_nbytes(-1, 32)


def test_table_agrees_with_gguf_constants() -> None:
    assert len(QUANTS_BY_ID) == len(QUANT_TYPES) == len(QUANTS_BY_NAME)
    assert set(REQUIRED + list(INTEGER_TYPES)) <= set(QUANTS_BY_NAME)
    for qt in QUANT_TYPES:
        if qt.name not in GGMLQuantizationType.__members__:
            assert (qt.type_id, qt.block_size, qt.type_size) == NEWER_THAN_GGUF[qt.name]
            assert qt.shader == f"dequant_{qt.name.lower()}.wgsl"
            continue
        ggml_type = GGMLQuantizationType[qt.name]
        assert qt.type_id == ggml_type.value
        assert QUANTS_BY_ID[qt.type_id] is qt is quant_type(qt.type_id)
        sizes = GGML_QUANT_SIZES[ggml_type]
        if qt.name == "Q8_1" and sizes == (32, 40):
            # ggml's block_q8_1 is f16 d, f16 s, 32 x int8 = 36 bytes; gguf-py listed 4 + 4 + 32 until
            # llama.cpp PR #29036 corrected it to 2 + 2 + 32
            sizes = (32, 36)
        assert (qt.block_size, qt.type_size) == sizes, qt.name
        expected_shader = None if qt.name in INTEGER_TYPES else f"dequant_{qt.name.lower()}.wgsl"
        assert qt.shader == expected_shader


def test_plain_types_cast_to_float32() -> None:
    values = np.array([-3, 0, 7, 100], np.int64)
    for name in INTEGER_TYPES:
        dtype = {"I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "F64": "<f8"}[name]
        got = dequantize(values.astype(dtype).tobytes(), QUANTS_BY_NAME[name].type_id, (2, 2))
        assert got.dtype == np.float32 and np.array_equal(got, values.reshape(2, 2))


def test_shapes_rows_and_buffer_kinds() -> None:
    qt = QUANTS_BY_NAME["Q4_0"]
    raw = _random_blocks("Q4_0", 2 * 3 * 2)  # 2 x 3 rows of 64 elements
    full = dequantize(raw, qt.type_id, (2, 3, 64))
    assert full.shape == (2, 3, 64)
    # row-major with rows last-axis-fastest: row r is blocks 2r and 2r+1, decoded on their own
    for r, row in enumerate(full.reshape(6, 64)):
        assert np.array_equal(_bits(row), _bits(dequantize(raw[2 * r:2 * r + 2], qt.type_id, (64,))))
    padded = np.zeros((6, 2 * qt.type_size + 5), np.uint8)
    padded[:, :-5] = raw.reshape(6, -1)
    strided = padded[:, :-5]  # rows of a wider array: not contiguous
    for buffer in (raw.tobytes(), memoryview(raw.tobytes()), raw.reshape(3, -1), strided):
        assert np.array_equal(_bits(dequantize(buffer, qt.type_id, (6, 64))), _bits(full.reshape(6, 64)))
    assert dequantize(b"", qt.type_id, (0, 64)).shape == (0, 64)

    f32 = np.arange(6, dtype=np.float32)
    assert np.array_equal(dequantize(f32, 0, (2, 3)), f32.reshape(2, 3))  # an f32 array as its own bytes


def test_bad_shapes_are_named() -> None:
    raw = _random_blocks("Q4_0", 2).tobytes()
    with pytest.raises(ValueError, match="rows of 16"):
        dequantize(raw, 2, (4, 16))  # 64 elements, but a block may not straddle rows
    with pytest.raises(ValueError, match="takes 36 bytes, got 35"):
        dequantize(raw[:-1], 2, (64,))


# ---------------------------------------------------------------------------------------------
# The default model: its real tensors through both dequantizers

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array are walked)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _skip_value(buf: memoryview, off: int, vtype: int) -> int:
    if vtype == 8:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype == 9:
        itype, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if itype in _SCALARS:
            return off + count * struct.calcsize(_SCALARS[itype])
        for _ in range(count):
            off = _skip_value(buf, off, itype)
        return off
    return off + struct.calcsize(_SCALARS[vtype])


def _tensor_table(buf: memoryview) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """name -> (numpy shape, type id, absolute offset), from a minimal walk of the GGUF header
    (gguf.GGUFReader takes ~10 s on this file's 262k-token vocabulary)."""
    _magic, _version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    off, alignment = 24, 32
    for _ in range(n_kv):
        key_len = struct.unpack_from("<Q", buf, off)[0]
        key = bytes(buf[off + 8:off + 8 + key_len])
        off += 8 + key_len
        vtype = struct.unpack_from("<I", buf, off)[0]
        if key == b"general.alignment":
            alignment = struct.unpack_from("<I", buf, off + 4)[0]
        off = _skip_value(buf, off + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        name_len = struct.unpack_from("<Q", buf, off)[0]
        name = bytes(buf[off + 8:off + 8 + name_len]).decode()
        off += 8 + name_len
        n_dims = struct.unpack_from("<I", buf, off)[0]
        dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
        type_id, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), type_id, rel))
    data_start = -(-off // alignment) * alignment
    return {name: (shape, type_id, data_start + rel) for name, shape, type_id, rel in infos}


@pytest.fixture(scope="module")
def model() -> tuple[np.ndarray, dict[str, tuple[tuple[int, ...], int, int]]]:
    if not MODEL.exists():
        pytest.skip("default model not downloaded")
    data = np.memmap(MODEL, np.uint8, mode="r")
    return data, _tensor_table(memoryview(data))


@pytest.mark.parametrize(
    ("tensor", "type_name", "numpy_shape", "rows"),
    [
        ("blk.0.ffn_down.weight", "Q6_K", (640, 2048), None),
        ("blk.0.attn_output.weight", "Q4_K", (640, 1024), None),
        ("blk.0.attn_q.weight", "Q5_0", (1024, 640), None),
        ("blk.0.attn_norm.weight", "F32", (640,), None),
        ("token_embd.weight", "Q8_0", (262_144, 640), [0, 1, 2, 106, 4_000, 262_143]),  # a few rows
    ],
)
def test_default_model_tensors_match_gguf(model, tensor, type_name, numpy_shape, rows) -> None:
    file, table = model
    shape, type_id, offset = table[tensor]
    assert quant_type(type_id).name == type_name and shape == numpy_shape
    row_bytes = tensor_nbytes(type_id, shape[-1])
    n_rows = int(np.prod(shape[:-1]))
    data = file[offset:offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
    if rows is not None:
        data, shape = data[rows], (len(rows), shape[-1])
    expected = gguf_dequantize(data, GGMLQuantizationType(type_id)).reshape(shape)
    got = dequantize(data, type_id, shape)
    assert got.shape == shape and np.array_equal(_bits(got), _bits(expected))
    assert 0 < np.abs(got).max() < 1000  # real weights: a misplaced offset would read wild scales
