"""The converter: golden logits of the authors' models, identification, refusal."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

from kw_mm import set_temperature
from kw_mm.apis import build_from_config
from kw_mm.checkpoint import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'convert_official_kw.py')


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT)


@pytest.mark.parametrize('name', ['kw1d4x_resnet18', 'kw1x_mobilenetv2_050'])
def test_golden_logits_after_conversion(name, reference_dir, tmp_path):
    src = osp.join(reference_dir, 'golden', f'{name}.pth')
    dst = tmp_path / 'converted.pth'
    result = run_tool(src, str(dst))
    assert result.returncode == 0, result.stderr
    config = result.stdout.strip().splitlines()[-1]
    assert not osp.isabs(config) and osp.isfile(osp.join(REPO_ROOT, config))
    model = build_from_config(osp.join(REPO_ROOT, config)).eval()
    state = torch.load(dst, weights_only=True)['state_dict']
    missing, unexpected = model.load_state_dict(state, strict=True)
    golden = torch.load(src, weights_only=True)
    with torch.no_grad():
        for tau in (0.0, 0.5):
            set_temperature(model, tau)
            logits = model(golden['input'], mode='tensor')
            torch.testing.assert_close(logits, golden['logits'][f'tau={tau}'], atol=1e-4,
                                       rtol=0)


def test_unknown_layout_is_refused_naming_tensors(reference_dir, tmp_path):
    golden = torch.load(osp.join(reference_dir, 'golden', 'kw1d4x_resnet18.pth'),
                        weights_only=True)
    state = dict(golden['model'])
    state['warehouse_manager.weights.0'] = torch.zeros(55, 32, 32, 1, 1)
    src = tmp_path / 'odd.pth'
    torch.save({'model': state}, src)
    dst = tmp_path / 'out.pth'
    result = run_tool(str(src), str(dst))
    assert result.returncode == 1
    assert 'backbone.warehouses.0.cells' in result.stderr and '[55, 32, 32, 1, 1]' in result.stderr
    assert not dst.exists()


def test_converted_checkpoint_loads_into_mmdet_backbone(reference_dir, tmp_path):
    """A converted classifier checkpoint initialises a Mask R-CNN backbone through
    init_cfg=dict(type='Pretrained', prefix='backbone.')."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    src = osp.join(reference_dir, 'golden', 'kw1d4x_resnet18.pth')
    dst = tmp_path / 'kw1d4x_resnet18_mm.pth'
    assert run_tool(src, str(dst)).returncode == 0
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'mask_rcnn_kw_r50.py'))
    cfg.model.backbone.update(depth=18, kw_cfg=dict(budget=0.25),
                              init_cfg=dict(type='Pretrained', checkpoint=str(dst),
                                            prefix='backbone.'))
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    detector = MODELS.build(cfg.model)
    detector.init_weights()
    golden = torch.load(src, weights_only=True)['model']
    for i in range(4):
        torch.testing.assert_close(detector.backbone.warehouses[i].cells,
                                   golden[f'warehouse_manager.weights.{i}'])
    torch.testing.assert_close(detector.backbone.layer3[1].conv2.attention.fc2.weight,
                               golden['layer3.1.conv2.attention.fc2.weight'])


def test_converted_checkpoint_reloads_bit_identically(reference_dir, tmp_path):
    src = osp.join(reference_dir, 'golden', 'kw1d4x_resnet18.pth')
    first, second = tmp_path / 'a.pth', tmp_path / 'b.pth'
    assert run_tool(src, str(first)).returncode == 0
    assert run_tool(src, str(second)).returncode == 0
    a = torch.load(first, weights_only=True)['state_dict']
    b = torch.load(second, weights_only=True)['state_dict']
    golden = torch.load(src, weights_only=True)['model']
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a['backbone.warehouses.2.cells'], golden['warehouse_manager.weights.2'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.pth', 'b.pth']  # no temp files left


def test_authors_training_checkpoint_with_args_converts(reference_dir, tmp_path):
    import argparse
    golden = torch.load(osp.join(reference_dir, 'golden', 'kw1d4x_resnet18.pth'),
                        weights_only=True)
    src = tmp_path / 'checkpoint-99.pth'
    torch.save({'model': golden['model'], 'epoch': 99,
                'args': argparse.Namespace(model='kw_resnet18', lr=0.1)}, src)
    result = run_tool(str(src), str(tmp_path / 'out.pth'))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith('kw1d4x-resnet18_8xb32_in1k.py')
