"""GGUF reader: agrees with the gguf package on valid files; one clear error type on corrupt ones."""

from __future__ import annotations

import random
import struct

import gguf
import numpy as np
import pytest

from realm_wasm import gguf as realm_gguf
from realm_wasm.gguf import MAX_HEADER_BYTES, GGUFError, GGUFNeedMoreData, parse_header, read_gguf


def write_valid(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_string("test.str", "héllo")
    w.add_bool("test.bool", True)
    w.add_array("test.strings", ["a", "bc", "ü"])
    w.add_array("test.ints", [1, 2, 3])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    q = gguf.quants.quantize(np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_agrees_with_gguf_package(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.metadata["test.u32"] == 7 and ours.metadata["test.f32"] == 0.5
    assert ours.metadata["test.str"] == "héllo" and ours.metadata["test.bool"] is True
    assert ours.metadata["test.strings"] == ["a", "bc", "ü"]
    assert list(ours.metadata["test.ints"]) == [1, 2, 3]
    assert ours.header.architecture == "llama"
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type_id == int(t.tensor_type)
        assert mine.dims == tuple(int(d) for d in t.shape)
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert bytes(ours.tensor_bytes(t.name)) == t.data.tobytes()


def test_any_prefix_parses_or_asks_for_more(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    raw = path.read_bytes()
    full = parse_header(raw)
    for n in range(0, full.data_offset):
        try:
            header = parse_header(raw[:n])
        except GGUFNeedMoreData as e:
            assert e.needed > n
        else:
            assert header.tensors == full.tensors
    assert parse_header(raw[:full.data_offset]).tensors == full.tensors


# A hand-built GGUF so each field can be corrupted exactly.
def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def build(magic=b"GGUF", version=3, n_tensors=None, n_kv=None, kv=None, tensors=None, data=b"\0" * 64,
          alignment_pad=True) -> bytes:
    kv = kv if kv is not None else [s("general.architecture") + struct.pack("<I", 8) + s("llama")]
    tensors = tensors if tensors is not None else [s("t") + struct.pack("<I", 1) + struct.pack("<Q", 16)
                                                   + struct.pack("<I", 0) + struct.pack("<Q", 0)]
    head = magic + struct.pack("<I", version)
    head += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kv) if n_kv is None else n_kv)
    head += b"".join(kv) + b"".join(tensors)
    if alignment_pad:
        head += b"\0" * (-len(head) % 32)
    return head + data


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def nested(depth: int) -> bytes:
    """An array value `depth` arrays deep around one u32."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)


def tensor(name="t", dims=(16,), type_id=0, offset=0, n_dims=None) -> bytes:
    return (s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset))


def test_hand_built_file_is_valid():
    header = parse_header(build(), file_size=len(build()))
    assert header.tensors["t"].nbytes == 64


@pytest.mark.parametrize("raw, words", [
    (build(magic=b"GGML"), "not a GGUF file"),
    (build(version=1), "unsupported GGUF version 1"),
    (build(version=99), "unsupported GGUF version 99"),
    (build(n_tensors=1 << 40), "absurd tensor count: 1099511627776"),
    (build(n_kv=1 << 40), "absurd metadata count: 1099511627776"),
    (build(n_kv=(1 << 64) - 1), "absurd metadata count: 18446744073709551615"),
    (build(kv=[struct.pack("<Q", 1 << 60)]), "absurd length of metadata key #0"),
    (build(kv=[struct.pack("<Q", (1 << 64) - 1)]), "absurd length of metadata key #0"),
    (build(kv=[kv("k", 9, struct.pack("<IQ", 5, 1 << 50))]), "absurd length of k: 1125899906842624"),
    (build(kv=[kv("k", 9, struct.pack("<IQ", 8, 1 << 61))]), "absurd length of k: 2305843009213693952"),
    (build(kv=[kv("k", 9, struct.pack("<IQ", 8, 2) + s("ok") + s(b"\xc3"))]), r"k\[1\] is not valid UTF-8"),
    (build(kv=[kv("k", 9, struct.pack("<IQ", 8, 2) + s("ok") + struct.pack("<Q", 1 << 40))]),
     r"absurd length of k\[1\]"),
    (build(kv=[kv("k", 9, nested(2))]), "k is an array of arrays"),
    (build(kv=[kv("k", 9, nested(990))]), "k is an array of arrays"),
    (build(kv=[kv("k", 9, struct.pack("<IQ", 13, 1))]), "unknown array element type 13"),
    (build(kv=[s("k") + struct.pack("<I", 42)]), "unknown metadata value type 42"),
    (build(kv=[s(b"\xff\xfe") + struct.pack("<I", 4) + b"\0" * 4]), "not valid UTF-8"),
    (build(kv=[s("k") + struct.pack("<II", 4, 1), s("k") + struct.pack("<II", 4, 2)]), "duplicate metadata key"),
    (build(tensors=[tensor(type_id=77)]), "unknown"),
    (build(tensors=[tensor(offset=4096)]), "data offset 4096 leaves a gap before it; .* must be 0"),
    (build(tensors=[tensor(offset=3)]), "data offset 3 is not a multiple of general.alignment 32"),
    (build(tensors=[tensor("a"), tensor("b", offset=0)]), "'b': data offset 0 overlaps the tensor before it"),
    (build(tensors=[tensor("a"), tensor("b", offset=96)]), "'b': data offset 96 leaves a gap .* must be 64"),
    (build(tensors=[tensor("a"), tensor("b", offset=64)], data=b"\0" * 100), "'b' .* runs past the end"),
    (build(tensors=[tensor(), tensor()]), "duplicate tensor name"),
    (build(tensors=[tensor("x" * 64)]), "absurd length of name of tensor #0: 64 bytes"),
    (build(tensors=[tensor(dims=(), n_dims=0)]), "0 dimensions"),
    (build(tensors=[tensor(dims=(16,) * 255)]), "255 dimensions"),
    (build(tensors=[tensor(dims=(1 << 63, 1 << 63))]), "absurd dimension"),
    (build(tensors=[tensor(dims=(16, 0))]), "absurd dimension"),
    (build(tensors=[tensor(dims=(1 << 30, 1 << 30))]), "absurd element count"),
    (build(tensors=[tensor(dims=(33,), type_id=8)]), "not a multiple"),
    (build(data=b"\0" * 10), "runs past the end"),
    (build()[:20], "truncated"),
    # general.alignment: a positive power-of-two integer; `true` is not 1
    (build(kv=[kv("general.alignment", 7, b"\x01")]), "general.alignment must be a power-of-two integer, got True"),
    (build(kv=[kv("general.alignment", 4, struct.pack("<I", 0))]), "got 0"),
    (build(kv=[kv("general.alignment", 4, struct.pack("<I", 48))]), "got 48"),
    (build(kv=[kv("general.alignment", 6, struct.pack("<f", 32.0))]), "got 32.0"),
    (build(kv=[kv("general.alignment", 8, s("32"))]), "got '32'"),
])
def test_corrupt_files_raise_gguf_error_naming_the_problem(raw, words):
    with pytest.raises(GGUFError, match=words):
        parse_header(raw, file_size=len(raw))


def test_alignment_other_than_32_lays_tensors_out_on_its_multiples():
    raw = build(kv=[kv("general.alignment", 4, struct.pack("<I", 64))],
                tensors=[tensor("a", dims=(16,)), tensor("b", dims=(16,), offset=64)], alignment_pad=False)
    raw += b"\0" * (-len(raw) % 64) + b"\0" * 128
    header = parse_header(raw, file_size=len(raw))
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert header.tensors["b"].offset == header.data_offset + 64


def test_a_prefix_never_asks_for_more_than_the_header_limit(monkeypatch):
    # without a file size, a huge claimed count ends in an error, not in a request for gigabytes
    with pytest.raises(GGUFError, match="before the 64 MiB header limit"):
        parse_header(build(kv=[kv("k", 9, struct.pack("<IQ", 8, 1 << 30))]))
    # a claim that fits the limit asks for just the bytes it needs
    with pytest.raises(GGUFNeedMoreData) as e:
        parse_header(build(kv=[kv("k", 8, struct.pack("<Q", 1 << 20))]))
    assert 1 << 20 < e.value.needed <= MAX_HEADER_BYTES
    # strings that each fit but together pass the limit
    monkeypatch.setattr(realm_gguf, "MAX_HEADER_BYTES", 4096)
    raw = build(kv=[kv("k", 9, struct.pack("<IQ", 8, 3) + s("a" * 1500) * 3)])
    with pytest.raises(GGUFError, match=r"k\[2\] at byte \d+ ends past byte 4096: no GGUF header is that large"):
        parse_header(raw)


def test_claimed_counts_are_checked_against_the_bytes_left():
    raw = build(kv=[kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 22) + s("a") * 1000)])
    with pytest.raises(GGUFError, match="absurd length of tokenizer.ggml.tokens: 4194304 .* bytes of the file remain"):
        parse_header(raw, file_size=len(raw))
    # a prefix of a larger file: the strings are read until the prefix ends, then more is asked for
    prefix = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 22)
                                                          + s("a") * 1000)
    with pytest.raises(GGUFNeedMoreData):
        parse_header(prefix, file_size=len(prefix) + (1 << 26))


def test_string_arrays_fast_path_agrees_with_one_by_one():
    words = ["", "a", "héllo", "\u2581the", "<0x0A>", "x" * 1000]
    raw = build(kv=[kv("w", 9, struct.pack("<IQ", 8, len(words)) + b"".join(s(w) for w in words))])
    assert parse_header(raw, file_size=len(raw)).metadata["w"] == words


def test_truncated_file_on_disk_names_the_tensor(tmp_path):
    path = tmp_path / "cut.gguf"
    write_valid(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="tensor 'b'.*runs past the end"):
        read_gguf(path)


def test_missing_file_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot read model file"):
        read_gguf(tmp_path / "nope.gguf")


def test_random_corruption_never_escapes_as_another_exception(tmp_path):
    path = tmp_path / "m.gguf"
    write_valid(path)
    raw = path.read_bytes()
    end = parse_header(raw).data_offset
    rng = random.Random(0)
    for _ in range(2000):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(end)] = rng.randrange(256)
        try:
            parse_header(bytes(b), file_size=len(b))
        except GGUFError:
            pass
