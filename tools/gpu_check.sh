#!/usr/bin/env bash
# kw_mm on a CUDA GPU: the CUDA tests (tests/test_cuda, marker `cuda`) and a short
# tools/benchmark.py run (KW vs plain ResNet18 and ResNet50 at classification size).
# About five minutes on one recent GPU; each step has a time limit so that the whole
# check ends within ten.
#
#   bash tools/gpu_check.sh [LOG_DIR]     # LOG_DIR defaults to work_dirs/gpu_check
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
# Exits non-zero, saying why, where CUDA is not usable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOG_DIR="${1:-work_dirs/gpu_check}"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

echo "== kw_mm GPU check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "(nvidia-smi failed with status $?)"
else
    echo "nvidia-smi: not found on PATH"
fi

if ! "$PY" - <<'PY'
import sys
import torch
print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}')
if not torch.cuda.is_available():
    sys.exit('error: torch.cuda.is_available() is False: no usable CUDA GPU (check the driver, '
             'CUDA_VISIBLE_DEVICES and that torch was built with CUDA)')
print(f'device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}')
PY
then
    echo "gpu_check: CUDA is not available; nothing was run." >&2
    exit 1
fi

mkdir -p "$LOG_DIR"
echo "== CUDA tests (logs in $LOG_DIR)"
timeout 420 "$PY" -m pytest tests/test_cuda -m cuda -v -rs -p no:cacheprovider \
    2>&1 | tee "$LOG_DIR/pytest.log"

echo "== benchmark (KW 1x vs plain; classification input, batch 64, no AMP)"
timeout 170 "$PY" tools/benchmark.py --device cuda --suite resnet18,resnet50 --inputs cls \
    --warmup 3 --reps 10 --json "$LOG_DIR/benchmark.json" --markdown "$LOG_DIR/benchmark.md" \
    2>&1 | tee "$LOG_DIR/benchmark.log"
echo "== gpu_check: all passed"
