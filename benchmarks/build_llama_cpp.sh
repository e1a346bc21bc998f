#!/usr/bin/env bash
# Build llama.cpp (CPU only, Release) from the source vendored in the llama-cpp-python sdist on PyPI,
# outside the repository: llama.cpp is a peer we measure against, never part of hybridlm.
#
#   bash benchmarks/build_llama_cpp.sh [DEST]      # DEST defaults to ~/.cache/hybridlm/llama.cpp
#
# Leaves DEST/src (the vendored llama.cpp tree with convert_hf_to_gguf.py and gguf-py) and
# DEST/build/bin/llama-bench. benchmarks/cpu_bench.py finds it there (or via --llama-cpp DEST).
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

# Only the benchmark tool is needed; no network code (OpenSSL/curl), no tests, no server.
# GGML_NATIVE builds for this CPU's instruction set (AVX-512 / BF16 / AMX where present).
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
cmake --build "$DEST/build" --config Release -j "$JOBS" --target llama-bench

echo "built $DEST/build/bin/llama-bench from $(cat "$DEST/SOURCE" 2>/dev/null || echo 'existing source')"
