# Sourced by the device scripts: build llama-quantize on the GPU machine from the trimmed llama.cpp sources that
# `merge_device.sh pack` makes (llama.cpp as a subproject with llama-quantize its only tool).
#
#   build_quantize SRC_TAR LOG [JOBS] [TIMEOUT_S] [NICE]
#     into /tmp/lq/build/bin (the tool and its shared libraries); prints the build's wall seconds, returns 1 when
#     cmake or ninja fails or the build outlasts TIMEOUT_S (default 300)
build_quantize() {
  local src=$1 log=$2 jobs=${3:-$(nproc)} limit=${4:-300} niceness=${5:-0} t0
  rm -rf /tmp/lq && mkdir -p /tmp/lq && tar -xJf "$src" -C /tmp/lq
  t0=$(date +%s.%N)
  cmake -S /tmp/lq -B /tmp/lq/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CCACHE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON >"$log" 2>&1 \
    && timeout "$limit" nice -n "$niceness" ninja -C /tmp/lq/build -j "$jobs" llama-quantize >>"$log" 2>&1 \
    || return 1
  python3 -c "import time; print(f'{time.time() - $t0:.1f}')"
}
