"""Every architecture family against Hugging Face `transformers`: tiny random-weight models whose
reference logits (float32) bench/make_arch_refs.py computed once into tests/data/arch_<family>.npz.
The test rebuilds the same weights from the stored seed and config (tests/arch_families.py), writes
them to GGUF as llama.cpp's converter does, and runs Realm's plan on numpy and on the GPU executor.

Tolerance: float32 weights and math throughout, so logits agree to 1e-3 of the largest reference
logit (the KV cache is float16 as in llama.cpp, which is the largest source of difference)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from arch_families import FAMILIES, add_tokenizer, hf_weights, write_gguf
from gguf_split import write_split

from realm_wasm.cpu import CpuExecutor
from realm_wasm.gguf import read_gguf
from realm_wasm.lora import BadAdapter, read_adapter
from realm_wasm.models import build_plan
from realm_wasm.plan import Batch, lora_table

DATA = Path(__file__).parent / "data"
RTOL = 1e-3  # of the largest |logit| of the reference


def load(family: str, tmp_path: Path):
    ref = np.load(DATA / f"arch_{family}.npz")
    cfg = json.loads(str(ref["config"]))
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, family, cfg, hf_weights(family, cfg, int(ref["seed"])))
    model = read_gguf(path)
    return model, build_plan(model.header), ref["tokens"].tolist(), ref["logits"]


def weight_bytes(model):
    return lambda t: model.data[t.offset:t.offset + t.nbytes]


def assert_close(logits: np.ndarray, want: np.ndarray) -> None:
    err = np.abs(logits - want).max() / np.abs(want).max()
    assert err <= RTOL, f"max |Δlogit| is {err:.2e} of the largest logit (allowed {RTOL})"
    assert (logits.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_logits_match_transformers(family, tmp_path):
    model, plan, tokens, want = load(family, tmp_path)
    assert plan.arch == FAMILIES[family][2]
    ex = CpuExecutor(plan, weight_bytes(model), n_ctx=64)
    assert_close(ex.forward(Batch.for_sequence(tokens, 0, all_logits=True)), want)
    # one token at a time through the KV cache: the sliding windows (5) are crossed at decode too
    ex = CpuExecutor(plan, weight_bytes(model), n_ctx=64)
    steps = [ex.forward(Batch.for_sequence([t], i))[0] for i, t in enumerate(tokens)]
    assert_close(np.stack(steps), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_logits_match_transformers(family, tmp_path, gpu):
    from realm_wasm.gpu.executor import GpuExecutor

    model, plan, tokens, want = load(family, tmp_path)
    ex = GpuExecutor(plan, weight_bytes(model), device=gpu, n_ctx=64, max_tokens=16)
    assert_close(ex.forward(Batch.for_sequence(tokens[:8], 0, all_logits=True)), want[:8])
    steps = [ex.forward(Batch.for_sequence([t], 8 + i))[0] for i, t in enumerate(tokens[8:])]
    assert_close(np.stack(steps), want[8:])


class LiveBuffers:
    """The test device, keeping count of the buffers alive (buffer -> label, bytes); holding each
    buffer keeps a freed one's id from being reused for another while it is counted."""

    def __init__(self, gpu) -> None:
        self._gpu, self.live = gpu, {}

    def create_buffer(self, size: int, usage: int, label: str = ""):
        buf = self._gpu.create_buffer(size, usage, label)
        self.live[buf] = (label, size)
        return buf

    def destroy_buffer(self, buf) -> None:
        del self.live[buf]
        self._gpu.destroy_buffer(buf)

    def __getattr__(self, name: str):
        return getattr(self._gpu, name)


def test_phi3_fused_tensors_stream_into_the_gpu_as_the_page_loads_them(tmp_path, gpu):
    """The page streams the file into device buffers (StreamedWeights); phi3's q, k, v and gate, up
    are row views of two file tensors, copied out of them on the device, which then frees the file
    tensors: the weights take the GPU memory of the file's matrices once, not twice."""
    from realm_wasm.gpu.executor import GpuExecutor
    from realm_wasm.gpu.weights import StreamedWeights

    model, plan, tokens, want = load("phi3", tmp_path)
    device = LiveBuffers(gpu)
    store = StreamedWeights(device, model.header.tensors.values())
    data = model.path.read_bytes()
    for at in range(0, len(data), 10_001):  # pieces that end anywhere, as a download's do
        store.feed(at, data[at:at + 10_001])
    fused = {t.name for t in model.header.tensors.values() if t.name.endswith(("attn_qkv.weight", "ffn_up.weight"))}
    matrices = {t.name: t.nbytes for t in model.header.tensors.values() if len(t.dims) == 2}
    ex = GpuExecutor(plan, store, device=device, n_ctx=64, max_tokens=16)
    # a weight's buffers are labelled NAME[row0:row1]; a view's NAME is the file tensor's name + [part];
    # weights joined on the device (q + k, gate + up) are labelled with their plan names
    names = set(matrices) | {n for name, t in plan.weights.items() if len(t.dims) == 2 for n in (name, t.name)}
    weights = [(label.rsplit("[", 1)[0], size) for label, size in device.live.values()]
    weights = [(name, size) for name, size in weights if set(name.split(" + ")) <= names]
    assert not [name for name, _ in weights if name in fused]
    assert sum(size for _, size in weights) == sum(matrices.values())
    assert_close(ex.forward(Batch.for_sequence(tokens, 0, all_logits=True)), want)


def phi3_adapter(tmp_path: Path, rank: int = 3, alpha: float = 6.0):
    """A LoRA adapter on phi3's fused tensors (attn_qkv, ffn_up: what PEFT's qkv_proj and gate_up_proj
    become), and the oracle: the transformers weights with scale · B·A · alpha / rank merged in."""
    ref = np.load(DATA / "arch_phi3.npz")
    cfg = json.loads(str(ref["config"]))
    weights = hf_weights("phi3", cfg, int(ref["seed"]))
    rng = np.random.default_rng(11)
    w = gguf.GGUFWriter(str(tmp_path / "phi3-lora.gguf"), "phi3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    deltas = {}
    for i in range(cfg["num_hidden_layers"]):
        for hf, ours in (("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")):
            n_out, n_in = weights[f"model.layers.{i}.{hf}.weight"].shape
            a = (rng.standard_normal((rank, n_in)) * 0.3).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * 0.3).astype(np.float32)
            w.add_tensor(f"blk.{i}.{ours}.weight.lora_a", a)
            w.add_tensor(f"blk.{i}.{ours}.weight.lora_b", b)
            deltas[f"model.layers.{i}.{hf}.weight"] = b.astype(np.float64) @ a * (alpha / rank)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def merged(scale: float) -> CpuExecutor:
        path = tmp_path / f"phi3-merged-{scale}.gguf"
        write_gguf(path, "phi3", cfg, {name: (w + scale * deltas[name]).astype(np.float32) if name in deltas else w
                                       for name, w in weights.items()})
        m = read_gguf(path)
        return CpuExecutor(build_plan(m.header), weight_bytes(m), n_ctx=64)
    return tmp_path / "phi3-lora.gguf", merged


def test_a_phi3_adapter_on_its_fused_tensors_matches_merged_weights(tmp_path, gpu):
    """An adapter names the file's attn_qkv and ffn_up; the plan reads them as q, k, v and gate, up
    row views, each of which gets its rows of B. Held to the model with B·A merged in (numpy and GPU),
    one sequence with the adapter at 0.7 and one without in the same step."""
    from realm_wasm.gpu.executor import GpuExecutor

    model, plan, tokens, _ = load("phi3", tmp_path)
    path, merged = phi3_adapter(tmp_path)
    adapter = read_adapter(path, plan)
    assert {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"} <= {n.split(".")[2] for n in adapter.pairs}
    n = len(tokens)
    step = Batch(np.array(tokens * 2, np.int32), np.tile(np.arange(n, dtype=np.int32), 2),
                 np.repeat(np.arange(2, dtype=np.int32), n), np.arange(2 * n, dtype=np.int32),
                 *lora_table([((0, 0.7),)] * n + [()] * n))
    want = [merged(0.7).forward(Batch.for_sequence(tokens, 0, all_logits=True)),
            merged(0.0).forward(Batch.for_sequence(tokens, 0, all_logits=True))]
    assert np.abs(want[0] - want[1]).max() > 0.05 * np.abs(want[1]).max()  # the adapter matters
    for ex in (CpuExecutor(plan, weight_bytes(model), n_slots=2, n_ctx=64, max_adapters=1),
               GpuExecutor(plan, weight_bytes(model), device=gpu, n_slots=2, n_ctx=64, max_tokens=32,
                           max_adapters=1, max_lora_rank=4)):
        ex.set_adapter(0, adapter)
        got = ex.forward(step)
        assert_close(got[:n], want[0])
        assert_close(got[n:], want[1])


def test_an_adapter_naming_phi3s_views_or_the_wrong_rows_is_refused(tmp_path):
    model, plan, _, _ = load("phi3", tmp_path)
    qkv = model.header.tensors["blk.0.attn_qkv.weight"]
    n_in, n_out = qkv.dims
    for name, rows, match in (("blk.0.attn_q.weight", 8, "'blk.0.attn_q.weight', which this phi3 model does not"),
                              ("blk.0.attn_qkv.weight", n_out - 1, f"needs \\[2, {n_out}\\]")):
        w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "phi3")
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_tensor(name + ".lora_a", np.zeros((2, n_in), np.float32))
        w.add_tensor(name + ".lora_b", np.zeros((rows, 2), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(BadAdapter, match=match):
            read_adapter(tmp_path / "bad.gguf", plan)


def realm_generate(model: Path) -> subprocess.CompletedProcess:
    args = ["generate", "--model", str(model), "--backend", "numpy", "--prompt", "hi", "--max-tokens", "3"]
    return subprocess.run([sys.executable, "-m", "realm_server", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2"])
def test_realm_generate_runs_the_family(family, tmp_path):
    model, plan, _, _ = load(family, tmp_path)
    r = realm_generate(model.path)
    assert r.returncode == 0, r.stderr
    assert "3 tokens" in r.stderr


def test_an_unsupported_architecture_or_tensor_type_is_a_one_line_error(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    add_tokenizer(w, 8)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = realm_generate(path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "unsupported architecture 'mamba'" in r.stderr

    model, _, _, _ = load("qwen2", tmp_path)
    data = bytearray(model.path.read_bytes())
    name = b"token_embd.weight"  # its table entry: name, n_dims (u32), dims (u64 each), then the type (u32)
    at = data.index(name) + len(name)
    struct.pack_into("<I", data, at + 4 + 8 * struct.unpack_from("<I", data, at)[0], 99)
    (tmp_path / "odd.gguf").write_bytes(bytes(data))
    r = realm_generate(tmp_path / "odd.gguf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "tensor 'token_embd.weight': unknown GGML tensor type id 99" in r.stderr


def test_a_split_model_loads_from_its_first_shard_with_the_same_logits(tmp_path):
    from realm_wasm.gguf import GGUFError

    model, plan, tokens, _ = load("qwen2", tmp_path)
    batch = Batch.for_sequence(tokens, 0, all_logits=True)
    want = CpuExecutor(plan, model.tensor_bytes, n_ctx=64).forward(batch)
    first = write_split(model.path, tmp_path, 3, "tiny")
    split = read_gguf(first)
    assert split.metadata["split.count"] == 3 and list(split.tensors) == list(model.tensors)
    got = CpuExecutor(build_plan(split.header), split.tensor_bytes, n_ctx=64).forward(batch)
    np.testing.assert_array_equal(got, want)
    r = realm_generate(first)
    assert r.returncode == 0, r.stderr
    from realm_server.service import load_model
    from realm_server.static import list_models, page_config

    assert load_model(first, backend="numpy", n_ctx=64, n_slots=1).name == "tiny"  # not "tiny-00001-of-00003"
    served = list_models((tmp_path,))  # every shard is served; the page lists the model once, by its first
    assert {f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)} <= set(served)
    listed = [m for m in page_config("", [], "", served, "/models/", "")["models"] if "-of-" in m["name"]]
    sizes = sum((tmp_path / f"tiny-0000{i}-of-00003.gguf").stat().st_size for i in (1, 2, 3))
    assert listed == [{"name": first.name, "url": f"/models/{first.name}", "size": sizes, "files": 3}]

    (tmp_path / "tiny-00003-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match="shard 3 of 3 is missing .*tiny-00003-of-00003.gguf"):
        read_gguf(first)
    r = realm_generate(first)
    assert r.returncode == 2 and "tiny-00003-of-00003.gguf" in r.stderr and "Traceback" not in r.stderr


class JsChunk:
    """What worker.js hands the page's sink: a Uint8Array's JsProxy (length, len, to_bytes, assign_to)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def __len__(self) -> int:
        return self.length

    def to_bytes(self) -> bytes:
        return self.data

    def assign_to(self, view: memoryview) -> None:
        view[:] = self.data


def page_host():
    """web/realm_web_host.py, the worker's Python side, imported natively (numpy executor)."""
    import importlib.util

    path = Path(__file__).parents[1] / "web" / "realm_web_host.py"
    spec = importlib.util.spec_from_file_location("realm_web_host", path)
    host = sys.modules["realm_web_host"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(host)
    host.CPU_KERNEL = False  # the SIMD kernel is WebAssembly: the page's own
    return host


def stream(sink, files: list[Path], chunk: int = 4093, sized: bool = True) -> None:
    """Drive the sink as worker.js does: each file begun (with its size, as Content-Length gives
    it, or none), fed in chunks, done."""
    for path in files:
        data = path.read_bytes()
        sink.begin(len(data) if sized else None)
        for at in range(0, len(data), chunk):
            sink.feed(JsChunk(data[at:at + chunk]))
        sink.file_done()


def test_the_page_streams_a_split_model_from_its_first_shard_url(tmp_path):
    import asyncio

    from realm_wasm.gguf import GGUFError

    host = page_host()
    model, plan, tokens, _ = load("qwen2", tmp_path)
    batch = Batch.for_sequence(tokens, 0, all_logits=True)
    want = CpuExecutor(plan, model.tensor_bytes, n_ctx=64).forward(batch)
    first = write_split(model.path, tmp_path, 3, "tiny")
    shards = sorted(tmp_path.glob("tiny-*-of-00003.gguf"))
    url = f"https://example.com/models/{first.name}?v=2"

    sink = host.ModelSink(url, "numpy", None, "")
    assert sink.more_files() is None  # not known before the first header
    stream(sink, shards[:1])
    assert sink.more_files() == [f"https://example.com/models/tiny-0000{i}-of-00003.gguf?v=2" for i in (2, 3)]
    stream(sink, shards[1:])
    loaded = asyncio.run(sink.end())
    assert loaded.size == sum(p.stat().st_size for p in shards) and list(loaded.header.tensors) == list(model.tensors)
    np.testing.assert_array_equal(loaded.engine.executor.forward(batch), want)
    one = host.ModelSink(f"https://example.com/{model.path.name}", "numpy", None, "")
    stream(one, [model.path], sized=False)
    assert one.more_files() == []
    np.testing.assert_array_equal(asyncio.run(one.end()).engine.executor.forward(batch), want)

    def fails(files: list[Path], match: str, url: str = url, sized: bool = True) -> None:
        sink = host.ModelSink(url, "numpy", None, "")
        with pytest.raises(GGUFError, match=match):
            stream(sink, files, sized=sized)
            asyncio.run(sink.end())

    fails([shards[0], shards[2]], r"shard 2 of 3 \(tiny-00002-of-00003.gguf\) is not shard 2 of 3")
    fails([shards[1]], r"tiny-00002-of-00003.gguf is shard 2 of a split model: open its first shard",
          url=f"https://example.com/models/{shards[1].name}")
    fails(shards[:2], r"split model shard 1 of 3 \(tiny-00001-of-00003.gguf\): 2 of its 3 files were read")
    (tmp_path / "cut.gguf").write_bytes(shards[1].read_bytes()[:-100])
    fails([shards[0], tmp_path / "cut.gguf"], r"shard 2 of 3 \(tiny-00002-of-00003.gguf\): tensor .* runs past the end")
    fails([shards[0], tmp_path / "cut.gguf"], r"shard 2 of 3 \(tiny-00002-of-00003.gguf\): truncated GGUF", sized=False)
