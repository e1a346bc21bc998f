#!/usr/bin/env bash
# Build llama.cpp (CPU only, Release) from the source vendored in the llama-cpp-python sdist on PyPI,
# outside the repository: llama.cpp is a peer we measure against, never part of hybridlm.
#
#   bash benchmarks/build_llama_cpp.sh [DEST]      # DEST defaults to ~/.cache/hybridlm/llama.cpp
#
# Leaves DEST/src (the vendored llama.cpp tree with convert_hf_to_gguf.py and gguf-py) and
# DEST/build/bin/{llama-bench,llama-quantize,llama-cli,llama-server}. The benchmarks find it there (or via
# --llama-cpp DEST). TARGETS="llama-bench" builds fewer.
set -euo pipefail

DEST="${1:-${HYBRIDLM_LLAMA_CPP:-$HOME/.cache/hybridlm/llama.cpp}}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [ ! -f "$DEST/src/convert_hf_to_gguf.py" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # the ordinary pip client, source distribution only: the sdist carries vendor/llama.cpp
    python -m pip download --no-deps --no-binary :all: --dest "$tmp" llama-cpp-python
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$DEST/src"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$DEST/src"
    basename "$tmp"/llama_cpp_python-*.tar.gz .tar.gz > "$DEST/SOURCE"
fi

# The benchmark, quantizer, CLI and server tools; no network client code (OpenSSL/curl), no tests.
# GGML_NATIVE builds for this CPU's instruction set (AVX-512 / BF16 / AMX where present).
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
TARGETS="${TARGETS:-llama-bench llama-quantize llama-cli llama-server}"
# shellcheck disable=SC2086
cmake --build "$DEST/build" --config Release -j "$JOBS" --target $TARGETS

echo "built $TARGETS in $DEST/build/bin from $(cat "$DEST/SOURCE" 2>/dev/null || echo 'existing source')"
