"""A split model (llama.cpp's gguf-split shards, NAME-0000i-of-0000N.gguf) in the page: loaded from
its first shard's URL on WebGPU and on numpy, each shard cached, the same answers as the one-file
model, and a missing shard named before the others have downloaded."""

from __future__ import annotations

from pathlib import Path

from harness import QUESTION, SPLIT_MODEL, chat, float32_matmuls, load, wait_ready

SHARDS = [SPLIT_MODEL.replace("-00001-", f"-0000{i}-") for i in (1, 2, 3)]
TOKENS = 8


def gets(server, name: str) -> list[tuple[int, int]]:
    """(status, body bytes) of every GET of /models/NAME so far."""
    return [(r.status, r.body_bytes) for r in server.requests(f"/models/{name}") if r.method == "GET"]


def facts(page) -> tuple[str, ...]:
    info = page.locator("#model-info")
    return tuple(info.get_attribute(f"data-{key}") for key in ("backend", "tensor-count", "from-cache"))


def test_a_split_model_answers_as_its_one_file_does_on_webgpu_and_numpy(
        open_page, server, extra_models: Path, chat_model: Path) -> None:
    page = open_page("?backend=webgpu")
    wait_ready(page)
    sizes = [(extra_models / name).stat().st_size for name in SHARDS]
    option = page.locator(f"#model-select option[value='/models/{SPLIT_MODEL}']").inner_text()
    assert "3 files" in option, option  # listed once, by its first shard
    assert page.locator("#model-select option[value*='-00002-of-']").count() == 0

    assert load(page, f"/models/{chat_model.name}") == "loaded", page.inner_text("#error")
    whole = chat(page, QUESTION, TOKENS)["token_ids"]
    backend, tensors, _ = facts(page)
    assert backend == "webgpu" and len(whole) == TOKENS

    assert load(page, f"/models/{SPLIT_MODEL}") == "loaded", page.inner_text("#error")
    assert facts(page) == ("webgpu", tensors, "false")
    assert int(page.get_attribute("#model-info", "data-bytes")) == sum(sizes)
    assert [gets(server, name) for name in SHARDS] == [[(200, size)] for size in sizes]
    assert "100.0%" in page.inner_text("#progress-text")
    page.click("#new-chat")
    assert chat(page, QUESTION, TOKENS)["token_ids"] == whole

    # numpy, from the browser cache this time: every shard only asked whether it is still the server's
    page.select_option("#backend", "numpy")
    float32_matmuls(page)
    assert load(page, f"/models/{chat_model.name}") == "loaded", page.inner_text("#error")
    page.click("#new-chat")
    whole = chat(page, QUESTION, TOKENS)["token_ids"]
    assert load(page, f"/models/{SPLIT_MODEL}") == "loaded", page.inner_text("#error")
    assert facts(page) == ("numpy", tensors, "true")
    assert [gets(server, name) for name in SHARDS] == [[(200, size)] for size in sizes]
    page.click("#new-chat")
    assert chat(page, QUESTION, TOKENS)["token_ids"] == whole
    assert page.inner_text("#cache-info").startswith("2 cached models")  # the split one counts once


def test_a_missing_shard_is_named_before_the_first_has_downloaded(page, server, extra_models: Path) -> None:
    wait_ready(page)
    assert load(page, "/models/gone-00001-of-00003.gguf") == "failed"
    assert page.get_attribute("#error", "data-code") == "bad-model"
    text = page.inner_text("#error")
    assert "shard 2 of 3 is missing" in text and "gone-00002-of-00003.gguf" in text, text
    size = (extra_models / "gone-00001-of-00003.gguf").stat().st_size
    assert [status for status, _ in gets(server, "gone-00001-of-00003.gguf")] == [200]
    assert all(sent < size // 2 for _, sent in gets(server, "gone-00001-of-00003.gguf"))
    assert not page.is_disabled("#load")
