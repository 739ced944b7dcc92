#!/usr/bin/env bash
# Create .venv/ with the stack kw_mm is tested on. Idempotent: a finished
# environment is marked by .venv/.kw_mm_ready and is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.kw_mm_ready
PY=${PYTHON:-python3}
if [[ -f $STAMP ]]; then
  exit 0
fi
# The install peaks at about 7.5 GB (the registry's torch brings ~4 GB of CUDA
# libraries, unpacked from temporary downloads): say so before starting rather
# than stopping half-way with "No space left on device".
NEED_GB=${KW_MM_SETUP_NEED_GB:-9}
if ! [[ $NEED_GB =~ ^[0-9]+$ ]]; then
  echo "[setup_venv] KW_MM_SETUP_NEED_GB must be a whole number of GB, got '$NEED_GB'" >&2
  exit 2
fi
for dir in . "${TMPDIR:-/tmp}"; do
  free_kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
  if [[ -n $free_kb ]] && (( free_kb < NEED_GB * 1024 * 1024 )); then
    echo "[setup_venv] not enough disk space to set up $VENV: $(( free_kb / 1024 )) MB free" \
      "on the filesystem of '$dir', about $NEED_GB GB needed (torch with its CUDA libraries," \
      "mmcv's build and the OpenMMLab packages). Free some space, point TMPDIR elsewhere for" \
      "the downloads, or set KW_MM_SETUP_NEED_GB to lower this check." >&2
    exit 2
  fi
done
echo "[setup_venv] creating $VENV (first run only): torch, mmcv with its compiled ops, mmdet," \
  "mmpretrain"
if [[ ! -x $VENV/bin/python ]]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# The machine's default pip configuration offers a CPU-only torch wheel that
# has no matching torchvision; take the registry's build of the pair instead.
env -u PIP_FIND_LINKS $PIP install --isolated torch==2.13.0 torchvision==0.28.0
# Installing torch pulls the newest setuptools: pin it back (see constraints).
$PIP install -c requirements/constraints.txt "setuptools>=77.0.3,<82" wheel ninja
# mmcv's compiled ops (RoIAlign, NMS) are needed by Mask R-CNN; build against
# the torch just installed (ninja compiles on all cores). pip caches the
# wheel it builds, so later installs take seconds: say which of the two
# happens. `pip cache list` shows the wheels pip built itself; none when the
# cache is disabled (then pip builds again).
mmcv_wheel_cached() {
  local tag wheels
  tag=$($VENV/bin/python -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || return 1
  wheels=$($PIP cache list "mmcv-2.1.0-$tag" --format=abspath 2>/dev/null) || return 1
  [[ $wheels == *"mmcv-2.1.0-$tag-"* ]]
}
if mmcv_wheel_cached; then
  echo "[setup_venv] installing mmcv 2.1.0 from pip's cache (a wheel built here before)"
else
  echo "[setup_venv] building mmcv 2.1.0 with its ops from source (10-15 min on 2 cores, once:" \
    "pip caches the wheel)"
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} MMCV_WITH_OPS=1 $PIP install --no-build-isolation -c requirements/constraints.txt mmcv==2.1.0
$PIP install -c requirements/constraints.txt -r requirements/runtime.txt -r requirements/tests.txt
$PIP install -c requirements/constraints.txt -r requirements/export.txt  # ONNX export + its test
$PIP install --no-deps -r requirements/mim.txt  # `mim train kw_mm` (see the file)
$PIP install --no-build-isolation --no-deps -e .
$VENV/bin/python -c "import mmcv.ops, mmdet, mmpretrain, pycocotools, kw_mm; print('[setup_venv] ok: torch', __import__('torch').__version__, 'mmcv', mmcv.__version__)"
touch "$STAMP"
