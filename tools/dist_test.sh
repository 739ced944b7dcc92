#!/usr/bin/env bash
# Distributed testing through torch.distributed (one process per GPU, or
# gloo processes on CPU):  bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args]
# NNODES, NODE_RANK, MASTER_ADDR and PORT set up several machines, as for dist_train.sh.
set -euo pipefail
USAGE="usage: tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [args]"
CONFIG=${1:?$USAGE}
CHECKPOINT=${2:?$USAGE}
NPROCS=${3:?$USAGE}
shift 3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python )}
PYTHONPATH="$ROOT:${PYTHONPATH:-}" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROCS" --master_port="$PORT" \
    "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
