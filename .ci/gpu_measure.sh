#!/usr/bin/env bash
# The GPU measurements issues 14 and 15 ask for, as one prepared script for a lent GPU machine (see
# ../shared/GPU.md: send the .whl folder it describes; this script unpacks it). Every step has its own timeout and
# tees into $OUT, so a step that dies still leaves its log. Smoke-test on the CPU first:
#   OUT=/tmp/gpu DEVICE=cpu MODEL=smollm2-135m bash .ci/gpu_measure.sh
# On the GPU (about 10 minutes on an H200):
#   bash .ci/gpu_measure.sh            # OUT defaults to ./gpu-out; MODEL to llama-3.2-3b (random weights, real shapes)
set -uo pipefail
OUT=${OUT:-gpu-out}; DEVICE=${DEVICE:-cuda}; MODEL=${MODEL:-llama-3.2-3b}
PREC=fp16; [ "$DEVICE" = cpu ] && PREC=fp32  # fp16 as on a T4; the CPU trains in fp32
mkdir -p "$OUT"
if [ -d .whl ]; then
  mkdir -p /tmp/site && for w in .whl/*; do python3 -m zipfile -e "$w" /tmp/site; done
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
run() {  # run NAME SECONDS CMD...: one step, its own log, never stops the script
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
if [ "$DEVICE" = cpu ]; then SEQS="256 512"; LONG="1024"; B=1; else SEQS="2048 8192"; LONG="32768 65536"; B=2; fi
run env 30 $PY -c "import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
# the tests that pin the new GPU-relevant paths (they run on the CPU too)
run tests 240 $PY -m pytest -q -x tests/test_packed_attention.py tests/test_step.py tests/test_quant.py
# issue 15: predicted vs measured at 2K, 8K (batch 2) and 32K, 64K (batch 1, offload), fp16 as on a T4
for T in $SEQS; do
  run "memory_${T}" 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "$T" --batch-size $B \
    --precision $PREC --measure --steps 2
done
for T in $LONG; do
  run "memory_${T}_offload" 420 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "$T" \
    --batch-size 1 --precision $PREC --offload --measure --steps 2
done
# issue 15 item 3: the T4 recipe's shapes at <= 3.3 GiB
run memory_t4_small 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B \
  --precision $PREC --pack --offload --double-quant --supervised 512 --measure --steps 2
# issue 14: ours vs transformers + peft + bitsandbytes, same shapes, alternating processes (fused AdamW now on)
[ -n "${SKIP_BENCH:-}" ] || run bench 600 $PY -m engine.bench --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B --steps 5 \
  --rounds 2 --vs hf --json "$OUT/bench.json"
echo "logs in $OUT"
