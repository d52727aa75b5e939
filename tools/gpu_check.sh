#!/usr/bin/env bash
# The first run on a machine with an NVIDIA GPU: offline, nothing installed, in minutes.
#
#   1. info       GPU name and memory, driver and CUDA versions, CuPy and its wheel, oracles
#   2. parity     a tiny model's forward on CuPy in float16, float32, float64 vs NumPy
#                 (the first use of each dtype compiles CuPy's kernels: timed)
#   3. tests      the cross-backend tests on cupy (tests needing array-api-strict skip)
#   4. index-add  the deterministic embedding backward's cost vs cupyx.scatter_add
#   5. generate   GPT-2 124M decoding, npgpt on CuPy vs transformers on PyTorch CUDA (when
#                 torch sees a GPU): tools/bench.py generate --backend cupy --vs torch
#   6. train      a GPT-2 124M training step, likewise: tools/bench.py train --configs g
#   7. multi-gpu  with 2 or more GPUs, mpi4py and mpiexec: a tiny model trained by one process
#                 and by `mpiexec -n 2 ... --backend cupy` (NCCL), same global batch, same
#                 losses and weights (tools/gpu_check.py multi-gpu); else "skipped: <why>"
#   8. scale      likewise: tokens/s on 1 GPU vs 2 (tools/bench.py scale --backend cupy)
#
# It uses the Python it finds: $NPGPT_PYTHON, else the first python3 (or python) on PATH
# that imports cupy, with PYTHONPATH=<checkout>:<checkout>/backends/cupy, so npgpt runs
# from this checkout whether or not it is installed. It never installs anything.
# Each step has a time limit, cut further so that the whole run ends within 10 minutes
# (4 with --quick); a step that fails or runs out of time is recorded and the run goes on.
#
# Results: $OUT when set, else tools/results/: gpu_check.json (everything), gpu_check.txt
# (the summary it prints) and gpu_check/ (each step's JSON and log, pytest.txt).
#
# Usage: tools/gpu_check.sh [--quick]
# Environment: NPGPT_PYTHON, OUT; to replace a step's arguments: TEST_ARGS (pytest's),
# INDEX_ADD_ARGS (tools/gpu_check.py index-add's), GENERATE_ARGS and TRAIN_ARGS
# (tools/bench.py generate's and train's, after --backend cupy --vs torch), MULTI_GPU_ARGS
# (tools/gpu_check.py multi-gpu's) and SCALE_ARGS (tools/bench.py scale's, after --backend cupy).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $arg; usage: tools/gpu_check.sh [--quick]" >&2; exit 2 ;;
    esac
done

DEST="${OUT:-$ROOT/tools/results}"
LOGS="$DEST/gpu_check"
mkdir -p "$LOGS" || exit 1
: > "$LOGS/steps.tsv"
export PYTHONPATH="$ROOT:$ROOT/backends/cupy${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1  # nothing here installs; progress shows as it comes

PY="${NPGPT_PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in $(type -ap python3 python); do
        if "$candidate" -c "import cupy" 2> /dev/null; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ] || ! "$PY" -c "import cupy" 2> /dev/null; then
    echo "error: no Python here imports cupy (tried ${PY:-every python3 and python on PATH}); set NPGPT_PYTHON to one that does" >&2
    exit 1
fi

# TOTAL and each step's limit, in seconds: info parity tests index-add generate train multi-gpu scale
if [ "$QUICK" = 1 ]; then
    TOTAL=230 LIMITS=(15 30 55 10 20 20 40 40)
    TEST_ARGS="${TEST_ARGS:-tests/test_cupy_gpu.py tests/test_cupy_kernels.py tests/test_model.py tests/test_generate.py}"
    GENERATE_ARGS="${GENERATE_ARGS:---new-tokens 32 --repeats 2 --recompute-repeats 0 --ttft-tokens 0}"
    TRAIN_ARGS="${TRAIN_ARGS:---configs g --batch 4 --seq 256 --repeats 2 --no-memory}"
    MULTI_GPU_ARGS="${MULTI_GPU_ARGS:---steps 6 --dtypes float32}"
    SCALE_ARGS="${SCALE_ARGS:---configs a --rounds 1 --steps 3 --no-zero-memory}"
else
    TOTAL=580 LIMITS=(30 80 160 30 70 70 80 120)
    TEST_ARGS="${TEST_ARGS:-tests/test_cupy_gpu.py tests/test_cupy_kernels.py tests/test_cupy_backend.py tests/test_backend.py
        tests/test_model.py tests/test_gradients.py tests/test_segments.py tests/test_generate.py tests/test_train.py
        tests/test_torch_parity.py}"
    GENERATE_ARGS="${GENERATE_ARGS:---repeats 3 --recompute-repeats 0}"
    TRAIN_ARGS="${TRAIN_ARGS:---configs g --repeats 3 --no-memory}"
    MULTI_GPU_ARGS="${MULTI_GPU_ARGS:-}"
    SCALE_ARGS="${SCALE_ARGS:---configs a c --rounds 1 --steps 5 --no-zero-memory}"
fi
INDEX_ADD_ARGS="${INDEX_ADD_ARGS:-}"
START=$SECONDS
STEP=0
STEPS=8

# run NAME LIMIT OUTFILE COMMAND...: one step, its stdout to OUTFILE, its status to steps.tsv
run() {
    local name=$1 limit=$2 outfile=$3 t0=$SECONDS rc status left
    shift 3
    STEP=$((STEP + 1))
    left=$((TOTAL - (SECONDS - START) - 5 * (STEPS + 1 - STEP)))  # 5 s of grace for each step to come
    if [ "$left" -lt "$limit" ]; then limit=$((left > 1 ? left : 1)); fi
    echo "gpu_check: [$STEP/$STEPS $name] (limit ${limit}s, $((SECONDS - START))s so far) $*" >&2
    timeout -k 5 "$limit" "$@" > "$outfile"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$LOGS/steps.tsv"
    echo "gpu_check: [$STEP/$STEPS $name] $status in $((SECONDS - t0))s" >&2
}

# skip NAME WHY: a step that cannot run here, recorded as "skipped: WHY" (not a failure)
skip() {
    STEP=$((STEP + 1))
    printf '%s\tskipped: %s\t0\n' "$1" "$2" >> "$LOGS/steps.tsv"
    echo "gpu_check: [$STEP/$STEPS $1] skipped: $2" >&2
}

echo "gpu_check: Python $PY; results in $DEST" >&2
run info "${LIMITS[0]}" "$LOGS/device.json" "$PY" tools/gpu_check.py info
run parity "${LIMITS[1]}" "$LOGS/parity.json" "$PY" tools/gpu_check.py parity
if "$PY" -c "import pytest, hypothesis" 2> /dev/null; then
    # shellcheck disable=SC2086 # TEST_ARGS is a list of arguments
    run tests "${LIMITS[2]}" "$LOGS/pytest.txt" env NPGPT_TEST_BACKENDS=cupy "$PY" -m pytest -q -p no:cacheprovider -rfE $TEST_ARGS
    tail -n 5 "$LOGS/pytest.txt" >&2
else
    skip tests "$PY lacks pytest or hypothesis"
fi
# shellcheck disable=SC2086 # INDEX_ADD_ARGS is a list of arguments
run index-add "${LIMITS[3]}" "$LOGS/index_add.json" "$PY" tools/gpu_check.py index-add $INDEX_ADD_ARGS
# shellcheck disable=SC2086 # GENERATE_ARGS and TRAIN_ARGS are lists of arguments
run generate "${LIMITS[4]}" "$LOGS/generate.json" "$PY" tools/bench.py generate --backend cupy --vs torch $GENERATE_ARGS
# shellcheck disable=SC2086
run train "${LIMITS[5]}" "$LOGS/train.json" "$PY" tools/bench.py train --backend cupy --vs torch $TRAIN_ARGS
# Several GPUs: data-parallel training over NCCL, under mpiexec (one rank per GPU).
WHY_NOT=$(timeout 90 "$PY" tools/gpu_check.py multi-gpu --why-not 2>> "$LOGS/multi_gpu_check.log" | tail -n 1) ||
    WHY_NOT="the check for GPUs and MPI failed (see gpu_check/multi_gpu_check.log)"
if [ -z "$WHY_NOT" ]; then
    # shellcheck disable=SC2086 # MULTI_GPU_ARGS and SCALE_ARGS are lists of arguments
    run multi-gpu "${LIMITS[6]}" "$LOGS/multi_gpu.json" "$PY" tools/gpu_check.py multi-gpu --logs "$LOGS" $MULTI_GPU_ARGS
    # shellcheck disable=SC2086
    run scale "${LIMITS[7]}" "$LOGS/scale.json" "$PY" tools/bench.py scale --backend cupy $SCALE_ARGS
else
    skip multi-gpu "$WHY_NOT"
    skip scale "$WHY_NOT"
fi

"$PY" tools/gpu_check.py report "$DEST"
STATUS=$?
echo "gpu_check: done in $((SECONDS - START))s; $DEST/gpu_check.json, $DEST/gpu_check.txt" >&2
exit $STATUS
