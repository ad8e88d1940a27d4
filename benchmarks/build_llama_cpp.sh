#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-quantize, llama-imatrix, llama-perplexity) from the llama.cpp that
# llama-cpp-python's source distribution vendors, into .bench/llama-build/bin; the source stays at
# .bench/llama.cpp-src (convert_hf_to_gguf.py, convert_lora_to_gguf.py). The benchmarks compare against these.
# SOURCE_ONLY=1 fetches the source and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${JOBS:-$(nproc)}"
if [ ! -f .bench/llama.cpp-src/CMakeLists.txt ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  mkdir -p .bench
  rm -rf .bench/llama.cpp-src
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp .bench/llama.cpp-src
  rm -rf "$tmp"
fi
[ "${SOURCE_ONLY:-0}" = 1 ] && exit 0
cmake -S .bench/llama.cpp-src -B .bench/llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
cmake --build .bench/llama-build -j "$jobs" --target llama-quantize llama-imatrix llama-perplexity
ls .bench/llama-build/bin
