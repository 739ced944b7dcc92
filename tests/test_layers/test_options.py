"""The KW options object: one declaration, one check, used by every KW layer."""
import dataclasses
import re

import pytest
import torch

import kw_mm
from kw_mm.layers import KWConv2d, KWLayer, KWLinear, KWOptions
from kw_mm.layers.builder import LayerSpec, WarehouseBuilder, parse_kw_cfg
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet
from kw_mm.models.heads import KWLinearClsHead


def test_exported_from_the_package():
    assert kw_mm.KWOptions is KWOptions
    assert issubclass(KWConv2d, KWLayer) and issubclass(KWLinear, KWLayer)


def test_every_option_is_documented_once():
    doc = KWOptions.__doc__
    args = doc[doc.index('Args:'):]
    documented = re.findall(r'^        (\w+) \(', args, flags=re.MULTILINE)
    assert documented == list(KWOptions.names()) + ['where']


def test_frozen_and_checked_again_on_replace():
    options = KWOptions(budget=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.budget = 4
    assert dataclasses.replace(options, temperature=0.5).budget == 2.0
    with pytest.raises(ValueError, match=r'temperature must be in \[0, 1\], got 2'):
        dataclasses.replace(options, temperature=2)


def test_budget_is_stored_as_float_and_defaults_are_the_papers():
    options = KWOptions(budget=1)
    assert isinstance(options.budget, float)
    assert (options.reduction, options.min_hidden, options.norm, options.attention_fn,
            options.init, options.sharing) == (1 / 16, 16, 'BN', 'caf', 'one_to_one', 'stage')


@pytest.mark.parametrize('key,value,message', [
    ('budget', float('inf'), r'budget must be a positive finite number'),
    ('reduction', float('nan'), r'reduction must be a positive finite number'),
    ('reduction', True, r'reduction must be a positive finite number'),
    ('min_hidden', 1.5, r'min_hidden must be a positive int'),
    ('cell_in_ratio', 0, r'cell_in_ratio must be None or a positive finite number'),
    ('cell_out_ratio', 'half', r"cell_out_ratio must be None or a positive .*got 'half'"),
    ('norm', 'GN', r"norm must be 'BN' or 'LN', got 'GN'"),
    ('nonlocal_basis_ratio', 1, r'nonlocal_basis_ratio must be in \[0, 1\), got 1'),
    ('temperature', True, r'temperature must be in \[0, 1\], got True'),
    ('attention_fn', 'tanh', r"attention_fn must be one of .*got 'tanh'"),
    ('init', 'two_to_one', r"init must be one of .*got 'two_to_one'"),
    ('sharing', 'stages', r"sharing must be one of .*got 'stages'"),
    ('kernel_partition', 1, r'kernel_partition must be True or False, got 1'),
])
def test_bad_values_name_the_option_and_where_it_came_from(key, value, message):
    with pytest.raises(ValueError, match=message) as direct:
        KWOptions(**{key: value})
    assert not str(direct.value).startswith('kw_cfg.')
    with pytest.raises(ValueError, match='kw_cfg.' + message):
        KWOptions.from_kw_cfg({key: value})


def test_options_that_need_each_other():
    with pytest.raises(ValueError, match=r'nonlocal_basis_ratio=0\.5 needs a budget below 1'):
        KWOptions(nonlocal_basis_ratio=0.5)
    with pytest.raises(ValueError, match=r'nonlocal_basis_ratio=0\.5 needs kernel_partition'):
        KWOptions(budget=0.5, nonlocal_basis_ratio=0.5, kernel_partition=False)


def test_from_kw_cfg():
    assert KWOptions.from_kw_cfg(None) is None
    assert KWOptions.from_kw_cfg({}) == KWOptions()
    assert KWOptions.from_kw_cfg(dict(budget=2), defaults=dict(norm='LN')) == KWOptions(
        budget=2, norm='LN')
    assert KWOptions.from_kw_cfg(dict(norm='BN'), defaults=dict(norm='LN')).norm == 'BN'
    assert KWOptions.from_kw_cfg(dict(budget=2, extra=1), extra_keys=['extra']).budget == 2
    with pytest.raises(TypeError, match='kw_cfg must be a dict or None, got list'):
        KWOptions.from_kw_cfg([('budget', 1)])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]; allowed keys are "):
        KWOptions.from_kw_cfg(dict(extra=1))
    assert parse_kw_cfg(dict(budget=2)) == KWOptions(budget=2).as_dict()
    assert parse_kw_cfg(None) is None


def test_layer_takes_an_options_object_or_keywords_alike():
    options = KWOptions(budget=2, reduction=1 / 4, min_hidden=2, temperature=0.25,
                        norm='LN', recompute_kernels=False, inference_basis=False)
    torch.manual_seed(0)
    by_object = KWConv2d(8, 16, 3, padding=1, options=options)
    torch.manual_seed(0)
    by_keywords = KWConv2d(8, 16, 3, padding=1, **{
        k: v for k, v in options.as_dict().items()
        if k not in ('sharing', 'share_across_shapes')})
    assert by_object.kw_options == by_keywords.kw_options == options
    assert not by_object.recompute_kernels and not by_object.inference_basis
    assert by_object.attention.fc1.out_features == 2
    assert float(by_object.attention.temperature) == 0.25
    assert by_object.kw_warehouse.num_cells == by_keywords.kw_warehouse.num_cells
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(by_object(x), by_keywords(x))
    # keywords override the object
    assert KWConv2d(8, 8, 1, options=options, budget=4).kw_options.budget == 4
    assert options.budget == 2


def test_layer_refuses_backbone_options_as_keywords():
    with pytest.raises(TypeError, match=r"KWConv2d\(\) got unexpected keyword argument\(s\) "
                                        r"\['sharing'\]"):
        KWConv2d(8, 8, 3, sharing='none')
    with pytest.raises(TypeError, match=r"KWLinear\(\) got unexpected keyword argument\(s\) "
                                        r"\['inference_basis'\]"):
        KWLinear(8, 8, inference_basis=False)
    with pytest.raises(TypeError, match='options must be a KWOptions or None, got dict'):
        KWConv2d(8, 8, 3, options=dict(budget=2))
    KWLinear(8, 8, options=KWOptions(inference_basis=False))  # ignored by the linear layer


def test_builder_hands_its_object_to_every_layer():
    options = KWOptions(budget=2, temperature=0.5, recompute_kernels=False)
    builder = WarehouseBuilder([LayerSpec('a', 8, 8, (3, 3), 's'),
                                LayerSpec('b', 8, 8, (1,), 't')], options)
    conv = builder.conv('a', 8, 8, 3, padding=1)
    linear = builder.linear('b', 8, 8)
    assert conv.kw_options is options and linear.kw_options is options
    assert not conv.recompute_kernels and conv.inference_basis
    assert [w.num_cells for w in builder.warehouses] == [18, 2]


@pytest.mark.parametrize('make', [
    lambda cfg: KWResNet(18, kw_cfg=cfg),
    lambda cfg: KWMobileNetV2(widen_factor=0.5, kw_cfg=cfg),
    lambda cfg: KWConvNeXt(arch='atto', kw_cfg=cfg),
], ids=['resnet', 'mobilenet_v2', 'convnext'])
def test_backbones_parse_kw_cfg_into_one_object(make):
    with torch.device('meta'):
        backbone = make(dict(temperature=0.5, recompute_kernels=False))
    options = backbone.kw_options
    assert isinstance(options, KWOptions) and options.temperature == 0.5
    assert backbone.kw_cfg == options.as_dict()
    layers = [m for m in backbone.modules() if isinstance(m, KWLayer)]
    assert layers and all(layer.kw_options is options for layer in layers)
    assert not any(layer.recompute_kernels for layer in layers)
    with pytest.raises(ValueError, match=r'kw_cfg.temperature must be in \[0, 1\], got -1'):
        make(dict(temperature=-1))


def test_convnext_defaults_to_layer_norm_attention():
    with torch.device('meta'):
        assert KWConvNeXt(arch='atto').kw_options.norm == 'LN'
        assert KWConvNeXt(arch='atto', kw_cfg=dict(norm='BN')).kw_options.norm == 'BN'
        assert KWResNet(18).kw_options.norm == 'BN'


def test_head_uses_the_object():
    from mmengine.registry import init_default_scope
    init_default_scope('mmpretrain')  # the head builds its loss in mmpretrain's registry
    head = KWLinearClsHead(10, 16, kw_cfg=dict(budget=0.5, temperature=0.0))
    assert head.fc.kw_options is head.kw_options
    assert float(head.fc.attention.temperature) == 0.0
    with pytest.raises(ValueError, match="kw_cfg.sharing='none' is not supported"):
        KWLinearClsHead(10, 16, kw_cfg=dict(budget=1, sharing='none'))
