#!/usr/bin/env bash
# Realm's part of the lent GPU machine's kit, on top of ../shared/gpu-machine (which brings wgpu-py,
# the server's packages, Chromium and the base model): what Realm's GPU tests and benchmarks also
# need there, in parts that fit one device call's 64 MiB.
#
#   here:    bash scripts/gpu_kit.sh prepare    fills .gpu/extra (test and bench wheels, golden data,
#            wllama, this script), .gpu/pw (Playwright), .gpu/s1 .gpu/s2 (the chat model, SmolLM2)
#   there, after the shared kit's base and parts, one call each, in this order:
#            carry .gpu/extra: bash .gpu/extra/gpu_kit.sh extra
#            carry .gpu/pw:    bash /tmp/realm-kit/gpu_kit.sh pw
#            carry .gpu/s1:    bash /tmp/realm-kit/gpu_kit.sh smol 1
#            carry .gpu/s2:    bash /tmp/realm-kit/gpu_kit.sh smol 2 last
#   then every call: source /tmp/gpu-env.sh (it now also sets REALM_GOLDEN_DIR and LD_LIBRARY_PATH)
set -euo pipefail
models=$HOME/.cache/realm/models
case "$1" in
prepare)
  cd "$(dirname "$0")/.."
  [ -d .gpu/base ] || { echo "run ../shared/gpu-machine/prepare.sh first"; exit 1; }
  rm -rf .gpu/extra .gpu/pw .gpu/s1 .gpu/s2; mkdir -p .gpu/extra/whl .gpu/pw .gpu/s1 .gpu/s2
  wheels() {  # for the GPU machine's CPython 3.12, which has numpy
    .venv/bin/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$@" 2>&1 | { grep -v WARNING || true; }
    rm -f "$1"/numpy-*.whl
  }
  wheels .gpu/extra/whl pytest hypothesis gguf prometheus_client tokenizers openai jsonschema
  wheels .gpu/pw playwright
  cp -r ../shared/golden .gpu/extra/golden
  .venv/bin/python -c "import sys; sys.path[:0] = ['bench', 'e2e']; from bench_browser import install_wllama; install_wllama()"
  tar -C "$models/.." -czf .gpu/extra/wllama.tgz wllama
  cp scripts/gpu_kit.sh .gpu/extra/
  smol=$(.venv/bin/python -c "from realm_wasm.model_files import chat_model_path; print(chat_model_path())")
  split -b 55000000 -d "$smol" .gpu/s1/smol.
  mv .gpu/s1/smol.01 .gpu/s2/
  du -sh .gpu/extra .gpu/pw .gpu/s1 .gpu/s2;;
extra)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/extra/whl/*.whl 2>&1 \
    | { grep -v WARNING || true; }
  rm -rf /tmp/golden /tmp/realm-kit; cp -r .gpu/extra/golden /tmp/golden; cp -r .gpu/extra /tmp/realm-kit
  mkdir -p "$models" && tar -C "$models/.." -xzf .gpu/extra/wllama.tgz
  grep -q REALM_GOLDEN_DIR /tmp/gpu-env.sh \
    || echo "export REALM_GOLDEN_DIR=/tmp/golden LD_LIBRARY_PATH=/tmp/gpu-base/lib" >> /tmp/gpu-env.sh
  echo "extra ready";;
pw)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/pw/*.whl 2>&1 \
    | { grep -v WARNING || true; }
  echo "playwright ready";;
smol)
  mkdir -p /tmp/smol-parts && cp .gpu/s"$2"/* /tmp/smol-parts/
  if [ "${3:-}" = last ]; then
    cat /tmp/smol-parts/smol.* > "$models/smollm2-135m-instruct-q4_1.gguf" && rm -rf /tmp/smol-parts
    sha256sum "$models/smollm2-135m-instruct-q4_1.gguf"
  fi;;
*) echo "usage: gpu_kit.sh prepare | extra | pw | smol N [last]"; exit 2;;
esac
