"""`realm generate` end to end, as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from realm_wasm.model_files import CHAT_MODEL


def realm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "realm_server", *args], capture_output=True, text=True, timeout=300)


def test_generate_answers_paris():
    r = realm("generate", "--prompt", "Question: What is the capital of France?\\nAnswer:", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")
    assert "tok/s" in r.stderr


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    (b"GGUF\x03\0\0\0" + b"\xff" * 16, "absurd tensor count"),
    (b"\x00" * 100, "not a GGUF file"),
])
def test_bad_model_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    r = realm("generate", "--model", str(path), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_invalid_sampling_parameters_are_rejected():
    r = realm("generate", "--prompt", "hi", "--top-p", "0")
    assert r.returncode == 2 and "top_p" in r.stderr


def test_api_keys_for_the_tenants_file():
    digest_of_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2's example
    assert realm("key", "hash", "abc").stdout == digest_of_abc + "\n"
    new = realm("key", "new")
    key, digest = (line.split()[-1] for line in new.stdout.splitlines())
    assert key.startswith("realm-") and len(key) > 40
    assert realm("key", "hash", key).stdout == digest + "\n"


@pytest.mark.parametrize("tenants, host, message", [
    ("[[tenant]\n", "127.0.0.1", "not valid TOML"),
    (None, "0.0.0.0", "127.0.0.1 only"),
])
def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path, tenants, host, message):
    args = ["serve", "--host", host, "--model", str(tmp_path / "never-read.gguf")]
    if tenants is not None:
        (tmp_path / "tenants.toml").write_text(tenants)
        args += ["--tenants", str(tmp_path / "tenants.toml")]
    r = realm(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_plan_prints_the_fused_program_per_layer():
    """The default model: 18 gemma3 layers, 7 kernels each after layer 0 (which also runs its own
    pre-norm); the sliding-window layers say so, the global ones (5, 11, 17) do not."""
    r = realm("plan")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "gemma3: 18 layers, 310 ops -> 131 kernels (storage bindings of 134217728 bytes)"
    assert lines[1] == "prologue: embed x"
    layers = {line.split(":")[0]: line.split(": ", 1)[1].split(" | ") for line in lines[2:-1]}
    assert list(layers) == ["layer 0", "layers 1-4", "layer 5", "layers 6-10", "layer 11", "layers 12-16", "layer 17"]
    assert layers["layers 1-4"] == ["matmul q+k", "matmul v", "rope q,k + norm + kv store", "attention (window 512)",
                                    "matmul o + norm + residual x + norm h", "glu gelu",
                                    "matmul f + norm + residual x + norm h"]
    assert layers["layer 0"] == ["norm h", *layers["layers 1-4"]]
    assert layers["layer 5"][3] == "attention"
    assert lines[-1] == "head: gather xl | norm xl | matmul logits"
    # with adapter slots: A·x once per input of adapted weights (q, k, v read h; gate, up the next h)
    r = realm("plan", "--lora")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[3].split(": ", 1)[1].split(" | ") == [
        "lora A·h", "matmul q+k", "matmul v", "rope q,k + norm + kv store", "attention (window 512)", "lora A·a",
        "matmul o + norm + residual x + norm h", "lora A·h", "glu gelu", "lora A·g",
        "matmul f + norm + residual x + norm h"]


def test_generate_applies_lora_adapters_at_their_scales(tmp_path):
    import numpy as np
    from test_lora import all_projections, make_adapter
    from test_scheduler import write_tiny_model

    from realm_wasm.engine import Engine
    from realm_wasm.gguf import read_gguf
    from realm_wasm.models import build_plan

    model = tmp_path / "tiny.gguf"
    write_tiny_model(model)
    plan = build_plan(read_gguf(model).header)
    rng = np.random.default_rng(3)
    make_adapter(tmp_path / "a.gguf", plan, all_projections(plan, range(plan.kv.n_layers)), 4, rng, alpha=8.0)
    make_adapter(tmp_path / "gemma.gguf", plan, all_projections(plan, [0]), 4, rng, arch="gemma3")
    engine = Engine.load(model, backend="numpy", adapters={"a": tmp_path / "a.gguf"})
    want = "".join(e.text for e in engine.generate("Hello", 6, lora=[("a", 0.5)]))
    assert want != "".join(e.text for e in engine.generate("Hello", 6))
    r = realm("generate", "--model", str(model), "--backend", "numpy", "--prompt", "Hello", "--max-tokens", "6",
              "--lora", f"{tmp_path / 'a.gguf'}:0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "LoRA a.gguf at 0.5" in r.stderr
    r = realm("generate", "--model", str(model), "--backend", "numpy", "--prompt", "Hello",
              "--lora", str(tmp_path / "gemma.gguf"))
    assert r.returncode == 2 and "architecture 'gemma3'" in r.stderr and r.stderr.count("\n") == 1


def test_lora_options_parse_files_scales_and_ids():
    from pathlib import Path

    from realm_server.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "hi", "--lora", "a.gguf", "--lora", "dir/b.gguf:-0.5",
                              "--lora", "C:/lora.gguf"])
    assert args.lora == [(Path("a.gguf"), 1.0), (Path("dir/b.gguf"), -0.5), (Path("C:/lora.gguf"), 1.0)]
    args = parser.parse_args(["serve", "--lora", "style=s.gguf", "--lora", "terse=t.gguf", "--max-adapters", "2"])
    assert (args.lora, args.max_adapters) == ([("style", Path("s.gguf")), ("terse", Path("t.gguf"))], 2)
    for bad in (["--lora", "s.gguf"], ["--max-adapters", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])


def test_generate_with_prompt_lookup_prints_the_same_text(tmp_path):
    """Greedy with --lookup is plain greedy (the engine alone, without speculation, says what); the
    stats line counts the drafts, which the repetitive prompt makes."""
    from test_scheduler import write_tiny_model
    from test_speculative import REPEAT

    from realm_wasm.engine import Engine

    model = tmp_path / "tiny.gguf"
    write_tiny_model(model)
    want = "".join(e.text for e in Engine.load(model, backend="numpy").generate(REPEAT, 40))
    r = realm("generate", "--model", str(model), "--backend", "numpy", "--prompt", REPEAT, "--max-tokens", "40",
              "--lookup", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    drafted, accepted = map(int, re.search(r"drafted (\d+), accepted (\d+)", r.stderr).groups())
    assert drafted >= accepted >= 0 and drafted > 0


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_draft_model_of_another_vocabulary_is_a_one_line_error(tmp_path, command):
    from test_scheduler import write_tiny_model

    model = tmp_path / "tiny.gguf"
    write_tiny_model(model)
    args = ["--prompt", "hi"] if command == "generate" else []
    r = realm(command, "--model", str(model), "--backend", "numpy", "--draft", "gemma-3-270m-q4_k_m", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--draft gemma-3-270m-q4_k_m.gguf: the draft model's vocabulary has 262144 tokens" in r.stderr


def test_model_dir_adds_its_models_to_the_served_ones_in_the_page(tmp_path):
    from realm_server.cli import page_model_dirs
    from realm_server.static import list_models
    from realm_wasm.model_files import BUNDLED, resolve_model

    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    (tmp_path / f"{CHAT_MODEL}").write_bytes(b"GGUF")  # a clash: the served file keeps the name
    served = [resolve_model(name) for name in BUNDLED]
    listed = list_models(page_model_dirs(served, [str(tmp_path)]))
    assert set(listed) == {f"{name}.gguf" for name in BUNDLED} | {"mine.gguf"}
    assert listed[CHAT_MODEL] == resolve_model(CHAT_MODEL.removesuffix(".gguf")).resolve()
    assert listed["mine.gguf"] == (tmp_path / "mine.gguf").resolve()


def test_webgpu_without_wgpu_py_is_a_one_line_error_naming_the_gpu_extra(tmp_path):
    from test_scheduler import write_tiny_model

    model = tmp_path / "tiny.gguf"
    write_tiny_model(model)
    no_wgpu = "import sys; sys.modules['wgpu'] = None; from realm_server.cli import main; main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", no_wgpu, "generate", "--model", str(model), "--prompt", "hi",
                        "--backend", "webgpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "wgpu-py is not installed" in r.stderr and "pip install 'realm[gpu]'" in r.stderr
