"""KWResNet: released parameter counts and warehouse shapes, freezing, errors."""

import pytest
import torch

from kw_mm import set_temperature
from kw_mm.models.backbones import KWResNet

# released models (reference README / paper Tables 1–2), with the 1000-class head
RELEASED = [
    ('kw1d4x_resnet18', 18, dict(budget=0.25), 4.03e6),
    ('kw1d2x_resnet18', 18, dict(budget=0.5), 7.43e6),
    ('kw1x_resnet18', 18, dict(budget=1), 11.93e6),
    ('kw2x_resnet18', 18, dict(budget=2), 23.24e6),
    ('kw4x_resnet18', 18, dict(budget=4), 45.86e6),
    ('kw1d2x_resnet50', 50, dict(budget=0.5, nonlocal_basis_ratio=0.0625), 17.64e6),
    ('kw1x_resnet50', 50, dict(budget=1), 28.05e6),
    ('kw4x_resnet50', 50, dict(budget=4), 102.02e6),
]


def classifier_params(backbone):
    return sum(p.numel() for p in backbone.parameters()) + backbone.feat_dim * 1000 + 1000



@pytest.mark.parametrize('name,depth,kw_cfg,paper', RELEASED, ids=[r[0] for r in RELEASED])
def test_released_parameter_counts_and_shapes(name, depth, kw_cfg, paper, released_tsv):
    with torch.device('meta'):
        backbone = KWResNet(depth, kw_cfg=kw_cfg)
    count = classifier_params(backbone)
    assert abs(count - paper) <= 0.005e6, (count, paper)
    header, shapes = released_tsv(name)
    assert count == header['params']
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()
            if not k.endswith('attention.temperature')}
    theirs = {}
    for key, shape in shapes.items():
        if key.startswith('warehouse_manager.weights.'):
            key = 'warehouses.' + key.rsplit('.', 1)[1] + '.cells'
        elif key.startswith('fc.'):
            continue
        theirs[key] = shape
    assert ours == theirs


def test_plain_baseline_has_no_warehouse():
    with torch.device('meta'):
        plain = KWResNet(18, kw_cfg=None)
    assert not hasattr(plain, 'warehouses')
    assert classifier_params(plain) == 11689512  # torchvision resnet18


def test_forward_shapes_and_out_indices():
    model = KWResNet(18, kw_cfg=dict(budget=0.5), out_indices=(0, 1, 2, 3)).eval()
    outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4),
                                            (2, 512, 2, 2)]


def test_frozen_stages_and_norm_eval_really_freeze(frozen_output_check):
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=1), out_indices=(0, 1), frozen_stages=1,
                     norm_eval=True)
    model.init_weights()
    model.train()
    set_temperature(model, 0.5)
    # the stem, layer1 and warehouse 0 (shared by layer1 and layer2.0's first conv) are frozen
    frozen = [model.conv1, model.bn1, model.layer1, model.warehouses[0]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert model.warehouses[1].cells.requires_grad
    assert model.layer2[0].conv1.attention.fc2.weight.requires_grad
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.training for m in norms)  # attention norms included
    x = torch.randn(2, 3, 64, 64)
    frozen_output_check(model, x)


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=19), 'depth'), (dict(depth=18, out_indices=(4, )), 'out_indices'),
    (dict(depth=18, frozen_stages=5), 'frozen_stages'),
    (dict(depth=18, kw_cfg=dict(budgte=1)), 'budgte'),
    (dict(depth=18, kw_cfg=dict(budget=-1)), 'budget')])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, KeyError), match=match):
        KWResNet(**kwargs)


def test_pretrained_of_another_variant_is_refused(tmp_path):
    from kw_mm.checkpoint import CheckpointMismatchError
    source = KWResNet(18, kw_cfg=dict(budget=2))
    path = tmp_path / 'kw2x.pth'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in source.state_dict().items()}}, path)
    init = dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')
    ok = KWResNet(18, kw_cfg=dict(budget=2), init_cfg=init)
    ok.init_weights()
    torch.testing.assert_close(ok.warehouses[0].cells, source.warehouses[0].cells)
    wrong = KWResNet(18, kw_cfg=dict(budget=1), init_cfg=init)
    with pytest.raises(CheckpointMismatchError,
                       match=r'warehouses\.0\.cells: found \[112, 64, 64, 1, 1\], expected \[56'):
        wrong.init_weights()


def test_batch_of_one_trains():
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=0.5)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.warehouses[1].cells.detach().clone()
    model(torch.randn(1, 3, 64, 64))[0].mean().backward()
    opt.step()
    assert not torch.equal(before, model.warehouses[1].cells)


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=1)).train()
    set_temperature(model, 0.5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))[0]
    loss = out.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('train', [True, False])
def test_empty_batch_gives_empty_features(train):
    # mmdet may hand a backbone an empty batch: plain ResNets return empty maps
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=0.5), out_indices=(0, 1, 2, 3)).train(train)
    x = torch.randn(0, 3, 64, 64, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(0, 64, 16, 16), (0, 128, 8, 8), (0, 256, 4, 4),
                                             (0, 512, 2, 2)]
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape
    cells = model.warehouses[1].cells
    assert cells.grad is not None and not cells.grad.any()


def test_trace_at_batch_one_runs_any_batch():
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=0.5)).eval()
    set_temperature(model, 0.0)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 32))
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(traced(x)[0], model(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('depth', [34, 101, 152])
def test_other_depths_build_with_kw_everywhere_but_the_stem(depth):
    with torch.device('meta'):
        model = KWResNet(depth, kw_cfg=dict(budget=1), out_indices=(0, 1, 2, 3))
    assert len(model.warehouses) == 4
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    expected = ['conv1'] + (['layer1.0.conv1', 'layer1.0.downsample.0'] if depth > 34 else [])
    assert plain == expected
