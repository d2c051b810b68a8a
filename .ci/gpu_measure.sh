#!/usr/bin/env bash
# The GPU measurements issues 14 and 15 ask for, as one prepared script for a lent GPU machine (see
# ../shared/GPU.md: send the .whl folder it describes; this script unpacks it). Every step has its own timeout and
# tees into $OUT, so a step that dies still leaves its log. Smoke-test on the CPU first:
#   OUT=/tmp/gpu DEVICE=cpu MODEL=smollm2-135m bash .ci/gpu_measure.sh
# On the GPU (the steps take about 10 minutes on an H200; DEADLINE_S cuts them to 540 s):
#   bash .ci/gpu_measure.sh            # OUT defaults to ./gpu-out; MODEL to llama-3.2-3b (random weights, real shapes)
# The GPU machine has no package index and no ../shared: first, here, `bash .ci/gpu_prepare.sh` builds the two
# folders to carry, .whl (bitsandbytes with its CUDA 12.4-13.2 libraries, rapidfuzz, gguf) and runs/bench_rows
# (the ACORD rows the packed-rows benchmark reads, as engine.train packs them, Llama 3.2 tokenizer).
# The device tool allows 10 minutes a command and 15 device-minutes a session, start-up (a few minutes) and idle
# waits included. The first call should be the one that answers most, PART=core: the ledger at the first sequence
# length, 32K without tiles and 64K with them (issue 15), and the packed-rows benchmark, one round (issue 14), then
# the tests' CUDA cases with what time is left:
#   PART=core DEADLINE_S=480 bash .ci/gpu_measure.sh
# With a whole session to spend and nothing measured yet, two commands whose deadlines together stay near 12
# minutes instead: memory first (issue 15), then the benchmarks (issue 14):
#   PART=memory DEADLINE_S=420 bash .ci/gpu_measure.sh;   PART=bench DEADLINE_S=300 bash .ci/gpu_measure.sh
# PART: all (default, DEADLINE_S 540 unless given: one command's limit), memory, bench or core. DEADLINE_S: the
# whole script's seconds; each step's timeout is cut to what is left (a step with under 30 s left is skipped and
# says so), so the script ends, logs written, before the limit.
set -uo pipefail
OUT=${OUT:-gpu-out}; DEVICE=${DEVICE:-cuda}; MODEL=${MODEL:-llama-3.2-3b}; PART=${PART:-all}
case "$PART" in all|memory|bench|core) ;; *) echo "PART=$PART: choose all, memory, bench or core" >&2; exit 2;; esac
[ "$PART" = all ] && [ "$DEVICE" != cpu ] && DEADLINE_S=${DEADLINE_S:-540}  # one command's 10-minute limit
END=""; [ -n "${DEADLINE_S:-}" ] && END=$(( $(date +%s) + DEADLINE_S ))
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
  if [ -n "$END" ]; then
    local left=$(( END - $(date +%s) - 5 ))
    if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left} s left of DEADLINE_S" | tee "$OUT/$name.log"; return; fi
    [ "$left" -lt "$secs" ] && secs=$left
  fi
  echo "== $name (timeout ${secs} s): $*" | tee "$OUT/$name.log"
  timeout "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
if [ "$DEVICE" = cpu ]; then SEQS="256 512"; LONG="1024"; B=1; else SEQS="2048 8192"; LONG="32768 65536"; B=2; fi
want() {  # want GROUP...: whether this PART runs a step of these groups
  local g; for g in "$@"; do { [ "$PART" = all ] || [ "$PART" = "$g" ]; } && return 0; done; return 1
}
FIRST=${SEQS%% *}; LAST=${LONG##* }
# what this machine runs, and whether bitsandbytes loaded a CUDA library for its torch (every NF4 step needs one)
run env 60 $PY -c "import sys, torch, bitsandbytes; from model.quant import bitsandbytes_problem as p; print(sys.version)
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
print('bitsandbytes', bitsandbytes.__version__, p('$DEVICE') or 'loaded its library')"
# issue 15: predicted vs measured at 2K, 8K (batch 2) and 32K, 64K (batch 1, offload), fp16 as on a T4
for T in $SEQS; do
  { want memory || { [ "$T" = "$FIRST" ] && want core; }; } || continue
  run "memory_${T}" 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "$T" --batch-size $B \
    --precision $PREC --measure --steps 2
done
# the longest without MLP tiles first (the 2026-11 run measured 11.10 GiB at 32K before the chunked backwards),
# then every long one with tiles of 4096 tokens (the 64K run is the <= 15 GiB target); --attribute lists what is
# alive at each peak by the code that allocated it (the allocator's history), for what the ledger still misses
want memory core && run "memory_${LONG%% *}_offload" 420 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${LONG%% *}" \
  --batch-size 1 --precision $PREC --offload --supervised 512 --measure --steps 2 --attribute
TILE=4096; [ "$DEVICE" = cpu ] && TILE=256
for T in $LONG; do
  { want memory || { [ "$T" = "$LAST" ] && want core; }; } || continue
  run "memory_${T}_offload_tile${TILE}" 420 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "$T" \
    --batch-size 1 --precision $PREC --offload --mlp-tile $TILE --supervised 512 --measure --steps 2 --attribute
done
if want memory; then
# issue 15 item 3: the T4 recipe's shapes at <= 3.3 GiB (offload + double quant; and with MLP tiles of 2048), each
# run's step time against the recipe's default (packed, nothing offloaded) for the <= 10% speed trade
run memory_t4_default 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" \
  --batch-size $B --precision $PREC --pack --supervised 512 --measure --steps 4
run memory_t4_small 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B \
  --precision $PREC --pack --offload --double-quant --supervised 512 --measure --steps 4
run memory_t4_small_tile 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" \
  --batch-size $B --precision $PREC --pack --offload --double-quant --mlp-tile $((TILE / 2)) --supervised 512 \
  --measure --steps 4
# the channel recipe's longest ACORD row (configs/llama3_2_3b_acord_channel_t4x2.toml; BENCHMARKS.md § The
# channel recipe on a T4): one packed row of 3,161 tokens, 726 supervised, predicted 3.71 GiB on sm 7.5
[ "$DEVICE" != cpu ] && run memory_channel_3161 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" \
  --seq-len 3161 --batch-size 1 --precision $PREC --pack --supervised 726 --measure --steps 2
# --compile (issue 14 item 3: the ledger stays exact): the first sequence length at batch B, and the longest
# without tiles, where eager's SwiGLU backward holds 224 MiB of fp32 chunks the fused kernel does not (3 steps:
# the first compiles; the peak is the later steps')
run "memory_${FIRST}_compile" 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "$FIRST" \
  --batch-size $B --precision $PREC --compile --measure --steps 3
run "memory_${LONG%% *}_offload_compile" 420 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" \
  --seq-len "${LONG%% *}" --batch-size 1 --precision $PREC --offload --supervised 512 --compile --measure --steps 3
# issue 15 item 4: the largest batch the ledger fits in BUDGET at the first sequence length (engine.memory
# --budget, this device's own kernels), then measured at that batch: the peak must come out within the budget
BUDGET=${BUDGET:-8GiB}; [ "$DEVICE" = cpu ] && BUDGET=500MiB
FITB=$($PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size 1 \
  --precision $PREC --budget "$BUDGET" --json | $PY -c 'import json, sys; print(json.load(sys.stdin)["batch_size"]["value"] or 0)')
echo "== budget $BUDGET at seq ${SEQS%% *}: the ledger fits batch ${FITB:-?}" | tee "$OUT/budget.log"
if [ "${FITB:-0}" -gt 0 ] 2>/dev/null; then
  run "memory_budget_batch${FITB}" 300 $PY -m engine.memory --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" \
    --batch-size "$FITB" --precision $PREC --measure --steps 2
fi
fi
# issue 14: ours vs transformers + peft + bitsandbytes, same shapes, alternating processes (fused AdamW now on),
# one profiled step per run for the CPU-time / GPU-busy split; packed ACORD rows (what training runs), then
# random unpacked rows, then batch 8 alone for model FLOP utilisation
ROWS=${ROWS:-runs/bench_rows/acord_llama3_2048x2.safetensors}
if [ "$DEVICE" = cpu ] && [ "$ROWS" = runs/bench_rows/acord_llama3_2048x2.safetensors ] && [ -f "$ROWS" ]; then
  # the prepared rows are Llama 3.2 token ids, 2048 per row: longer than the smoke's seq and outside SmolLM2's vocab
  want bench core && [ -z "${SKIP_BENCH:-}" ] && echo "CPU smoke: the packed-rows benchmarks are skipped ($ROWS is" \
    "for the GPU run; ROWS=FILE from engine.bench --save-rows gives rows that fit)" | tee "$OUT/bench_packed.log"
  ROWS=""  # (no file: every packed-rows step below is skipped)
fi
ROUNDS=2; [ "$PART" = core ] && ROUNDS=1
if want bench core && [ -z "${SKIP_BENCH:-}" ]; then
  if [ -f "$ROWS" ]; then
    run bench_packed 600 $PY -m engine.bench --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B \
      --steps 5 --rounds $ROUNDS --vs hf --data "rows:$ROWS" --profile --json "$OUT/bench_packed.json"
  elif [ -n "$ROWS" ]; then
    echo "no $ROWS: the packed-rows benchmark is skipped (see the top of this script)" | tee "$OUT/bench_packed.log"
  fi
fi
if want bench && [ -z "${SKIP_BENCH:-}" ]; then
  run bench 600 $PY -m engine.bench --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B --steps 5 \
    --rounds 2 --vs hf --profile --json "$OUT/bench.json"
  [ -f "$ROWS" ] && run bench_packed_compile 600 $PY -m engine.bench --model "$MODEL" --device "$DEVICE" \
    --seq-len "${SEQS%% *}" --batch-size $B --steps 5 --warmup 3 --rounds 1 --vs hf --data "rows:$ROWS" --compile \
    --profile --json "$OUT/bench_packed_compile.json"
  run bench_b8 300 $PY -m engine.bench --model "$MODEL" --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size 8 --steps 3 \
    --warmup 3 --rounds 1 --vs none --compile --profile --json "$OUT/bench_b8.json"
  # the T4's path (fp16 autocast + loss scaling, both sides) on this GPU, packed rows: last, skipped if time is short
  [ "$DEVICE" != cpu ] && [ -f "$ROWS" ] && run bench_packed_fp16 400 $PY -m engine.bench --model "$MODEL" \
    --device "$DEVICE" --seq-len "${SEQS%% *}" --batch-size $B --steps 5 --rounds 1 --vs hf --data "rows:$ROWS" \
    --precision fp16 --profile --json "$OUT/bench_packed_fp16.json"
fi
# last, so the measurements come first under DEADLINE_S: the tests' CUDA cases (tests/conftest.py DEVICES; skipped
# without a GPU): NF4 kernels against the torch reference and bitsandbytes, a LoRA layer under fp16/bf16 autocast
# against the fp32 product, packed rows against the examples run alone (also on the T4's kernel path), the fused
# AdamW with loss scaling against the per-parameter loop, a run with offload and MLP tiles against a plain CPU
# run, and compiled NF4 blocks (Triton) against eager in fp32, bf16 and fp16
want bench core && run tests 300 $PY -m pytest -q -rfEs -p no:cacheprovider -k cuda tests/test_devices.py \
  tests/test_compile.py
echo "logs in $OUT"
