"""Architecture schemas: metadata types, ranges and cross-checks, and tensor shapes, all checked before
a plan is built; each bad value is a GGUFError naming the key or tensor. The headers start from real
files: a llama GGUF written by the gguf package (test_llama.make_model) and the default gemma-3 model."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_llama import FFN, LAYERS, N_HEADS, N_KV, VOCAB, D, make_model

from realm_wasm.gguf import GGUFError, GGUFHeader, TensorInfo, parse_header, read_gguf
from realm_wasm.model_files import default_model_path
from realm_wasm.models import build_plan, gemma3, llama

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def llama_header(tmp_path_factory) -> GGUFHeader:
    path = tmp_path_factory.mktemp("hp") / "llama.gguf"
    make_model(path, np.random.default_rng(0), Q.Q8_0, tied=False, rope_freqs=True)
    return read_gguf(path).header


@pytest.fixture(scope="module")
def gemma_header() -> GGUFHeader:
    path = default_model_path()
    with open(path, "rb") as f:
        return parse_header(f.read(8 << 20), file_size=path.stat().st_size)


def with_metadata(header: GGUFHeader, **changes) -> GGUFHeader:
    """The header with `arch.key` values replaced (keyword names use __ for dots); None removes a key."""
    metadata = dict(header.metadata)
    for name, value in changes.items():
        key = f"{header.architecture}.{name.replace('__', '.')}"
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return dataclasses.replace(header, metadata=metadata)


def with_tensors(header: GGUFHeader, drop=(), **dims) -> GGUFHeader:
    tensors = {n: t for n, t in header.tensors.items() if n not in drop}
    for name, new_dims in dims.items():
        name = name.replace("__", ".")
        tensors[name] = dataclasses.replace(header.tensors[name], dims=new_dims)
    return dataclasses.replace(header, tensors=tensors)


def test_valid_files_build_with_typed_values(llama_header, gemma_header):
    plan = build_plan(llama_header)
    assert (plan.kv.n_layers, plan.kv.n_kv_heads, plan.kv.head_dim, plan.n_vocab) == (LAYERS, N_KV, D // N_HEADS, VOCAB)
    hp = llama.HParams(llama_header, llama.SCHEMA)
    assert hp.sizes == dict(n_embd=D, n_embd_q=D, n_embd_kv=N_KV * D // N_HEADS, n_embd_head=D // N_HEADS,
                            n_ff=FFN, n_vocab=VOCAB, n_rot_pairs=D // N_HEADS // 2)
    # defaults, and an integer where a float is expected becomes a float
    assert hp["rope.scaling.factor"] == 1.0 and hp["rope.dimension_count"] == D // N_HEADS
    hp = llama.HParams(with_metadata(llama_header, rope__freq_base=10_000), llama.SCHEMA)
    assert type(hp["rope.freq_base"]) is float
    gemma = build_plan(gemma_header)
    assert (gemma.kv.n_layers, gemma.kv.head_dim, gemma.n_vocab, gemma.n_ctx_train) == (18, 256, 262144, 32768)


def test_key_length_defaults_to_an_even_split_of_the_embedding(llama_header):
    hp = llama.HParams(with_metadata(llama_header, attention__key_length=None), llama.SCHEMA)
    assert hp["attention.key_length"] == D // N_HEADS
    with pytest.raises(GGUFError, match="embedding_length = 64 is not a multiple of llama.attention.head_count = 3"):
        build_plan(with_metadata(llama_header, attention__head_count=3, attention__head_count_kv=1))


@pytest.mark.parametrize("changes, message", [
    (dict(block_count=None), "metadata is missing llama.block_count"),
    (dict(block_count=8.5), "llama.block_count must be an integer, got float 8.5"),
    (dict(block_count="30"), "llama.block_count must be an integer, got str '30'"),
    (dict(block_count=True), "llama.block_count must be an integer, got bool True"),
    (dict(block_count=np.array([2])), "llama.block_count must be an integer, got ndarray"),
    (dict(block_count=0), "llama.block_count = 0 is outside 1..1024"),
    (dict(block_count=1 << 32), "llama.block_count = 4294967296 is outside 1..1024"),
    (dict(block_count=1 << 40), "llama.block_count = 1099511627776 is outside"),
    (dict(attention__head_count=0), "llama.attention.head_count = 0 is outside"),
    (dict(embedding_length=-1), "llama.embedding_length = -1 is outside"),
    (dict(context_length=0), "llama.context_length = 0 is outside"),
    (dict(attention__layer_norm_rms_epsilon=math.nan), "llama.attention.layer_norm_rms_epsilon = nan is outside"),
    (dict(attention__layer_norm_rms_epsilon=-1e-5), "layer_norm_rms_epsilon = -1e-05 is outside 0..1"),
    (dict(attention__layer_norm_rms_epsilon="1e-5"), "layer_norm_rms_epsilon must be a number, got str"),
    (dict(rope__freq_base=math.inf), "llama.rope.freq_base = inf is outside"),
    (dict(rope__scaling__factor=0.0), "llama.rope.scaling.factor = 0.0 is outside"),
    (dict(attention__head_count_kv=3), "head_count_kv = 3 does not divide llama.attention.head_count = 4"),
    (dict(attention__head_count_kv=0), "llama.attention.head_count_kv = 0 is outside"),
    (dict(attention__key_length=15), "llama.attention.key_length = 15 is odd"),
    (dict(attention__value_length=8), "llama.attention.value_length = 8 differs from llama.attention.key_length = 16"),
    (dict(rope__dimension_count=32), "llama.rope.dimension_count = 32 must be even and at most"),
    (dict(rope__dimension_count=7), "llama.rope.dimension_count = 7 must be even"),
])
def test_bad_hyper_parameters_are_named(llama_header, changes, message):
    with pytest.raises(GGUFError, match=re.escape(message)):
        build_plan(with_metadata(llama_header, **changes))


@pytest.mark.parametrize("change, message", [
    (lambda h: with_metadata(h, block_count=3), "no tensor 'blk.2.attn_norm.weight' (llama.block_count is 3)"),
    (lambda h: with_metadata(h, block_count=1), "model has 9 tensors a llama model does not use, e.g. 'blk.1."),
    (lambda h: with_tensors(h, drop=["output_norm.weight"]), "model has no tensor 'output_norm.weight'"),
    (lambda h: with_tensors(h, drop=["blk.1.ffn_up.weight"]), "model has no tensor 'blk.1.ffn_up.weight'"),
    (lambda h: with_tensors(h, blk__0__attn_q__weight=(64, 32)),
     "tensor 'blk.0.attn_q.weight' has dims (64, 32), expected (n_embd=64, n_embd_q=64)"),
    (lambda h: with_tensors(h, blk__1__ffn_down__weight=(64, 128)),
     "tensor 'blk.1.ffn_down.weight' has dims (64, 128), expected (n_ff=128, n_embd=64)"),
    (lambda h: with_tensors(h, output_norm__weight=(64, 1)), "tensor 'output_norm.weight' has dims (64, 1)"),
    (lambda h: with_tensors(h, rope_freqs__weight=(16,)),
     "tensor 'rope_freqs.weight' has dims (16,), expected (n_rot_pairs=8)"),
    (lambda h: with_tensors(h, output__weight=(64, 95)),
     "tensor 'output.weight' has dims (64, 95), expected (n_embd=64, n_vocab=96)"),
    # the vocab in the metadata sizes the embedding, as llama.cpp requires
    (lambda h: dataclasses.replace(h, metadata={**h.metadata, "tokenizer.ggml.tokens": ["a"] * 95}),
     "tensor 'token_embd.weight' has dims (64, 96), expected (n_embd=64, n_vocab=95)"),
    (lambda h: dataclasses.replace(h, metadata={**h.metadata, "general.architecture": "bert"}),
     "unsupported architecture 'bert'"),
    (lambda h: dataclasses.replace(h, metadata={**h.metadata, "general.architecture": 7}),
     "metadata has no general.architecture string (got 7)"),
])
def test_missing_or_misshapen_tensors_are_named(llama_header, change, message):
    with pytest.raises(GGUFError, match=re.escape(message)):
        build_plan(change(llama_header))


def test_a_huge_block_count_in_range_fails_at_the_first_missing_block(gemma_header):
    t0 = time.process_time()
    with pytest.raises(GGUFError, match=re.escape("no tensor 'blk.18.attn_norm.weight' (gemma3.block_count is 1024)")):
        build_plan(with_metadata(gemma_header, block_count=1024))
    assert time.process_time() - t0 < 0.5  # it stops at block 18 instead of building 1024


def test_gemma3_reads_its_own_keys(gemma_header):
    with pytest.raises(GGUFError, match="metadata is missing gemma3.attention.sliding_window"):
        build_plan(with_metadata(gemma_header, attention__sliding_window=None))
    expected = "'blk.0.attn_q.weight' has dims (640, 1024), expected (n_embd=640, n_embd_q=512)"
    with pytest.raises(GGUFError, match=re.escape(expected)):  # the head dim sizes q, the first tensor it shapes
        build_plan(with_metadata(gemma_header, attention__key_length=128, attention__value_length=128))
    assert gemma3.HParams(with_metadata(gemma_header, rope__freq_base=None), gemma3.SCHEMA)["rope.freq_base"] == 1e6


# Any value of any type for any key the schemas read: the plan builds, or a GGUFError says why.
ANY_VALUE = st.one_of(
    st.none(),
    st.integers(-(1 << 64), 1 << 64),
    st.sampled_from([0, 1, 2, 4, 8, 16, 64, 128, 1 << 31, 1 << 32, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=4),
    st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=4).map(lambda v: np.array(v, np.int32)),
)
KEYS = sorted(set(llama.SCHEMA.keys) | set(gemma3.SCHEMA.keys))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(KEYS), ANY_VALUE, min_size=1, max_size=3))
def test_any_metadata_values_build_or_raise_a_named_gguf_error(llama_header, changes):
    header = with_metadata(llama_header, **{k.replace(".", "__"): v for k, v in changes.items()})
    try:
        plan = build_plan(header)
    except GGUFError as e:
        assert re.search(r"llama\.[a-z_.]+|tensor '", str(e)), str(e)  # names the key or tensor
        return
    hp = llama.HParams(header, llama.SCHEMA)
    for key, spec in llama.SCHEMA.keys.items():
        assert type(hp[key]) is spec.kind and spec.low <= hp[key] <= spec.high
    assert plan.kv.n_layers == LAYERS and all(isinstance(t, TensorInfo) for t in plan.weights.values())
