"""The page's model cache (web/worker.js): a cached model is used only while it is sound and still
the server's file. The server's file replaced (another ETag and size) is downloaded again; a damaged
cache entry (cut short, not a GGUF file, one the parser rejects) is deleted and replaced by a download.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import LiveServer, live_server, load, wait_ready

from realm_wasm.model_files import chat_model_path, default_model_path

NAME = "model.gguf"
PATH = f"/models/{NAME}"

# page JS: rewrite the cache entry of `url` with what `damage(blob)` makes of its body, keeping the
# entry's headers (its stored size and ETag), as a disk error or an interrupted write would leave it
DAMAGE_ENTRY = """async ([url, damage]) => {
  const cache = await caches.open("realm-models-v1");
  const entry = await cache.match(url);
  const blob = await entry.blob();
  const damaged = {
    cut: () => blob.slice(0, 1 << 20),
    magic: () => new Blob([new Uint8Array([0x47, 0x47, 0x55, 0x58]), blob.slice(4)]),  // GGUX
    version: () => new Blob([blob.slice(0, 4), new Uint8Array([99, 0, 0, 0]), blob.slice(8)]),
  }[damage]();
  await cache.put(url, new Response(damaged, { headers: entry.headers }));
  return damaged.size;
}"""

# page JS: the cache entry of `url`: its body's size, first 4 bytes and stored ETag
CACHE_ENTRY = """async (url) => {
  const entry = await (await caches.open("realm-models-v1")).match(url);
  if (!entry) return null;
  const blob = await entry.blob();
  return { size: blob.size, magic: await blob.slice(0, 4).text(), etag: entry.headers.get("etag") };
}"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "served"
    d.mkdir()
    shutil.copyfile(chat_model_path(), d / NAME)
    return d


@pytest.fixture
def cache_server(site_assets: None, model_dir: Path) -> Iterator[LiveServer]:
    with live_server((model_dir,), NAME) as live:
        yield live


def facts(page) -> tuple[str | None, str | None]:
    info = page.locator("#model-info")
    return info.get_attribute("data-architecture"), info.get_attribute("data-from-cache")


def warning(page) -> str:
    """The page's warning, cleared for the next step."""
    return page.evaluate("""() => {
      const el = document.getElementById("warning");
      const text = el.hidden ? "" : el.textContent;
      el.hidden = true;
      el.textContent = "";
      return text;
    }""")


def test_a_changed_or_damaged_cached_model_is_downloaded_again(
        launch, cache_server: LiveServer, model_dir: Path) -> None:
    served = model_dir / NAME
    page = launch(webgpu=False).new_page()
    page.goto(cache_server.url + "?backend=numpy")
    wait_ready(page)
    assert "WebGPU is not available" in warning(page)  # the browser runs without it: numpy, faster to start
    url = cache_server.url.rstrip("/") + PATH

    def downloads() -> list[tuple[str, int, int]]:
        return [(r.method, r.status, r.body_bytes) for r in cache_server.requests(PATH)]

    def assert_sound_entry() -> None:
        entry = page.evaluate(CACHE_ENTRY, url)
        st = served.stat()
        assert entry == {"size": st.st_size, "magic": "GGUF", "etag": f'"{st.st_size:x}-{st.st_mtime_ns:x}"'}

    size = served.stat().st_size
    assert load(page, PATH) == "loaded", page.inner_text("#error")
    assert facts(page) == ("llama", "false")
    assert_sound_entry()
    # unchanged on the server: a HEAD request says so and the model comes from the cache
    assert load(page, PATH) == "loaded", page.inner_text("#error")
    assert facts(page) == ("llama", "true")
    assert downloads() == [("GET", 200, size), ("HEAD", 200, 0)]
    assert warning(page) == ""

    for damage, why in [("cut", f"1048576 bytes where {size} were stored"),
                        ("magic", "it does not start like a GGUF file"),
                        ("version", "unsupported GGUF version 99")]:
        before = len(downloads())
        page.evaluate(DAMAGE_ENTRY, [url, damage])
        assert load(page, PATH) == "loaded", page.inner_text("#error")
        assert facts(page) == ("llama", "false"), damage
        assert why in warning(page), damage
        assert downloads()[before:][-1] == ("GET", 200, size), damage
        assert_sound_entry()

    # the server's file replaced by another model (another size and ETag): the new one is loaded
    replacement = model_dir / "replacement.part"
    shutil.copyfile(default_model_path(), replacement)
    os.replace(replacement, served)
    assert load(page, PATH) == "loaded", page.inner_text("#error")
    assert facts(page) == ("gemma3", "false")
    assert warning(page) == ""  # a changed file is not a damaged one
    assert downloads()[-2:] == [("HEAD", 200, 0), ("GET", 200, served.stat().st_size)]
    assert_sound_entry()
    assert page.inner_text("#cache-info").startswith("1 cached model")
