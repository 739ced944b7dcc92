"""tools/train.py and tools/test.py end to end on a tiny shapes set (real mmdet + COCO AP)."""
import os.path as osp
import subprocess
import sys

import pytest

from kw_mm.checkpoint import REPO_ROOT
from kw_mm.demo.shapes import make_shapes_dataset

CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_kw_r50_shapes.py')


def tool(name, *args, cwd):
    return subprocess.run([sys.executable, osp.join(REPO_ROOT, 'tools', name), *args],
                          capture_output=True, text=True, cwd=cwd)


def tiny_options(root):
    # depth 18 and a 6+4-image set keep this to seconds; the tools and the
    # mmdet pipeline, CocoMetric and checkpoint loading are the real ones.
    return ['--cfg-options', 'model.backbone.depth=18',
            'model.neck.in_channels=[64,128,256,512]', 'train_cfg.max_epochs=1',
            'train_cfg.val_interval=1', f'train_dataloader.dataset.data_root={root}/',
            f'val_dataloader.dataset.data_root={root}/',
            f'test_dataloader.dataset.data_root={root}/',
            f'val_evaluator.ann_file={root}/annotations/val.json',
            f'test_evaluator.ann_file={root}/annotations/val.json',
            'train_dataloader.batch_size=2', 'val_dataloader.batch_size=2',
            'test_dataloader.batch_size=2']


def test_train_then_test_loads_the_checkpoint_safely(tmp_path):
    root = make_shapes_dataset(str(tmp_path / 'shapes'), num_train=6, num_val=4, size=64)
    work = tmp_path / 'work'
    result = tool('train.py', CONFIG, '--work-dir', str(work), *tiny_options(root),
                  cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = work / 'epoch_1.pth'
    assert ckpt.exists()
    result = tool('test.py', CONFIG, str(ckpt), '--work-dir', str(work),
                  *tiny_options(root), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'coco/segm_mAP' in result.stdout + result.stderr


def test_missing_coco_is_named(tmp_path):
    result = tool('train.py', osp.join(REPO_ROOT, 'configs', 'mask_rcnn_kw_r50.py'),
                  cwd=str(tmp_path))
    assert result.returncode != 0
    assert 'error: dataset path(s) not found' in result.stderr
    assert 'data/coco/' in result.stderr and 'annotations/instances_train2017.json' in result.stderr


def test_safe_loading_refuses_other_getattr(tmp_path):
    import pickle

    import torch

    import kw_mm  # noqa: F401

    class Sneaky:
        def __reduce__(self):
            return (getattr, (torch.Tensor, 'tolist'))
    path = tmp_path / 'evil.pth'
    torch.save({'x': Sneaky()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_atomic_backend_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    import os

    from kw_mm.checkpoint import AtomicLocalBackend
    backend = AtomicLocalBackend()
    target = tmp_path / 'epoch_1.pth'
    backend.put(b'complete', target)
    assert target.read_bytes() == b'complete'
    umask = os.umask(0o022)
    try:  # the permissions of an ordinary file, not mkstemp's private 0600
        backend.put(b'complete', target)
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)

    def crash(fd):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', crash)
    with pytest.raises(OSError, match='disk full'):
        backend.put(b'half-written replacement', target)
    assert target.read_bytes() == b'complete'  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ['epoch_1.pth']  # no temp left behind
