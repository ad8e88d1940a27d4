#!/usr/bin/env bash
# The Llama-3.1-8B-shaped benchmarks on a GPU machine that starts bare, one invocation per call, inside a budget.
#
#   bash benchmarks/device_8b.sh pack      (here) fill .bench/dev with what the machine lacks: the gguf wheel,
#                                          SmolLM2's tokenizer files, Dolly records 1-1500, wiki.valid.raw,
#                                          llama-quantize's sources and llama.cpp's converter (about 7 MB)
#   BUDGET=S bash benchmarks/device_8b.sh STEP...
#                                          (there, carrying .bench/dev) install quantforge and gguf once per
#                                          machine, start the llama-quantize build in the background (nice 19),
#                                          then run the steps in order; each stops at its limit (LIMIT_<STEP>,
#                                          seconds) or when the budget (default 570 s from the start) runs out,
#                                          and a step is skipped when less than MIN_S (60) seconds are left
# Steps (checkpoint and calibration folders in /tmp/l8b, shared by the steps and by later calls on a warm machine):
#   rounding    rounding_speed.py --stages hessians,rtn,gptq     gptq  rounding_speed.py --stages gptq
#   tune        rounding_speed.py --stages tune (XᵀX made first when missing)
#   calibrate   calibrate_speed.py                               sequential  rounding_speed.py --stages sequential
#   placement   codec_placement.py (calibration's round trips: as placed, GPU codec, host C kernels)
#   gpu-tests   the CUDA-only calibration tests (model residency, GPU round trips equal the host's)
#   compile     compile_time.py: each GPU quantize kernel's first call on an empty Triton cache; with
#               $DEV/k45-base.py present (`git show REV:kernels/k45.py > .bench/dev/k45-base.py`) also that
#               revision's Q4_K/Q5_K kernels, bytes checked
#   export-imatrix  export_speed.py q4_k_m with a synthetic imatrix, cold page cache and an empty Triton cache (a
#               fresh machine's first `quantize --imatrix`), then warm; no llama.cpp anchor
#   export-cpu  export_speed.py --device cpu vs llama.cpp's two steps on all cores (q4_k_m)
#   export-gpu  export_speed.py on the GPU (q4_k_m, q6_k, q8_0; cold q4_k_m) vs llama.cpp's two steps
#   qlora-gguf  qlora.py --gguf at 2048 x 1 and x 8, three timed runs per arm, batch 1 profiled
# The XᵀX file (16 GB) and the sequential statistics (33 GB) do not fit the disk together with the checkpoint and
# llama.cpp's bf16 file: sequential and the export steps delete the XᵀX file first.
set -uo pipefail
cd "$(dirname "$0")/.."
DEV=.bench/dev
W=/tmp/l8b
export PYTHONUNBUFFERED=1

if [ "${1:-}" = pack ]; then
  set -e
  mkdir -p $DEV/tok
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d $DEV gguf==0.19.0
  fix=$(.venv/bin/quantforge fixture smollm2 --quiet)
  for f in tokenizer.json tokenizer_config.json config.json generation_config.json chat_template.jinja; do
    cp "$fix/$f" $DEV/tok/
  done
  data=$(cd .. && pwd)/shared/data
  head -n 1500 "$data/dolly/dolly_5k.jsonl" > $DEV/dolly_1500.jsonl
  cp "$data/wikitext-2/wiki.valid.raw" $DEV/
  SOURCE_ONLY=1 bash benchmarks/build_llama_cpp.sh
  MB=.bench/mb bash benchmarks/merge_device.sh pack >/dev/null
  cp .bench/mb/t4/llama-quantize-src.tar.xz $DEV/
  (cd .bench/llama.cpp-src && tar -cJf - convert_hf_to_gguf.py conversion gguf-py) > $DEV/llama-py.tar.xz
  du -sh $DEV
  exit 0
fi

T0=$(date +%s)
BUDGET=${BUDGET:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/_llama_quantize.sh
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

run_step() {  # name default-limit command...
  local name=$1 limit=$2 l var
  shift 2
  var="LIMIT_${name//-/_}"
  limit=${!var:-$limit}
  l=$(left)
  if [ "$l" -lt "${MIN_S:-60}" ]; then say "SKIP $name ($l s left)"; return 0; fi
  [ "$limit" -gt "$l" ] && limit=$l
  say "START $name (limit $limit s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  say "END $name rc=${PIPESTATUS[0]}"
}

build_llama() {  # llama-quantize into .bench/llama-build/bin and the converter into .bench/llama.cpp-src
  mkdir -p .bench/llama.cpp-src && tar -xJf $DEV/llama-py.tar.xz -C .bench/llama.cpp-src
  build_quantize $DEV/llama-quantize-src.tar.xz /tmp/llama-build.log 6 400 19 >/tmp/lq-build-s \
    || { echo failed >/tmp/lq-seconds; return 1; }
  mkdir -p .bench/llama-build && rm -rf .bench/llama-build/bin && cp -r /tmp/lq/build/bin .bench/llama-build/bin
  mv /tmp/lq-build-s /tmp/lq-seconds
}

wait_llama() {
  while [ ! -f /tmp/lq-seconds ] && pgrep -x ninja >/dev/null; do sleep 2; done
  [ -x .bench/llama-build/bin/llama-quantize ] || build_llama
  say "llama-quantize build: $(cat /tmp/lq-seconds) s (nice 19, 6 jobs)"
}

if [ ! -f /tmp/qf-installed ]; then
  say "fresh machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -m pip install -q --no-index --no-deps $DEV/gguf-*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/pip.log 2>&1 \
    || { tail -20 /tmp/pip.log; exit 5; }
  mkdir -p /tmp/tok && cp $DEV/tok/* /tmp/tok/
  mkdir -p .bench/qlora/smollm2 && cp $DEV/tok/* .bench/qlora/smollm2/ && cp $DEV/dolly_1500.jsonl .bench/qlora/
  python3 -c "import importlib.util as u, torch, triton; print('C quantizers', u.find_spec('quantforge.kernels._cquant') \
is not None, 'torch', torch.__version__, 'triton', triton.__version__)"
  touch /tmp/qf-installed
  say "installed"
fi
# steps that time only quantforge (calibrate, rounding, tune) leave the CPU to it: NO_LLAMA=1 skips the build
[ -n "${NO_LLAMA:-}" ] || [ -x .bench/llama-build/bin/llama-quantize ] || [ -f /tmp/lq-seconds ] \
  || pgrep -x ninja >/dev/null || (build_llama >/dev/null 2>&1 &)

A8=(--dir $W --tokenizer /tmp/tok)
D8=(--data $DEV/wiki.valid.raw)
RS=(python3 -P benchmarks/rounding_speed.py "${A8[@]}" "${D8[@]}")
for s in "$@"; do
  case $s in
    rounding) run_step rounding 330 "${RS[@]}" --stages hessians,rtn,gptq ;;
    gptq) run_step gptq 300 "${RS[@]}" --stages gptq ;;
    tune)
      st=tune; [ -f $W/cal-hessians/hessians.safetensors ] || st=hessians,tune
      run_step tune 420 "${RS[@]}" --stages $st ;;
    calibrate) run_step calibrate 500 python3 -P benchmarks/calibrate_speed.py "${A8[@]}" "${D8[@]}" ;;
    placement) run_step placement 150 python3 -P benchmarks/codec_placement.py ;;
    gpu-tests) run_step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/calibration/test_runner.py \
      tests/calibration/test_sensitivity.py -k gpu ;;
    compile)
      base=(); [ -f $DEV/k45-base.py ] && base=(--baseline $DEV/k45-base.py)
      run_step compile 300 python3 -P benchmarks/compile_time.py "${base[@]}" ;;
    export-imatrix)
      run_step export-imatrix 200 env TRITON_CACHE_DIR="$(mktemp -d)" python3 -P benchmarks/export_speed.py "${A8[@]}" \
        --types q4_k_m --cold-types q4_k_m --imatrix synthetic --imatrix-mixes q4_k_m ;;
    sequential)
      rm -rf $W/cal-hessians
      run_step sequential 420 "${RS[@]}" --stages sequential
      rm -f $W/cal/sequential.safetensors ;;
    export-cpu)
      rm -rf $W/cal-hessians; wait_llama
      run_step export-cpu 330 python3 -P benchmarks/export_speed.py "${A8[@]}" --device cpu --types q4_k_m \
        --cold-types "" --llama q4_k_m --threads "$(nproc)" ;;
    export-gpu)
      rm -rf $W/cal-hessians; wait_llama
      run_step export-gpu 420 python3 -P benchmarks/export_speed.py "${A8[@]}" --types q4_k_m,q6_k,q8_0 \
        --cold-types q4_k_m --llama q4_k_m,q8_0 --threads "$(nproc)" ;;
    qlora-gguf)
      run_step qlora-gguf 300 python3 -P benchmarks/qlora.py --assets .bench/qlora --workdir /tmp/qlora --skip-curve \
        --skip-speed --gguf --batches 1 8 --gguf-repeats 3 --gguf-profile 1 --json "$OUT/gguf.json" ;;
    *) say "unknown step $s"; exit 2 ;;
  esac
done
say "done; $(df -h /tmp | tail -1 | awk '{print $4}') free on /tmp"
