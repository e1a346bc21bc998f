#!/usr/bin/env bash
# Build llama.cpp (CPU only, Release) from the source vendored in the llama-cpp-python sdist on PyPI,
# outside the repository: llama.cpp is a peer we measure against, never part of hybridlm.
#
#   bash benchmarks/build_llama_cpp.sh [DEST]      # DEST defaults to ~/.cache/hybridlm/llama.cpp
#
# Leaves DEST/src (the vendored llama.cpp tree with convert_hf_to_gguf.py and gguf-py) and
# DEST/build/bin/{llama-bench,llama-quantize,llama-cli,llama-server}. The benchmarks find it there (or via
# --llama-cpp DEST). TARGETS="llama-bench" builds fewer. On a CPU with AMX, a second build without it:
#   NO_AMX=1 TARGETS=llama-bench bash benchmarks/build_llama_cpp.sh ~/.cache/hybridlm/llama.cpp-noamx
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
# GGML_NATIVE builds for this CPU's instruction set (AVX-512 / BF16 / AMX where present). NO_AMX=1 builds
# for the same instruction set without ggml's AMX backend, whose matrix products crash on some Sapphire
# Rapids machines (ggml-org/llama.cpp#20824, seen here: llama-bench -p 64 segfaults in
# ggml_backend_amx_mul_mat): every other extension this CPU has stays on.
ISA=(-DGGML_NATIVE=ON)
if [ "${NO_AMX:-0}" = 1 ]; then
    flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
    has() { case "$flags" in *" $1 "*) echo ON;; *) echo OFF;; esac; }
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
         -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
         -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
         -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF
TARGETS="${TARGETS:-llama-bench llama-quantize llama-cli llama-server}"
# shellcheck disable=SC2086
cmake --build "$DEST/build" --config Release -j "$JOBS" --target $TARGETS

echo "built $TARGETS in $DEST/build/bin from $(cat "$DEST/SOURCE" 2>/dev/null || echo 'existing source')"
