"""Sharing range and kernel partition switches (paper Tables 5, 6 and 7, §3.5)."""
import math

import pytest
import torch

from kw_mm import KWConv2d, set_temperature
from kw_mm.layers import KWLayer, KWOptions
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet

#: ResNet18's classifier (512 → 1000), counted in the paper's Params column.
R18_FC = 512 * 1000 + 1000


def count(module):
    return sum(p.numel() for p in module.parameters())


def kw_layers(model):
    return [m for m in model.modules() if isinstance(m, KWLayer)]


def meta_resnet(depth=18, **kw_cfg):
    with torch.device('meta'):
        return KWResNet(depth, kw_cfg=dict(budget=1, **kw_cfg))


def attention_params(hidden, in_channels, rows, row_width):
    """fc1 (no bias) + BatchNorm1d affine + fc2 (with bias)."""
    return in_channels * hidden + 2 * hidden + (hidden + 1) * rows * row_width


def predicted_count(plain, model, cells_per_row):
    """Plain ResNet18 + cells (b = 1: as many weights as the static kernels) + attentions."""
    total = count(plain)
    for layer in kw_layers(model):
        m = layer.layer_plan.num_mixtures
        total += attention_params(layer.attention.fc1.out_features, layer.in_channels, m,
                                  cells_per_row(layer) + 1)
    return total


def test_within_each_layer_gives_every_layer_its_own_warehouse():
    model = meta_resnet(sharing='layer')
    layers = kw_layers(model)
    assert len(model.warehouses) == len(layers) == 19
    assert len({id(layer.kw_warehouse) for layer in layers}) == len(layers)
    with torch.device('meta'):
        plain = KWResNet(18, kw_cfg=None)
    # b = 1 and n = m for each layer: each row covers the layer's m cells + e_z
    predicted = predicted_count(plain, model, lambda layer: layer.layer_plan.num_mixtures)
    assert count(model) == predicted
    assert math.isclose((count(model) + R18_FC) / 1e6, 11.81, abs_tol=0.005)  # paper Table 6


def test_without_sharing_each_mixture_owns_its_cells():
    model = meta_resnet(sharing='none')
    with torch.device('meta'):
        plain = KWResNet(18, kw_cfg=None)
    assert count(model) == predicted_count(plain, model, lambda layer: 1)
    assert math.isclose((count(model) + R18_FC) / 1e6, 11.78, abs_tol=0.005)  # paper Table 6
    stage = meta_resnet()
    assert math.isclose((count(stage) + R18_FC) / 1e6, 11.93, abs_tol=0.005)


def test_without_sharing_a_mixture_ignores_other_cells():
    torch.manual_seed(0)
    layer = KWConv2d(8, 8, 3, padding=1, budget=2)  # private warehouse, shared cells
    private = meta_free_private_layer()
    x = torch.randn(2, 8, 6, 6)
    set_temperature(private, 0.3)
    private.eval()
    alpha = private.attention(x)
    assert alpha.shape == (2, 9, 2)  # m = 9 rows over the mixture's own int(b) = 2 cells
    cells = private.kw_warehouse.cells
    with torch.no_grad():
        cells[2:4] += 1.0  # mixture 1's cells: only mixture 1's block of the kernel moves
        before = private.assemble_kernel(alpha)
        cells[2:4] -= 1.0
        after = private.assemble_kernel(alpha)
    changed = (before - after).abs().flatten(2).sum(1) > 0  # [B, in·k·k]
    # mixture i = s (one 8×8 cell per kernel position s): position 1 only
    assert changed.view(2, 8, 9)[:, :, 1].all() and not changed.view(2, 8, 9)[:, :, [0, 2]].any()
    torch.testing.assert_close(private(x), private.reference_forward(x), atol=1e-5, rtol=0)
    assert layer.attention.fc2.out_features == 9 * (18 + 1)


def meta_free_private_layer():
    from kw_mm.layers.builder import LayerSpec, WarehouseBuilder
    options = KWOptions(budget=2, sharing='none')
    builder = WarehouseBuilder([LayerSpec('conv', 8, 8, (3, 3), 'stage')], options)
    return builder.conv('conv', 8, 8, 3, padding=1)


def test_block_sharing_follows_residual_blocks():
    model = meta_resnet(sharing='block')
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, KWLayer):
            groups.setdefault(id(module.kw_warehouse), []).append(name)
    assert ['layer1.1.conv1', 'layer1.1.conv2'] in groups.values()
    # the first conv of a stage keeps to its reassigned stage, the shortcut is apart
    assert ['layer2.0.conv1'] in groups.values() and ['layer2.0.downsample.0'] in groups.values()


def test_same_shaped_sharing_groups_equal_kernels_only():
    model = meta_resnet(50, share_across_shapes=False)
    for warehouse in model.warehouses:
        shapes = {(p.kernel.out_channels, p.kernel.in_channels, p.kernel.kernel_size)
                  for p in warehouse.plan.layers}
        assert len(shapes) == 1
    mixed = meta_resnet(50)
    assert len(model.warehouses) > len(mixed.warehouses)
    assert count(model) < count(mixed)  # smaller warehouses, smaller attentions (Table 7)


def test_kernel_partition_off_mixes_whole_kernels():
    torch.manual_seed(0)
    layer = KWConv2d(8, 16, 3, padding=1, budget=4, kernel_partition=False)
    warehouse = layer.kw_warehouse
    assert warehouse.cells.shape == (4, 16, 8, 3, 3)  # DY-Conv: 4 whole kernels
    assert layer.layer_plan.num_mixtures == 1
    x = torch.randn(3, 8, 7, 7)
    set_temperature(layer, 0.2)
    layer.eval()
    alpha = layer.attention(x)  # [B, 1, 4]
    expected = torch.einsum('bn,noikl->boikl', alpha[:, 0], warehouse.cells)
    torch.testing.assert_close(layer.assemble_kernel(alpha), expected)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-5, rtol=0)


def test_dy_conv_is_a_config():
    model = meta_resnet(kernel_partition=False, sharing='layer', attention_fn='softmax')
    with torch.device('meta'):
        plain = KWResNet(18, kw_cfg=None)
    for layer in kw_layers(model):
        assert layer.kw_warehouse.num_cells == 1  # b = 1 here; budget=4 gives DY-Conv (4×)
    with torch.device('meta'):
        dy4 = KWResNet(18, kw_cfg=dict(budget=4, kernel_partition=False, sharing='layer',
                                       attention_fn='softmax'))
    conv = sum(layer.kw_warehouse.cells.numel() for layer in kw_layers(model))
    assert count(dy4) - count(model) == 3 * conv + sum(
        (layer.attention.fc1.out_features + 1) * 3 for layer in kw_layers(model))
    assert count(model) > count(plain)


def test_partition_off_refuses_differently_shaped_sharing():
    with pytest.raises(ValueError, match=r'kernel_partition=False needs .* equal kernel shapes'):
        meta_resnet(kernel_partition=False)
    meta_resnet(kernel_partition=False, share_across_shapes=False)  # fine


@pytest.mark.parametrize('kw_cfg, match', [
    (dict(sharing='stages'), r"kw_cfg.sharing must be one of \('stage', 'block', 'layer', "
                             r"'none'\), got 'stages'"),
    (dict(sharing='none', budget=0.5), r'budget must be a whole number ≥ 1, got budget=0\.5'),
    (dict(kernel_partition='no'), r"kw_cfg.kernel_partition must be True or False, got 'no'"),
    (dict(share_across_shapes=0), r'kw_cfg.share_across_shapes must be True or False, got 0'),
])
def test_bad_switch_values_are_refused(kw_cfg, match):
    with pytest.raises(ValueError, match=match), torch.device('meta'):
        KWResNet(18, kw_cfg=kw_cfg)


@pytest.mark.parametrize('family', ['mobilenet_v2', 'convnext'])
@pytest.mark.parametrize('kw_cfg', [dict(sharing='layer'), dict(sharing='none'),
                                    dict(sharing='block'),
                                    dict(kernel_partition=False, sharing='layer')])
def test_switches_build_and_run_for_every_family(family, kw_cfg):
    torch.manual_seed(0)
    if family == 'mobilenet_v2':
        model = KWMobileNetV2(widen_factor=0.5, kw_cfg=dict(budget=1, **kw_cfg))
    else:
        model = KWConvNeXt(arch=dict(depths=[1, 1, 2, 1], channels=[16, 32, 64, 128]),
                           kw_cfg=dict(budget=1, **kw_cfg))
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    out[-1].mean().backward()
    assert all(torch.isfinite(o).all() for o in out)
    layers = kw_layers(model)
    owners = {id(layer.kw_warehouse) for layer in layers}
    if kw_cfg['sharing'] in ('layer', 'none'):
        assert len(owners) == len(layers)
    else:
        assert len(owners) < len(layers)


def test_builder_without_options_makes_plain_layers():
    """WarehouseBuilder(specs, None), a backbone without kw_cfg: no warehouses,
    and the layers the specs name are plain convolutions and linear layers."""
    from kw_mm.layers.builder import LayerSpec, WarehouseBuilder
    builder = WarehouseBuilder([LayerSpec('conv', 8, 8, (3, 3), 'stage')], None,
                               per_warehouse={'stage': dict(budget=2)})
    assert len(builder.warehouses) == 0
    conv = builder.conv('conv', 8, 8, 3, padding=1)
    assert type(conv) is torch.nn.Conv2d and conv.padding == (1, 1)
    assert type(builder.linear('conv', 8, 4)) is torch.nn.Linear
