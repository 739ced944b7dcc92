"""FLOPs of KW layers part by part (kw_mm.analysis.complexity) and the get_flops tool."""
import math
import os.path as osp

import pytest
import torch
from tool_scripts import load_script
from torch import nn

from kw_mm import KWConv2d, KWLinear
from kw_mm.analysis.complexity import counting_forward, model_complexity, plain_counterpart
from kw_mm.apis import build_from_config
from kw_mm.checkpoint import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'analysis_tools', 'get_flops.py')
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-resnet50_shapes-cls.py')
TINY = ['--cfg-options', 'model.backbone.depth=18', 'model.head.in_channels=512']


def expected_parts(in_ch, out_ch, kernel, groups, out_spatial, cells_shape, batch, pooled):
    """The multiply-adds of one KW layer computed from its geometry: the paper's
    convolution, assembly (B·m·n·cell numel) and attention (pooling, fc1, BN, fc2)."""
    n, cell_out, cell_in = cells_shape[:3]
    k = math.prod(kernel)
    mixtures = (out_ch // cell_out) * (in_ch // groups // cell_in) * k
    hidden = max(int(in_ch / 16), 16)  # the default reduction and minimum width
    return dict(
        kw_conv=batch * out_ch * (in_ch // groups) * k * math.prod(out_spatial),
        kw_assembly=batch * mixtures * n * cell_out * cell_in,
        kw_attention=batch * (pooled + in_ch * hidden + 2 * hidden  # BatchNorm1d in eval: 2/value
                              + hidden * mixtures * (n + 1)))


@pytest.mark.parametrize('kind', ['dense', 'grouped', 'linear', 'tokens'])
def test_one_kw_layer_is_the_sum_of_its_parts(kind):
    torch.manual_seed(0)
    if kind == 'dense':  # stride 2, b = 2: n = 2m cells
        layer, x = KWConv2d(16, 32, 3, stride=2, padding=1, budget=2), torch.randn(2, 16, 9, 9)
        geometry = (16, 32, (3, 3), 1, (5, 5))
    elif kind == 'grouped':  # 'same' padding on an even kernel (an extra pad), b = 1/2
        layer = KWConv2d(16, 32, (2, 3), groups=4, padding='same', bias=False, budget=0.5)
        x, geometry = torch.randn(3, 16, 6, 7), (16, 32, (2, 3), 4, (6, 7))
    elif kind == 'linear':
        layer, x = KWLinear(48, 20, budget=1), torch.randn(3, 48)
        geometry = (48, 20, (1,), 1, (1,))
    else:  # [B, tokens, in]: the attention pools over the 5 tokens
        layer, x = KWLinear(48, 20, budget=4), torch.randn(2, 5, 48)
        geometry = (48, 20, (1,), 1, (5,))
    layer.eval()
    pooled = 0 if kind == 'linear' else math.prod(x.shape[1:])
    expected = expected_parts(*geometry, tuple(layer.kw_warehouse.cells.shape), x.shape[0],
                              pooled)

    result = model_complexity(layer, x)
    assert {k: v for k, v in result.flop_parts.items() if v} == expected
    assert result.flops == sum(expected.values())
    assert result.kw_layers == 1
    cells = layer.kw_warehouse.cells.numel()
    assert result.param_parts == dict(
        kw_cells=cells, kw_attention=sum(p.numel() for p in layer.attention.parameters()),
        other=0 if layer.bias is None else layer.bias.numel())
    # the forward that is counted computes what the layer computes
    with torch.no_grad():
        reference = layer(x)
        with counting_forward(layer):
            counted = layer(x)
    torch.testing.assert_close(counted, reference, rtol=1e-5, atol=1e-5)
    assert 'forward' not in vars(layer)  # the layer's own forward is back


def test_plain_layers_are_mmengines_count_and_kw_parts_add_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                          KWConv2d(16, 16, 1, budget=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = model_complexity(model, x)
    plain = dict(conv=16 * 3 * 9 * 64, norm=2 * 16 * 64, linear=16 * 4,
                 other=16 * 64)  # adaptive_avg_pool2d: one addition per input value
    layer = expected_parts(16, 16, (1, 1), 1, (8, 8), tuple(model[2].kw_warehouse.cells.shape),
                           1, 16 * 64)
    assert result.flop_parts == {**plain, **layer}
    assert result.flops == sum(plain.values()) + sum(layer.values())
    assert result.params == sum(p.numel() for p in model.parameters())


def test_attention_products_are_counted():
    class Attention(nn.Module):
        def forward(self, x):  # q [1, 2 heads, 5, 8], k and v [1, 2, 7, 8] / [1, 2, 7, 6]
            q, k, v = x[..., :5, :8], x[..., :8], x[..., 8:14]
            return nn.functional.scaled_dot_product_attention(q, k, v)

    result = model_complexity(Attention(), torch.randn(1, 2, 7, 14))
    assert result.flop_parts['other'] == result.flops == 2 * (5 * 7 * 8 + 5 * 7 * 6)


# --- the tool ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tool():
    return load_script(TOOL)


@pytest.fixture(scope='module')
def demo_counts(tool):
    """The tiny demo classifier (KW ResNet18, 3 classes) and its plain counterpart at 32²."""
    cfg = tool.load_config(DEMO_CONFIG, {'model.backbone.depth': 18,
                                         'model.head.in_channels': 512})
    result, what = tool.count(cfg, (32, 32))
    return result, tool.count_plain(cfg, (32, 32)), what


def test_kw_against_its_plain_counterpart(demo_counts):
    kw, plain, what = demo_counts
    assert what == 'ImageClassifier: backbone, neck and head'
    assert kw.input_shape == plain.input_shape == (1, 3, 32, 32)
    assert kw.kw_layers > 0 and plain.kw_layers == 0
    # ResNet18 without its classifier, and a 512 → 3 linear head
    assert plain.params == 11_176_512 + 512 * 3 + 3
    assert plain.param_parts['kw_cells'] == plain.param_parts['kw_attention'] == 0
    # a KW convolution costs what the static convolution of its shape costs; the
    # assembly and the attention come on top
    assert kw.flop_parts['kw_conv'] + kw.flop_parts['conv'] == plain.flop_parts['conv']
    for part in ('linear', 'norm', 'other'):
        assert kw.flop_parts[part] == plain.flop_parts[part]
    assert plain.flop_parts['kw_assembly'] == plain.flop_parts['kw_attention'] == 0
    assert kw.flop_parts['kw_assembly'] > 0 and kw.flop_parts['kw_attention'] > 0
    assert kw.flops == plain.flops + kw.flop_parts['kw_assembly'] + kw.flop_parts['kw_attention']


def test_a_detector_counts_its_backbone_and_neck(tool):
    cfg = tool.load_config(osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_kw_r50_shapes.py'),
                           {'model.backbone.depth': 18,
                            'model.neck.in_channels': [64, 128, 256, 512]})
    result, what = tool.count(cfg, (64, 96))
    assert what == 'MaskRCNN: FLOPs of the backbone and neck, parameters of the whole model'
    assert result.input_shape == (1, 3, 64, 96)
    assert result.kw_layers > 0 and result.flop_parts['kw_assembly'] > 0
    assert result.flop_parts['linear'] == 0  # no RoI head (its FC layers) was run
    model = build_from_config(cfg)
    assert result.params == sum(p.numel() for p in model.parameters())  # the heads' included


def test_report_and_table(tool, demo_counts, capsys):
    kw, plain, what = demo_counts
    text = tool.report('demo.py', kw, plain, what)
    assert 'KW layers: kernel assembly (Eq. 3)' in text
    assert f'{kw.flops / plain.flops:.2f}x' in text
    row = tool.table_row('demo.py', kw, plain)
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[0] == '`demo.py`' and cells[1] == f'{kw.params / 1e6:.2f}M'
    assert cells[2:] == [tool.human(v) for v in (kw.flops, kw.flop_parts['kw_conv'],
                                                 kw.flop_parts['kw_assembly'],
                                                 kw.flop_parts['kw_attention'], plain.flops)]
    assert tool.human(2_214_000_000) == '2.21 G' and tool.human(4_510_000) == '4.51 M'
    assert len(cells) == tool.TABLE_HEADER.splitlines()[0].count('|') - 1


def test_arguments_are_checked(tool, tmp_path, capsys):
    assert tool.parse_args(['a.py', '--shape', '64']).shape == (64, 64)
    assert tool.parse_args(['a.py', 'b.py', '--shape', '32', '48']).configs == ['a.py', 'b.py']
    for shape, message in ((['1', '2', '3'], '--shape takes H W or one size, got 3 values'),
                           (['0'], '--shape sizes must be positive, got 0')):
        with pytest.raises(SystemExit):
            tool.parse_args(['a.py', '--shape', *shape])
        assert message in capsys.readouterr().err
    # every config is checked before the first one is counted
    with pytest.raises(FileNotFoundError, match='config not found: .*missing.py'):
        tool.main([DEMO_CONFIG, str(tmp_path / 'missing.py'), '--table'])
    # KW layers that no kw_cfg builds: no plain counterpart to compare with
    config = tmp_path / 'bare_layer.py'
    config.write_text("custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)\n"
                      "model = dict(type='KWConv2d', in_channels=3, out_channels=8, "
                      "kernel_size=3)\n")
    with pytest.raises(tool.PlainCounterpartError, match='still has 1 KW layer.*--no-plain'):
        tool.main([str(config), '--shape', '8'])
    [row] = tool.main([str(config), '--shape', '8', '--no-plain', '--table'])
    assert row.endswith('| – |')


def test_plain_counterpart_sets_every_kw_cfg_to_none():
    import kw_mm  # noqa: F401  (registers KWLinearClsHead)
    model = dict(type='ImageClassifier',
                 backbone=dict(type='KWConvNeXt', kw_cfg=dict(budget=1),
                               kw_warehouses=dict(stage3=dict(budget=0.75))),
                 head=dict(type='KWLinearClsHead', num_classes=10, in_channels=8))
    plain = plain_counterpart(model)
    assert plain['backbone'] == dict(type='KWConvNeXt', kw_cfg=None)
    assert plain['head']['kw_cfg'] is None  # KWLinearClsHead is KW by default
    assert model['backbone']['kw_cfg'] == dict(budget=1)  # the original is untouched
