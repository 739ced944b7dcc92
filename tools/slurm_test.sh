#!/usr/bin/env bash
# Testing on a Slurm cluster, one task per GPU (srun starts them; mmengine's
# 'slurm' launcher reads the ranks from Slurm's environment):
#   GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args]
# GPUS (default 8) tasks in all, GPUS_PER_NODE (default 8) per node,
# CPUS_PER_TASK (default 5); SRUN_ARGS are passed to srun as they are.
set -euo pipefail
USAGE="usage: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [args]"
PARTITION=${1:?$USAGE}
JOB_NAME=${2:?$USAGE}
CONFIG=${3:?$USAGE}
CHECKPOINT=${4:?$USAGE}
shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python )}
# shellcheck disable=SC2086  # SRUN_ARGS holds several words
PYTHONPATH="$ROOT:${PYTHONPATH:-}" exec srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PYTHON" -u "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher=slurm "$@"
