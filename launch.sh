#!/usr/bin/env bash
# ./launch.sh [--nproc N] [--max-restarts K] [train args...]
#   runs `torchrun --nproc_per_node N -m engine.train train args...` (N: GPU count, or 2 on a CPU-only machine).
# ./launch.sh [--nproc N] [--max-restarts K] --channel [channel_train args...]
#   the same with engine.channel_train (the channel decoder's choice; e.g. --config configs/*_channel*.toml).
# ./launch.sh            (no arguments) the embedded demo: SmolLM2-135M in NF4 + LoRA on synthetic contracts,
#                        2 processes, trained on the clause choice (engine.channel_train --config
#                        configs/demo_channel.toml), then the evaluation of the base vs the fine-tuned model.
#                        It writes runs/demo inside this repository, wherever it is run from.
# Paths given on the command line (--config, --data jsonl:FILE, --out, --model, --init-adapter) are relative to
# the directory ./launch.sh is run from, as for any command.
set -euo pipefail
here=$(CDPATH= cd -- "$(dirname -- "$0")" >/dev/null && pwd -P)  # the repository: the demo's recipe and output; never the user's paths
# $PYTHON, else python, else python3 (systems that ship only python3)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
# Python imports this project from $here whatever the current directory, and never a data/ or model/ folder of
# the user's (the layout's names are common ones): PYTHONSAFEPATH=1 is Python 3.11's -P, the current directory is
# not put first on sys.path; torchrun's workers inherit both.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
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
needs_value() {  # FLAG "$@": a launcher flag at the end of the command line, without its value
  [[ $# -ge 2 ]] || { echo "error: $1 needs a number (e.g. $1 2); see ./launch.sh --help" >&2; exit 2; }
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) needs_value "$@"; nproc=$2; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --max-restarts) needs_value "$@"; restarts=$2; shift 2 ;;
    --max-restarts=*) restarts="${1#*=}"; shift ;;
    --channel) module=engine.channel_train; shift ;;
    -h|--help) help=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

# The interpreter, once, before anything else: Python 3.11+, torch and this project's code importable (else a
# traceback from deep inside torchrun), then the GPUs and the cores this process may use (--nproc's and
# OMP_NUM_THREADS' defaults; os.sched_getaffinity is Linux's, macOS has only os.cpu_count).
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python interpreter '$PY'; install Python 3.11 or newer, or set PYTHON=/path/to/python" >&2
  exit 2
fi
probe=$("$PY" -c '
import os, sys
py, repo = sys.argv[1:3]
where = py if py == sys.executable else f"{py} ({sys.executable})"
def fail(what):
    print(f"error: {where} {what}", file=sys.stderr)
    sys.exit(2)
if sys.version_info < (3, 11):
    fail(f"is Python {sys.version.split()[0]}; clauselora needs 3.11 or newer: set PYTHON to one, e.g. PYTHON=python3.11")
try:
    import torch
except Exception as e:
    fail(f"cannot import torch ({type(e).__name__}: {e}); install it there (README.md: pip install torch==2.13.0 "
         "--index-url https://download.pytorch.org/whl/cpu) or set PYTHON to the Python of your virtual environment, "
         "e.g. PYTHON=.venv/bin/python ./launch.sh")
try:
    import data, model, engine.cli
except Exception as e:
    fail(f"cannot import clauselora from {repo} ({type(e).__name__}: {e}); install its dependencies there: pip "
         f"install -e {repo}")
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(torch.cuda.device_count(), cpus)
' "$PY" "$here") || exit 2
read -r gpus cpus <<< "$probe"

if [[ $help -eq 1 ]]; then usage; exec "$PY" -m "$module" --help; fi
if ! [[ -z "$nproc" || "$nproc" =~ ^[1-9][0-9]*$ ]]; then echo "error: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; fi
if ! [[ "$restarts" =~ ^[0-9]+$ ]]; then echo "error: --max-restarts must be a non-negative integer, got '$restarts'" >&2; exit 2; fi
restarts=$((10#$restarts))  # decimal: bash reads 08 as a bad octal number and 010 as 8
if [[ -z "$nproc" ]]; then
  nproc=$(( gpus > 0 ? gpus : 2 ))
fi

if [[ $demo -eq 1 ]]; then
  out=$here/runs/demo  # the repository's, as README.md shows it, wherever ./launch.sh is run from
  module=engine.channel_train
  echo "== demo: train SmolLM2-135M (NF4 + LoRA r16) to choose the clause on synthetic contracts, $nproc processes -> $out"
  args=(--config "$here/configs/demo_channel.toml" --out "$out")
  # the demo replaces only an earlier demo (its config.json says so); anything else there is the user's
  case $("$PY" -c "import sys; from engine.rundir import demo_dir_state; print(demo_dir_state(*sys.argv[1:]))" \
         "$out" "$here") in
    new) ;;
    demo) echo "== replacing the previous demo run in $out"; args+=(--overwrite)
          # its evaluations too: they belong to the run replaced, and left beside a new demo stopped in its first
          # step they would make the directory look like someone else's to the next ./launch.sh
          rm -rf -- "$out/eval" "$out/eval-before" ;;
    *) echo "error: $out exists and is not an earlier demo run; move it away or delete it, then run ./launch.sh" \
         "again" >&2
       exit 2 ;;
  esac
fi

# Check the configuration, the run directory and the training data once, in one process, before torchrun starts
# N of them: a mistake then gives one line of error instead of N copies wrapped in torchrun's failure report.
# (The demo's arguments are ours; its run directory was checked above.)
[[ $demo -eq 1 ]] || "$PY" -c "import sys; from $module import preflight; sys.exit(preflight(sys.argv[1:]))" "${args[@]}"

# --standalone: a private rendezvous on a free local port (several runs can share a machine).
# OMP_NUM_THREADS: torchrun would set 1 per process; on the CPU give each process its share of the cores.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( cpus / nproc ))
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
# torch.distributed.run as engine.cli.torchrun runs it: workers that stop on a signal exit 128+signal on purpose,
# and torchrun's traceback and 40-line failure report for that are left out (a real failure keeps them). (The
# command line names torch.distributed.run, as `python -m torch.distributed.run` did: ps and tests find it so.)
torchrun='import sys, torch.distributed.run; from engine.cli import torchrun; sys.exit(torchrun(sys.argv[1:]))'
attempt=0
rc=0
launch="$$.$(date +%s%N)"  # what a restarted worker checks before it continues the run it finds (engine/rundir.py)
while [[ $signalled -eq 0 ]]; do
  CLAUSELORA_LAUNCH=$launch CLAUSELORA_RESTART=$attempt \
    $setsid "$PY" -c "$torchrun" --standalone --nproc_per_node "$nproc" -m "$module" "${args[@]}" &
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
  # workers that stopped on a signal sent to them, not through this script (a job scheduler's SIGTERM to every
  # process of the job): a stop, not a failure to restart from
  [[ $signalled -eq 0 && ( $rc -eq 130 || $rc -eq 143 ) ]] && signalled=$rc
  [[ $signalled -ne 0 || $rc -eq 0 || $attempt -ge $restarts ]] && break
  attempt=$((attempt + 1))
  echo "== the workers failed (status $rc); restart $attempt of $restarts: they continue from the newest checkpoint" >&2
done
trap - TERM INT
if [[ $signalled -ne 0 ]]; then  # one line: what the run's OUT holds now (a checkpoint only where there is one)
  "$PY" -c 'import sys; from engine.cli import stop_note; print(stop_note(sys.argv[1], sys.argv[3:], sys.argv[2] == "1"))' \
    "$module" "$demo" "${args[@]}" >&2 || true
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
