"""A bounded sample of the GGUF fuzz harness (tests/gguf_fuzz.py): mutated headers of both bundled
models load or raise a RealmError, within the CPU-time and memory bounds. bench/fuzz_gguf.py runs
100,000 cases of the same; REALM_FUZZ_CASES and REALM_FUZZ_SEED pick another sample here."""

from __future__ import annotations

import dataclasses
import os

import gguf_fuzz as fz
import pytest

from realm_wasm.gguf import parse_header

SAMPLE = int(os.environ.get("REALM_FUZZ_CASES", "2000"))
BASE_SEED = int(os.environ.get("REALM_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def seeds() -> list[fz.Seed]:
    return fz.bundled_seeds()


def unmutated(seed: fz.Seed) -> fz.Case:
    return fz.Case(-1, seed, seed.prefix, seed.file_size, [], [])


def test_seeds_are_the_bundled_models_and_load(seeds):
    names = [s.name for s in seeds]
    assert names[:2] == ["gemma-3-270m", "gemma-3-270m/slim"]
    if fz.smollm_path() is not None:
        assert names[2:] == ["smollm2-135m", "smollm2-135m/slim"]
    for seed in seeds:
        result = fz.run_case(unmutated(seed))
        assert result.outcome == "accepted", result.message
        header = parse_header(seed.prefix, seed.file_size)
        # the harness's own walk of the layout agrees with the parser
        assert [kv.name for kv in seed.layout.kvs] == list(header.metadata)
        assert [t.name for t in seed.layout.tensors] == list(header.tensors)
        if seed.name.endswith("/slim"):
            assert len(header.metadata["tokenizer.ggml.tokens"]) == fz.SLIM_VOCAB
            assert header.tensors["token_embd.weight"].dims[1] == fz.SLIM_VOCAB


def test_mutated_headers_load_or_raise_realm_errors_within_bounds(seeds):
    summary = fz.fuzz(seeds, SAMPLE, BASE_SEED, full_share=0.005)
    assert not summary.failures, fz.format_summary(summary)
    # the sample reaches past the first check: some mutated files load, every layer rejects some
    assert summary.outcomes["accepted"] >= SAMPLE // 50, fz.format_summary(summary)
    assert {"GGUFError", "GGUFNeedMoreData", "TokenizerError"} <= set(summary.outcomes)
    assert set(summary.by_kind) == set(fz.KINDS)


def test_the_harness_reports_crashes_hangs_and_unsound_files(seeds, monkeypatch):
    case = unmutated(seeds[1])

    def crash(prefix, file_size):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(fz, "load", crash)
    result = fz.run_case(case)
    assert result.outcome == "CRASH ZeroDivisionError" and result.failed(fz.peak_rss())

    def hang(prefix, file_size):
        while True:
            pass

    monkeypatch.setattr(fz, "load", hang)
    monkeypatch.setattr(fz, "HANG_S", 0.2)
    result = fz.run_case(case)
    assert result.outcome == "HANG" and result.failed(fz.peak_rss())

    def hog(prefix, file_size):  # writes every page, so the memory is resident; enough to raise
        # the process's peak (the high-water mark earlier tests left) by more than the bound
        size = fz.peak_rss() + 4 * fz.MEMORY_BOUND
        assert len(b"\1" * size) == size

    monkeypatch.setattr(fz, "load", hog)
    monkeypatch.setattr(fz, "HANG_S", 30.0)
    monkeypatch.setattr(fz, "MEMORY_BOUND", 16 << 20)
    baseline = fz.peak_rss()
    result = fz.run_case(case)
    assert result.outcome == "accepted" and result.raised_peak and result.failed(baseline)
    # a later case is not blamed for a peak it did not raise
    assert not dataclasses.replace(result, raised_peak=False).failed(baseline)
    monkeypatch.undo()

    # a file whose tensors overlap is a failure of the loader if it is accepted
    header = parse_header(case.prefix, case.file_size)
    first, second = list(header.tensors.values())[:2]
    overlapping = dataclasses.replace(header, tensors={**header.tensors, second.name: dataclasses.replace(
        second, offset=first.offset)})
    with pytest.raises(AssertionError, match="overlaps"):
        fz.check_sound(overlapping, case.file_size, 1, 1)
    assert dataclasses.replace(fz.run_case(case), cpu_s=fz.CPU_BOUND_S + 1).failed(fz.peak_rss())
