"""Converting the authors' released Mask R-CNN checkpoints (mmdet 2.x) to kw_mm.

We do not have the released files, so each test writes one: our detector's
tensors under the authors' names (an inverse mapping written here, from their
detection backbones' code), random values, plus the ImageNet classifier their
ResNet and MobileNetV2 backbones keep. That layout is checked against the
released ImageNet state dicts (``released_state_dicts/*.tsv``), which their
detection backbones load.
"""
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from tool_scripts import load_script

from kw_mm.apis import build_from_config
from kw_mm.checkpoint import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'convert_official_kw.py')

#: released model → (kw_mm config, released ImageNet model of its backbone,
#: the ImageNet classifier the authors' detection backbone keeps: name → shape)
RELEASED = {
    'mask_rcnn_kw1x_resnet50': (
        'configs/mask_rcnn/mask-rcnn_kw1x-resnet50_fpn_paper-ms-crop-1x_coco.py',
        'kw1x_resnet50', {'fc.weight': (1000, 2048), 'fc.bias': (1000, )}),
    'mask_rcnn_kw4x_resnet50': (
        'configs/mask_rcnn/mask-rcnn_kw4x-resnet50_fpn_paper-ms-crop-1x_coco.py',
        'kw4x_resnet50', {'fc.weight': (1000, 2048), 'fc.bias': (1000, )}),
    'mask_rcnn_kw1x_mobilenetv2_100': (
        'configs/mask_rcnn/mask-rcnn_kw1x-mobilenet-v2_fpn_paper-ms-crop-1x_coco.py',
        'kw1x_mobilenetv2_100', {'classifier.weight': (1000, 1280), 'classifier.bias': (1000, )}),
    'mask_rcnn_kw4x_mobilenetv2_100': (
        'configs/mask_rcnn/mask-rcnn_kw4x-mobilenet-v2_fpn_paper-ms-crop-1x_coco.py',
        'kw4x_mobilenetv2_100', {'classifier.weight': (1000, 1280), 'classifier.bias': (1000, )}),
    'mask_rcnn_kw1x_convnext_tiny': (
        'configs/mask_rcnn/mask-rcnn_kw1x-convnext-t_fpn_paper-ms-crop-1x_coco.py',
        'kw1x_convnext_tiny', {}),
}

#: the ConvNeXt-T detection backbone: one LayerNorm per output stage instead of the
#: ImageNet model's final ``norm`` and ``head``
CONVNEXT_T_CHANNELS = (96, 192, 384, 768)


def random_like(reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if reference.dtype.is_floating_point:
        return torch.randn(reference.shape, dtype=reference.dtype, generator=generator)
    return torch.randint(0, 10_000, reference.shape, dtype=reference.dtype, generator=generator)


def authors_checkpoint(name, seed=0):
    """An mmdet 2.x checkpoint of a released model, in the authors' layout.

    Returns the checkpoint and, for every tensor of our detector, the
    authors' name it was stored under (τ buffers excepted).
    """
    config, _, classifier = RELEASED[name]
    ours = build_from_config(osp.join(REPO_ROOT, config), 'meta').state_dict()
    generator = torch.Generator().manual_seed(seed)
    state, theirs_of = {}, {}
    for key, reference in ours.items():
        if key.endswith('.attention.temperature'):
            continue  # the authors' τ is a plain attribute, not in the state dict
        match = re.fullmatch(r'backbone\.warehouses\.(\d+)\.cells', key)
        theirs = f'backbone.warehouse_manager.weights.{match[1]}' if match else key
        theirs_of[key] = theirs
        state[theirs] = random_like(reference, generator)
    for key, shape in classifier.items():
        state['backbone.' + key] = torch.randn(shape, generator=generator)
    meta = dict(mmdet_version='2.11.0', epoch=12, iter=87960, CLASSES=('person', 'bicycle'))
    return dict(state_dict=state, meta=meta), theirs_of


def released_detection_backbone(name, released_tsv):
    """Key → shape of the authors' detection backbone, from the released ImageNet model."""
    _, tsv_name, _ = RELEASED[name]
    _, shapes = released_tsv(tsv_name)
    if 'convnext' in tsv_name:
        for key in ('norm.weight', 'norm.bias', 'head.weight', 'head.bias'):
            del shapes[key]
        for i, channels in enumerate(CONVNEXT_T_CHANNELS):
            shapes[f'norm{i}.weight'] = shapes[f'norm{i}.bias'] = (channels, )
    return shapes


def load_tool():
    return load_script(TOOL)


@pytest.fixture
def workdir(tmp_path):
    """tmp_path, with the (large) checkpoints removed afterwards."""
    yield tmp_path
    for path in tmp_path.glob('*.pth'):
        path.unlink()


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_detection_checkpoint_round_trip(name, released_tsv, workdir, capsys):
    from mmengine.runner import load_checkpoint
    checkpoint, theirs_of = authors_checkpoint(name)
    source = checkpoint['state_dict']
    backbone = {k[len('backbone.'):]: tuple(v.shape) for k, v in source.items()
                if k.startswith('backbone.')}
    assert backbone == released_detection_backbone(name, released_tsv)
    src, dst = workdir / 'authors.pth', workdir / 'converted.pth'
    torch.save(checkpoint, src)

    assert load_tool().main([str(src), str(dst)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    config = RELEASED[name][0]
    assert lines[-1] == config and name in lines[0]

    # the loader of tools/test.py (mmengine's), with strict keys
    detector = build_from_config(osp.join(REPO_ROOT, config))
    load_checkpoint(detector, str(dst), map_location='cpu', strict=True)
    loaded = detector.state_dict()
    for ours, theirs in theirs_of.items():
        assert torch.equal(loaded[ours], source[theirs]), ours
    temperatures = {k: float(v) for k, v in loaded.items() if k.endswith('.attention.temperature')}
    assert temperatures and set(temperatures.values()) == {0.0}  # built at τ = 1, stored τ = 0

    converted = torch.load(dst, weights_only=True)
    assert set(converted['state_dict']) == set(loaded)
    classifier = sorted('backbone.' + k for k in RELEASED[name][2])
    assert converted['meta']['dropped_keys'] == classifier
    assert converted['meta']['dataset_meta'] == dict(classes=('person', 'bicycle'))
    assert converted['meta']['config'] == config


def test_other_detection_variant_is_refused_naming_the_tensor(workdir):
    checkpoint, _ = authors_checkpoint('mask_rcnn_kw1x_mobilenetv2_100')
    state = checkpoint['state_dict']
    cells = state['backbone.warehouse_manager.weights.5']
    state['backbone.warehouse_manager.weights.5'] = torch.zeros(cells.shape[0] + 1,
                                                                *cells.shape[1:])
    wrong_shape = str([cells.shape[0] + 1, *cells.shape[1:]])
    src, dst = workdir / 'variant.pth', workdir / 'out.pth'
    torch.save(checkpoint, src)
    result = subprocess.run([sys.executable, TOOL, str(src), str(dst)], capture_output=True,
                            text=True, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert 'backbone.warehouses.5.cells' in result.stderr and wrong_shape in result.stderr
    assert 'mask_rcnn_kw1x_mobilenetv2_100' in result.stderr  # the closest released model
    assert not dst.exists()


def test_ema_option_is_refused_for_detection_checkpoints(workdir, capsys):
    checkpoint, _ = authors_checkpoint('mask_rcnn_kw1x_mobilenetv2_100')
    src, dst = workdir / 'authors.pth', workdir / 'out.pth'
    torch.save(checkpoint, src)
    assert load_tool().main([str(src), str(dst), '--ema']) == 1
    assert 'EMA' in capsys.readouterr().err
    assert not dst.exists()
