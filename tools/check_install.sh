#!/usr/bin/env bash
# Install kw_mm as a user would, from a wheel (what `pip install .` builds; not editable), into a
# fresh virtualenv that reuses an installed OpenMMLab stack, then use it from outside the
# repository:
#   1. `import kw_mm` comes from the fresh virtualenv;
#   2. a config found by name (kw_mm.utils.config_paths.find_config) builds with
#      mmpretrain's get_model and runs;
#   3. the installed converter (kw_mm/.mim/tools) converts a released-layout checkpoint,
#      and the config it names loads the result strictly;
#   4. a user's config with `_base_ = 'kw_mm::kw_resnet/...'` builds;
#   5. `mim train kw_mm CONFIG` trains a user's config (one epoch on a few generated images)
#      with the installed package's tools/train.py, where the stack has openmim
#      (requirements/mim.txt; tools/setup_venv.sh installs it).
#
#   bash tools/check_install.sh [STACK_PYTHON]
#
# STACK_PYTHON (default .venv/bin/python) is the interpreter whose site-packages hold torch,
# mmengine, mmcv, mmpretrain and mmdet; the fresh virtualenv sees them through a .pth file and is
# removed afterwards. The checkout is not modified: the wheel is built from a copy of it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK_PY=${1:-$REPO/.venv/bin/python}
if [ ! -x "$STACK_PY" ]; then
    echo "error: $STACK_PY is not an executable Python (pass the stack's interpreter)" >&2
    exit 2
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kw_mm_install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== copying the checkout (tracked and unignored files, without tests/) to $WORK/src"
mkdir "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z -co --exclude-standard | grep -zv '^tests/' \
        | tar --null -cf - -T -) | tar -xf - -C "$WORK/src"
else
    tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./work_dirs \
        --exclude=./tests --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=./kw_mm/.mim -cf - . | tar -xf - -C "$WORK/src"
fi

echo "== building the wheel"
"$STACK_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/kw_mm-*.whl)
echo "$(basename "$WHEEL")"

echo "== fresh virtualenv $WORK/venv"
"$STACK_PY" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
# install before the stack becomes visible, so pip sees (and touches) nothing but the new venv
"$PY" -m pip install -q --no-deps --no-index "$WHEEL"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STACK_SITE=$("$STACK_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# a plain path line: the stack's packages, without running its .pth files (an editable
# kw_mm installed there stays invisible)
echo "$STACK_SITE" > "$SITE/kw_mm_stack.pth"

mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
echo "== checks, run from $PWD"
env -u PYTHONPATH "$PY" - "$SITE" "$REPO/tests/data/released_state_dicts/kw1x_resnet18.tsv" <<'EOF'
import os.path as osp
import subprocess
import sys
import warnings

import torch

site, tsv = sys.argv[1], sys.argv[2]
warnings.filterwarnings('ignore', category=UserWarning)

import kw_mm  # noqa: E402
from kw_mm.utils.config_paths import config_root, find_config  # noqa: E402

print(f'1. import kw_mm {kw_mm.__version__}: {kw_mm.__file__}')
assert kw_mm.__file__.startswith(site), f'kw_mm imported from {kw_mm.__file__}, not {site}'
assert config_root().startswith(site), config_root()

from mmpretrain import get_model  # noqa: E402

name = 'kw1x-resnet18_8xb32_in1k'
path = find_config(name)
assert path.startswith(osp.join(site, 'kw_mm', '.mim', 'configs')), path
model = get_model(path).eval()
with torch.no_grad():
    logits = model(torch.randn(1, 3, 64, 64))
assert logits.shape == (1, 1000), logits.shape
print(f'2. find_config({name!r}) -> {path}\n   get_model: {type(model.backbone).__name__}, '
      f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
      f'logits {tuple(logits.shape)}')

# a checkpoint in the authors' released layout (random values, shapes from the .tsv)
state = {}
with open(tsv) as f:
    for line in f:
        line = line.rstrip('\n')
        if line and not line.startswith('#'):
            key, shape = line.split('\t')
            shape = () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))
            counter = key.endswith('num_batches_tracked')
            state[key] = torch.zeros(shape, dtype=torch.long) if counter else torch.randn(shape)
torch.save({'model': state}, 'released.pth')
tool = osp.join(site, 'kw_mm', '.mim', 'tools', 'convert_official_kw.py')
result = subprocess.run([sys.executable, tool, 'released.pth', 'converted.pth'],
                        capture_output=True, text=True)
assert result.returncode == 0, result.stderr
named = result.stdout.strip().splitlines()[-1]
converted = get_model(find_config(named))
converted.load_state_dict(torch.load('converted.pth', weights_only=True)['state_dict'],
                          strict=True)
cells = state['warehouse_manager.weights.0']
assert torch.equal(converted.backbone.warehouses[0].cells, cells)
print(f'3. {osp.relpath(tool, site)}: {result.stdout.strip().splitlines()[0]}\n'
      f'   {named} loads it strictly')

with open('my_config.py', 'w') as f:
    f.write("_base_ = 'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py'\n"
            "model = dict(backbone=dict(kw_cfg=dict(budget=0.5)), head=dict(num_classes=10))\n")
user = get_model(osp.abspath('my_config.py')).eval()
with torch.no_grad():
    logits = user(torch.randn(1, 3, 64, 64))
assert logits.shape == (1, 10), logits.shape
half = sum(p.numel() for p in user.backbone.parameters())
full = sum(p.numel() for p in model.backbone.parameters())
assert half < full, (half, full)
print(f"4. _base_ = 'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py' with budget 0.5, 10 classes: "
      f'backbone {half / 1e6:.2f}M parameters (1x: {full / 1e6:.2f}M), '
      f'logits {tuple(logits.shape)}')
EOF

# 5. OpenMMLab's command line finds the installed package's tools and trains a user's config
if "$PY" -c 'import mim' 2>/dev/null; then
    "$PY" -c "from kw_mm.demo.shapes import make_shapes_classification as m; \
m('shapes', num_train=2, num_val=2, size=32)" >/dev/null
    cat > my_shapes.py <<'EOF'
_base_ = 'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py'
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
dataset = dict(_delete_=True, type='CustomDataset', data_root='shapes', data_prefix='train',
               classes=('circle', 'square', 'triangle'), pipeline=pipeline)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dataset)
val_dataloader = dict(train_dataloader, dataset=dict(dataset, data_prefix='val'))
test_dataloader = val_dataloader
val_evaluator = test_evaluator = dict(topk=(1, ))
model = dict(head=dict(num_classes=3, topk=(1, )))
train_cfg = dict(max_epochs=1)
EOF
    if ! env -u PYTHONPATH "$PY" -m mim train kw_mm my_shapes.py --work-dir work_dir \
            > mim_train.log 2>&1 || [ ! -f work_dir/epoch_1.pth ]; then
        tail -n 30 mim_train.log >&2
        echo "error: mim train kw_mm my_shapes.py did not finish its epoch" >&2
        exit 1
    fi
    script=$(grep -o '[^ ]*/kw_mm/.mim/tools/train.py' mim_train.log | head -n 1)
    case $script in
        "$SITE"/*) ;;
        *) echo "error: mim ran '$script', not the installed package's tools/train.py" >&2
           exit 1 ;;
    esac
    echo "5. mim train kw_mm my_shapes.py: ${script#"$SITE"/} trained one epoch" \
        "($(grep -o 'accuracy/top1: [0-9.]*' mim_train.log | tail -n 1))"
else
    echo "5. mim train kw_mm: not checked, openmim is not installed in the stack" \
        "(pip install --no-deps -r requirements/mim.txt)"
fi
echo 'install check passed'
