#!/usr/bin/env bash
# ./launch.sh [--nproc N] [--max-restarts K] [train args...]
#   runs `torchrun --nproc_per_node N -m engine.train train args...` (N: GPU count, or 2 on a CPU-only machine).
# ./launch.sh [--nproc N] [--max-restarts K] --channel [channel_train args...]
#   the same with engine.channel_train (the channel decoder's choice; e.g. --config configs/*_channel*.toml).
# ./launch.sh            (no arguments) the embedded demo: SmolLM2-135M in NF4 + LoRA on synthetic contracts,
#                        2 processes, trained on the clause choice (engine.channel_train --config
#                        configs/demo_channel.toml), then the evaluation of the base vs the fine-tuned model.
set -euo pipefail
cd "$(dirname "$0")"
# $PYTHON, else python, else python3 (systems that ship only python3)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  echo "launch options: --nproc N (processes on this machine), --max-restarts K (start the workers again after a"
  echo "  failure, up to K times; they continue from the newest checkpoint; default 0),"
  echo "  --channel (engine.channel_train instead of engine.train)"
  echo "train options ($module --help):"
}

demo=0
[[ $# -eq 0 ]] && demo=1
nproc=""
restarts=0
module=engine.train
help=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --max-restarts) restarts="${2:?--max-restarts needs a number}"; shift 2 ;;
    --max-restarts=*) restarts="${1#*=}"; shift ;;
    --channel) module=engine.channel_train; shift ;;
    -h|--help) help=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ $help -eq 1 ]]; then usage; exec "$PY" -m "$module" --help; fi
if ! [[ -z "$nproc" || "$nproc" =~ ^[1-9][0-9]*$ ]]; then echo "error: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; fi
if ! [[ "$restarts" =~ ^[0-9]+$ ]]; then echo "error: --max-restarts must be a non-negative integer, got '$restarts'" >&2; exit 2; fi
restarts=$((10#$restarts))  # decimal: bash reads 08 as a bad octal number and 010 as 8
if [[ -z "$nproc" ]]; then
  nproc=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi

if [[ $demo -eq 1 ]]; then
  out=runs/demo
  module=engine.channel_train
  echo "== demo: train SmolLM2-135M (NF4 + LoRA r16) to choose the clause on synthetic contracts, $nproc processes -> $out"
  args=(--config configs/demo_channel.toml --out "$out")
  if [[ -e "$out" ]]; then
    # the demo replaces only an earlier demo (its config.json says so); anything else there is the user's
    if "$PY" -c "import json, sys; c = json.load(open(sys.argv[1])); sys.exit(0 if c.get('data') == 'synthetic' \
        and c.get('out') == sys.argv[2] else 1)" "$out/config.json" "$out" 2>/dev/null; then
      echo "== replacing the previous demo run in $out"
      args+=(--overwrite)
    else
      echo "error: $out exists and is not an earlier demo run; move it away or delete it, then run ./launch.sh again" >&2
      exit 2
    fi
  fi
fi

# Check the configuration, the run directory and the training data once, in one process, before torchrun starts
# N of them: a mistake then gives one line of error instead of N copies wrapped in torchrun's failure report.
# (The demo's arguments are ours; its run directory was checked above.)
[[ $demo -eq 1 ]] || "$PY" -c "import sys; from $module import preflight; sys.exit(preflight(sys.argv[1:]))" "${args[@]}"

# --standalone: a private rendezvous on a free local port (several runs can share a machine).
# OMP_NUM_THREADS: torchrun would set 1 per process; on the CPU give each process its share of the cores.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $("$PY" -c "import os; print(len(os.sched_getaffinity(0)))") / nproc ))
  [[ $OMP_NUM_THREADS -lt 1 ]] && export OMP_NUM_THREADS=1
fi
# Signals (Kaggle/Colab/Slurm end a job with SIGTERM; Ctrl-C is SIGINT) go to the training processes
# themselves: each finishes its step, the ranks write one checkpoint together and exit 128+signal. torchrun
# would instead give its workers a fixed grace period (30 s) and then kill them. So torchrun runs in a session
# of its own (setsid, where there is one): a Ctrl-C in the terminal reaches this script alone, not torchrun, and
# this script passes it to each worker once. It returns only once every worker has exited, with their status,
# so the checkpoint exists when it does.
# --max-restarts K: when a worker fails (killed, out of memory), this script starts torchrun again, up to K times,
# and the new workers continue from the newest checkpoint (CLAUSELORA_RESTART tells them so, as torchrun's
# TORCHELASTIC_RESTART_COUNT would). Not torchrun's own --max-restarts: the workers of a run stopped by a signal
# exit 128+signal, which torchrun takes for a failure, so it would start them again and the stopped run would go
# on to its end.
setsid=$(command -v setsid || true)
signalled=0
sig=""
delivered=0
runner=""
deliver() {  # the pending signal to torchrun's children, the workers; none yet while torchrun starts them
  [[ -n "$runner" ]] && pkill "-$sig" -P "$runner" 2>/dev/null && delivered=1 || true
}
forward() {
  signalled=$1 sig=$2 delivered=0
  deliver
}
trap 'forward 143 TERM' TERM
trap 'forward 130 INT' INT
attempt=0
rc=0
launch="$$.$(date +%s%N)"  # what a restarted worker checks before it continues the run it finds (engine/rundir.py)
while [[ $signalled -eq 0 ]]; do
  CLAUSELORA_LAUNCH=$launch CLAUSELORA_RESTART=$attempt \
    $setsid "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m "$module" "${args[@]}" &
  runner=$!
  while true; do
    if [[ $signalled -ne 0 && $delivered -eq 0 ]]; then  # a signal came before the workers existed: try again
      deliver
      sleep 0.2
      kill -0 "$runner" 2>/dev/null && continue
    fi
    wait "$runner" && rc=0 || rc=$?  # returns when torchrun ends, or early for a trapped signal
    kill -0 "$runner" 2>/dev/null || break
  done
  runner=""
  [[ $signalled -ne 0 || $rc -eq 0 || $attempt -ge $restarts ]] && break
  attempt=$((attempt + 1))
  echo "== the workers failed (status $rc); restart $attempt of $restarts: they continue from the newest checkpoint" >&2
done
trap - TERM INT
if [[ $signalled -ne 0 ]]; then
  if [[ $demo -eq 1 ]]; then  # ./launch.sh replaces an earlier demo: a stopped one starts over
    echo "== stopped by signal: the demo wrote a checkpoint in $out/checkpoints; ./launch.sh starts the demo over" >&2
  else
    echo "== stopped by signal: the workers wrote a checkpoint in their --out/checkpoints (continue with --resume), or" \
      "nothing if they had not begun training (run the same command again)" >&2
  fi
  exit "$signalled"
fi
[[ $rc -eq 0 ]] || exit "$rc"

if [[ $demo -eq 1 ]]; then
  "$PY" - "$out/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tr = [r["loss"] for r in rows if r.get("loss") is not None]
acc = [r["train_acc"] for r in rows if "train_acc" in r]
k = max(1, min(8, len(tr) // 4))  # single steps of 4 examples are noisy: compare the first and last k steps
if tr:
    print(f"== choice loss (mean of {k} steps) {sum(tr[:k]) / k:.3f} -> {sum(tr[-k:]) / k:.3f}; right choice "
          f"before each step {sum(acc[:k]) / k:.0%} -> {sum(acc[-k:]) / k:.0%}")
PYEOF
  if "$PY" -c "import engine.evaluate" 2>/dev/null; then
    # whole contracts, prompts built without the answer; the channel decoder quotes a paragraph or says NONE
    limit=(); [[ -n "${DEMO_EVAL_LIMIT:-}" ]] && limit=(--limit "$DEMO_EVAL_LIMIT")
    threads=$(( OMP_NUM_THREADS * nproc ))
    echo "== evaluation on the held-out synthetic contracts (test split, unseen clause wordings): base model"
    "$PY" -m engine.evaluate --model smollm2-135m --data synthetic --split test "${limit[@]}" --decode channel \
      --out "$out/eval-before" --quiet --threads "$threads"
    echo "== the same with the fine-tuned adapter"
    "$PY" -m engine.evaluate --model smollm2-135m --adapter "$out/adapter" --data synthetic --split test \
      "${limit[@]}" --decode channel --out "$out/eval" --quiet --threads "$threads" \
      --compare "$out/eval-before/eval.json" --metrics "$out/metrics.jsonl"
    echo "== report: $out/eval/report.md"
  fi
fi
