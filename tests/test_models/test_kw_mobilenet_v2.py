"""KWMobileNetV2 and KWLinearClsHead: released parameter counts and tensors,
warehouse numbering and β, forward, freezing, the mmpretrain classifier, errors."""
import os.path as osp

import pytest
import torch
from torch import nn

from kw_mm import KWConv2d, KWLinear, set_temperature
from kw_mm.apis import build_from_config
from kw_mm.checkpoint import RELEASED_MODELS, REPO_ROOT, identify, official_to_mmpretrain
from kw_mm.layers.partition import ZERO_CELL
from kw_mm.models.backbones import KWMobileNetV2
from kw_mm.models.backbones.kw_mobilenet_v2 import mobilenet_v2_kw_layout
from kw_mm.models.heads import KWLinearClsHead

#: the classifier of the released 1/2x models (appendix A.3 and reference README)
HALF_HEAD_CFG = dict(budget=0.5, reduction=1 / 32, cell_in_ratio=0.025, cell_out_ratio=1.0)

# name, widen factor, backbone kw_cfg, paper's parameter count (Tables 4 and 16)
RELEASED = [
    ('kw1d2x_mobilenetv2_100', 1.0, dict(budget=0.5, reduction=1 / 32), 2.65e6),
    ('kw1x_mobilenetv2_100', 1.0, dict(budget=1), 5.17e6),
    ('kw4x_mobilenetv2_100', 1.0, dict(budget=4), 11.38e6),
    ('kw1d2x_mobilenetv2_050', 0.5, dict(budget=0.5, reduction=1 / 32), 1.47e6),
    ('kw1x_mobilenetv2_050', 0.5, dict(budget=1), 2.85e6),
    ('kw4x_mobilenetv2_050', 0.5, dict(budget=4), 4.65e6),
]



def build_released(widen_factor, kw_cfg, device='meta'):
    with torch.device(device):
        backbone = KWMobileNetV2(widen_factor, kw_cfg=kw_cfg)
        if kw_cfg['budget'] < 1:
            head = KWLinearClsHead(1000, backbone.feat_dim, kw_cfg=HALF_HEAD_CFG)
        else:
            head = KWLinearClsHead(1000, backbone.feat_dim, kw_cfg=None)
    return backbone, head


def num_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def shapes_of(module, prefix=''):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()
            if not k.endswith('attention.temperature')}


@pytest.mark.parametrize('name,widen_factor,kw_cfg,paper', RELEASED,
                         ids=[r[0] for r in RELEASED])
def test_released_parameter_counts_and_tensors(name, widen_factor, kw_cfg, paper,
                                               released_tsv):
    backbone, head = build_released(widen_factor, kw_cfg)
    count = num_params(backbone, head)
    header, shapes = released_tsv(name)
    assert count == header['params']
    assert abs(count - paper) <= 0.005e6, (count, paper)
    ours = {**shapes_of(backbone), **shapes_of(head, 'head.')}
    num_backbone_warehouses = len(backbone.warehouses)
    theirs = {}
    for key, shape in shapes.items():
        if key.startswith('warehouse_manager.weights.'):
            index = int(key.rsplit('.', 1)[1])
            key = (f'warehouses.{index}.cells' if index < num_backbone_warehouses else
                   'head.fc.warehouse.cells')  # 1/2x: the last warehouse is the classifier's
        elif key.startswith('classifier.1.conv.'):
            key = 'head.fc.' + key[len('classifier.1.conv.'):]
        elif key.startswith('classifier.'):
            key = 'head.fc.' + key[len('classifier.'):]
        theirs[key] = shape
    assert ours == theirs


@pytest.mark.parametrize('widen_factor,expected', [(1.0, 3504872), (0.5, 1968680)])
def test_plain_baselines(widen_factor, expected):
    with torch.device('meta'):
        plain = KWMobileNetV2(widen_factor, kw_cfg=None)
    assert not hasattr(plain, 'warehouses')
    assert not any(isinstance(m, KWConv2d) for m in plain.modules())
    assert num_params(plain) + 1280 * 1000 + 1000 == expected  # paper: 3.50M / 1.97M
    # the KW models' names, minus the attentions
    backbone, _ = build_released(widen_factor, dict(budget=1))
    kw_names = {k.replace('.attention', '') for k in backbone.state_dict()
                if '.attention.' not in k and not k.startswith('warehouses.')}
    assert kw_names <= set(plain.state_dict())


def test_layouts_as_data():
    specs, overrides = mobilenet_v2_kw_layout(1.0, 'compact')
    names = [s.name for s in specs]
    # stem and all 17 depth-wise convolutions, the point-wise of the last KW stage
    # (features.15-17 and the final conv); features.14 is reassigned to stage 5: plain
    assert names[0] == 'features.0.0' and 'features.1.conv.0.0' in names
    assert 'features.14.conv.0.0' not in names and 'features.14.conv.1.0' in names
    assert [n for n in names if n.startswith(('features.15', 'features.18'))] == [
        'features.15.conv.0.0', 'features.15.conv.1.0', 'features.15.conv.2', 'features.18.0']
    assert overrides['stage6.depthwise']['budget'] == 1.0 and 'stage6.reduction' not in overrides
    specs, _ = mobilenet_v2_kw_layout(1.0, 'pointwise_depthwise')
    keys = {s.name: s.warehouse for s in specs}
    assert keys['features.2.conv.0.0'] == keys['features.1.conv.1'] == 'stage1.pointwise'
    assert keys['features.3.conv.1.0'] == keys['features.4.conv.1.0'] == 'stage2.depthwise'
    assert keys['features.18.0'] == keys['features.17.conv.0.0'] == 'stage6.pointwise'


def test_warehouse_numbering_and_beta_walk():
    backbone, head = build_released(0.5, dict(budget=4))
    # construction order: the stem, stage 1 (depth-wise before reduction, since
    # features.1 has no expansion), then expansion / depth-wise / reduction per stage
    assert [tuple(w.cells.shape[:3]) for w in backbone.warehouses][:5] == [
        (36, 16, 3), (144, 16, 1), (28, 8, 16), (4, 48, 8), (8, 96, 16)]
    layer = backbone.features[2].conv[2]  # reduction of features.2, after features.1's
    assert layer.layer_plan.first_cell == 4 * 1  # features.1.conv.1 has one mixture
    assert layer.layer_plan.beta[:3] == (4, 8, 12)  # b = 4: the counter steps by 4
    backbone, head = build_released(0.5, dict(budget=0.5, reduction=1 / 32))
    beta = head.fc.layer_plan.beta  # 40 mixtures, b = 1/2: cells where i % 2 == (i // 2) % 2
    assert beta[:8] == (0, ZERO_CELL, ZERO_CELL, 1, 2, ZERO_CELL, ZERO_CELL, 3)
    assert head.fc.kw_warehouse.num_cells == 20
    assert head.fc.attention.fc1.out_features == 40  # reduction 1/32 of 1280
    assert isinstance(backbone.features[12].conv[0][0], nn.Conv2d)  # plain in 1/2x
    assert isinstance(backbone.features[15].conv[0][0], KWConv2d)


def test_forward_shapes_out_indices_and_temperature():
    torch.manual_seed(0)
    model = KWMobileNetV2(0.5, kw_cfg=dict(budget=1), out_indices=range(8)).eval()
    set_temperature(model, 0.5)
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2), (2, 48, 2, 2),
        (2, 80, 1, 1), (2, 160, 1, 1), (2, 1280, 1, 1)]
    assert KWMobileNetV2(kw_cfg=None, out_indices=(-1, )).out_indices == (7, )


def test_frozen_stages_and_norm_eval_really_freeze(frozen_output_check):
    torch.manual_seed(0)
    model = KWMobileNetV2(0.5, kw_cfg=dict(budget=1), out_indices=(1, 2), frozen_stages=2,
                          norm_eval=True)
    model.init_weights()
    model.train()
    set_temperature(model, 0.5)
    # the stem and stages 0-1 (features.0-3) are frozen, with their warehouses:
    # 0 (stem), 1-2 (KW stage 1) and 3-4 (KW stage 2, shared with features.4)
    frozen = [model.features[i] for i in range(4)] + [model.warehouses[i] for i in range(5)]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert model.warehouses[5].cells.requires_grad
    assert model.features[4].conv[0][0].attention.fc2.weight.requires_grad
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms)  # attention norms included
    x = torch.randn(2, 3, 32, 32)
    frozen_output_check(model, x)


def test_kw_linear_cls_head():
    torch.manual_seed(0)
    head = KWLinearClsHead(10, 64, kw_cfg=dict(budget=0.5, cell_in_ratio=0.25,
                                               cell_out_ratio=1.0), dropout=0.1)
    assert isinstance(head.fc, KWLinear) and isinstance(head.dropout, nn.Dropout)
    assert tuple(head.fc.kw_warehouse.cells.shape) == (2, 10, 16, 1)
    head.init_weights()
    feats = (torch.randn(3, 64), )
    assert head(feats).shape == (3, 10)
    plain = KWLinearClsHead(10, 64, kw_cfg=None)
    assert isinstance(plain.fc, nn.Linear) and set(plain.state_dict()) == {'fc.weight', 'fc.bias'}


def test_half_budget_classifier_train_step():
    from mmengine.optim import OptimWrapper
    from mmpretrain.structures import DataSample
    torch.manual_seed(0)
    model = build_from_config(
        osp.join(REPO_ROOT, 'configs/kw_mobilenet_v2/kw1d2x-mobilenet-v2-w0.5_8xb32_in1k.py'))
    assert isinstance(model.head, KWLinearClsHead)
    model.init_weights()
    model.train()
    set_temperature(model, 0.5)
    data = dict(inputs=[torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (1, 3)])
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    cells = model.head.fc.warehouse.cells.detach().clone()
    losses = model.train_step(data, wrapper)
    assert torch.isfinite(losses['loss'])
    assert not torch.equal(cells, model.head.fc.warehouse.cells)


def test_half_budget_release_converts_and_loads(released_tsv):
    _, shapes = released_tsv('kw1d2x_mobilenetv2_050')
    torch.manual_seed(0)
    official = {k: torch.randn(s) if s else torch.tensor(0) for k, s in shapes.items()}
    converted = official_to_mmpretrain(official)
    torch.testing.assert_close(converted['head.fc.warehouse.cells'],
                               official['warehouse_manager.weights.9'])
    (released, ) = [m for m in RELEASED_MODELS if m.name == 'kw1d2x_mobilenetv2_050']
    assert identify(converted, candidates=[released]) is released
    model = build_from_config(osp.join(REPO_ROOT, released.config))
    model.load_state_dict(converted, strict=True)
    assert float(model.head.fc.attention.temperature) == 0.0


@pytest.mark.parametrize('kwargs,match', [
    (dict(widen_factor=0), 'widen_factor'), (dict(kw_layout='pointwise'), 'kw_layout'),
    (dict(out_indices=(8, )), 'out_indices'), (dict(frozen_stages=9), 'frozen_stages'),
    (dict(kw_cfg=dict(budgte=1)), 'budgte'), (dict(kw_cfg=dict(budget=0)), 'budget')])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        with torch.device('meta'):
            KWMobileNetV2(**kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=0), 'num_classes'), (dict(dropout=1.0), 'dropout'),
    (dict(kw_cfg=dict(cell_in_ratio=0.3)), 'cell_in_ratio')])
def test_head_bad_arguments(kwargs, match):
    args = dict(num_classes=10, in_channels=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KWLinearClsHead(**args)


def test_no_frozen_stages_leaves_everything_trainable():
    with torch.device('meta'):
        model = KWMobileNetV2(widen_factor=0.5, kw_cfg=dict(budget=1), frozen_stages=-1)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
