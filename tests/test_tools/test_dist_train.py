"""tools/dist_train.sh with 2 CPU processes (gloo): τ equal on both ranks at every
iteration, and the final checkpoint loads in a single-process tools/test.py."""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

from kw_mm.checkpoint import REPO_ROOT
from kw_mm.demo.shapes import make_shapes_classification

PROBE = '''
import json, os
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from kw_mm import get_temperature


@HOOKS.register_module()
class TauProbe(Hook):
    priority = 'LOWEST'

    def __init__(self, out_dir):
        self.out_dir, self.seen = out_dir, []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append([runner.iter, get_temperature(runner.model)])

    def after_train(self, runner):
        with open(os.path.join(self.out_dir, 'tau_rank%s.json' % os.environ['RANK']), 'w') as f:
            json.dump(self.seen, f)
'''

CONFIG = '''
_base_ = {base!r}
custom_imports = dict(imports=['kw_mm', 'tau_probe'], allow_failed_imports=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
model = dict(backbone=dict(depth=18), head=dict(in_channels=512))
train_dataloader = dict(batch_size=4, dataset=dict(data_root={root!r}))
val_dataloader = dict(dataset=dict(data_root={root!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=2, val_interval=2)
default_hooks = dict(checkpoint=dict(interval=2))
custom_hooks = [dict(type='KWTemperatureHook', epochs=1), dict(type='TauProbe', out_dir={out!r})]
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_cpu_processes(tmp_path):
    root = make_shapes_classification(str(tmp_path / 'cls'), num_train=24, num_val=6, size=32)
    (tmp_path / 'tau_probe.py').write_text(PROBE)
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(CONFIG.format(
        base=osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-resnet50_shapes-cls.py'),
        root=root, out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PORT=str(free_port()),
               PYTHON=sys.executable)
    work = tmp_path / 'work'
    result = subprocess.run(['bash', osp.join(REPO_ROOT, 'tools', 'dist_train.sh'), str(cfg), '2',
                             '--work-dir', str(work)], capture_output=True, text=True,
                            cwd=str(tmp_path), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    taus = [json.loads((tmp_path / f'tau_rank{r}.json').read_text()) for r in (0, 1)]
    assert taus[0] == taus[1] and len(taus[0]) == 6  # 24 images / (2 ranks × 4) × 2 epochs
    assert taus[0][0][1] == 1.0 and taus[0][-1][1] == 0.0
    result = subprocess.run([sys.executable, osp.join(REPO_ROOT, 'tools', 'test.py'), str(cfg),
                             str(work / 'epoch_2.pth'), '--work-dir', str(tmp_path / 'test')],
                            capture_output=True, text=True, cwd=str(tmp_path), env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'accuracy/top1' in result.stdout + result.stderr
