"""`realm generate` end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def realm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "realm_wasm", *args], capture_output=True, text=True, timeout=300)


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
