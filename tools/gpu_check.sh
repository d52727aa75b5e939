#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU:
#   1. a fresh venv with npgpt, its CuPy plugin and the test extras (PyPI's torch wheel is
#      the CUDA build on Linux): pip install -e ".[cupy,test]"; the standalone plugin
#      package (backends/cupy) is built as a wheel to prove that route too;
#   2. the whole test suite on numpy and cupy: NPGPT_TEST_BACKENDS=numpy,cupy pytest;
#   3. tools/bench.py generate/train --backend cupy --vs torch: GPT-2 124M decoding and a training step, npgpt on
#      CuPy vs PyTorch CUDA in the same process;
#   4. with 2 or more GPUs: data-parallel training over NCCL, mpiexec -n NGPU --backend cupy
#      (each rank its own GPU) against one process with the same global batch;
# and writes OUT/gpu_check.json (suite result + benchmark) beside the raw logs.
#
# Usage: tools/gpu_check.sh [OUT]   (default OUT: gpu-check/)
# Environment: PYTHON (default python3), VENV (default .venv-gpu), BENCH_ARGS (extra
# arguments for `tools/bench.py train`, e.g. "--batch 4 --seq 1024").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-gpu}"
mkdir -p "$OUT"

if ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
    echo "gpu_check: nvidia-smi failed (see $OUT/nvidia-smi.txt): this machine has no usable NVIDIA GPU or driver" >&2
    exit 1
fi

echo "== installing npgpt[cupy,test] into $VENV" >&2
"$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q -e ".[cupy,test]"
pip wheel -q --no-deps ./backends/cupy -w "$OUT/wheels"  # the npgpt-cupy route builds too
python -c "from npgpt.backend import get_backend; print('gpu_check: backend', get_backend('cupy').name)" >&2

echo "== test suite on numpy and cupy" >&2
set +e
NPGPT_TEST_BACKENDS=numpy,cupy python -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt"
SUITE=${PIPESTATUS[0]}
set -e

echo "== benchmark: npgpt on cupy vs PyTorch CUDA" >&2
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
{ echo '{"generate":'; python tools/bench.py generate --backend cupy --vs torch; echo ',"train":'; python tools/bench.py train --backend cupy --vs torch --configs g ${BENCH_ARGS:-}; echo '}'; } > "$OUT/bench_gpu.json"

NGPU=$(nvidia-smi -L | grep -c '^GPU' || true)
if [ "$NGPU" -ge 2 ]; then
    echo "== multi-GPU: mpiexec -n $NGPU over NCCL vs one process" >&2
    python -c "import sys; sys.stdout.write('To be, or not to be, that is the question. ' * 5000)" > "$OUT/corpus.txt"
    RUN=(--data "$OUT/corpus.txt" --n-layer 4 --n-head 4 --n-embd 128 --block-size 128 --batch-size 8 --max-iters 30
         --log-interval 10 --eval-interval 30 --eval-iters 4 --dropout 0.1 --dtype float64)
    rm -rf "$OUT/dp1" "$OUT/dpN"
    python -m npgpt.train "${RUN[@]}" --out-dir "$OUT/dp1" --backend cupy --grad-accum "$NGPU" 2> "$OUT/dp1.txt"
    mpiexec -n "$NGPU" python -m npgpt.train "${RUN[@]}" --out-dir "$OUT/dpN" --backend cupy --zero 1 2> "$OUT/dpN.txt"
    python - "$OUT" "$NGPU" <<'PY' | tee "$OUT/multi_gpu.json"
import json, sys
import numpy as np
from npgpt.checkpoint import load_safetensors
out, n = sys.argv[1], int(sys.argv[2])
a, _ = load_safetensors(f"{out}/dp1/model.safetensors")
b, _ = load_safetensors(f"{out}/dpN/model.safetensors")
worst = max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(a[k]))) for k in a if np.any(a[k]))
print(json.dumps({"gpus": n, "max_relative_weight_difference": worst, "equal_within_1e-6": worst <= 1e-6,
                  "log_1_process": open(f"{out}/dp1.txt").read().splitlines()[-3:],
                  "log_mpiexec": open(f"{out}/dpN.txt").read().splitlines()[-3:]}, indent=2))
PY
fi

python - "$OUT" "$SUITE" <<'PY'
import json, sys
from pathlib import Path

out, suite = Path(sys.argv[1]), int(sys.argv[2])
lines = (out / "pytest.txt").read_text().strip().splitlines()
report = {
    "gpu": (out / "nvidia-smi.txt").read_text().splitlines()[:12],
    "suite": {"backends": "numpy,cupy", "exit_code": suite, "summary": lines[-1] if lines else ""},
    "bench": json.loads((out / "bench_gpu.json").read_text()),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: suite {'passed' if suite == 0 else 'FAILED'} ({report['suite']['summary']}); report in {out}/gpu_check.json")
PY
exit "$SUITE"
