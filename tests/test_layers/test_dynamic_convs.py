"""ODConv, CondConv, DY-Conv layers and KW* (KW layers with ODConv's attentions):
every execution path against a per-sample reference, their options and errors."""
import copy

import pytest
import torch
from torch import nn

from kw_mm import KWConv1d, KWConv2d, KWLinear, set_temperature
from kw_mm.layers.dynamic import CondConv2d, DYConv2d, ODConv2d, parse_dynamic_cfg
from kw_mm.layers.execution.export import export_mode

SHAPES = {  # name: (conv arguments, input [C, H, W]); each picks another path
    '3x3': (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1), (8, 7, 7)),
    'stride2-grouped': (dict(in_channels=8, out_channels=12, kernel_size=3, stride=2,
                             padding=1, groups=2), (8, 9, 9)),
    'depthwise': (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
                  (8, 6, 6)),
    'pointwise-stride2': (dict(in_channels=8, out_channels=12, kernel_size=1, stride=2),
                          (8, 7, 7)),
    'same-even': (dict(in_channels=4, out_channels=8, kernel_size=(2, 4), padding='same'),
                  (4, 5, 6)),
}

LAYERS = {
    'odconv': lambda args, bias: ODConv2d(**args, bias=bias, kernel_num=3, temperature=2.0),
    'odconv-caf': lambda args, bias: ODConv2d(**args, bias=bias, attention_fn='caf'),
    'odconv-1kernel': lambda args, bias: ODConv2d(**args, bias=bias, kernel_num=1),
    'condconv': lambda args, bias: CondConv2d(**args, bias=bias, kernel_num=3),
    'dyconv': lambda args, bias: DYConv2d(**args, bias=bias, temperature=3.0),
    'kwstar': lambda args, bias: KWConv2d(**args, bias=bias, budget=2, omni_attention=True),
}


def make_layer(name, shape, bias=True):
    torch.manual_seed(0)
    args, size = SHAPES[shape]
    layer = LAYERS[name](args, bias)
    set_temperature(layer, 0.4)  # CAF's τ (ODConv-CAF, KW*): β in play
    with torch.no_grad():
        for param in layer.parameters():  # attentions far from 1/2, a visible bias
            if param.dim() == 1:
                param.normal_(0, 1)
    return layer, size


def check_against_reference(layer, x, context=None):
    outputs, grads = [], []
    for forward in (layer, layer.reference_forward):
        layer.zero_grad()
        x.grad = None
        with context() if context else torch.enable_grad():
            out = forward(x)
        # a loss that weighs every output differently, so misplaced gradients show
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=1e-5)
    for fast, ref in zip(*grads):
        assert (fast is None) == (ref is None)
        if fast is not None:
            torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    return outputs[0]


#: (shape, batch, mode, recompute_kernels): together every path of dense_forward
#: (one sample, per-sample CPU convolutions, batched depth-wise, 1×1 products), both
#: modes, with and without recomputed kernels
CASES = [('3x3', 3, 'train', True), ('stride2-grouped', 2, 'train', False),
         ('depthwise', 2, 'train', True), ('pointwise-stride2', 2, 'eval', True),
         ('same-even', 1, 'train', True), ('same-even', 2, 'train', False)]


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_every_path_matches_the_per_sample_reference(name):
    for shape, batch, mode, recompute in CASES:
        layer, size = make_layer(name, shape)
        layer.recompute_kernels = recompute
        layer.train(mode == 'train')
        x = torch.randn(batch, *size, requires_grad=True)
        check_against_reference(layer, x)
        with torch.no_grad():  # inference (KW*: no kernel basis, no fused path)
            torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=2e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_export_path_and_empty_batch(name):
    layer, size = make_layer(name, 'stride2-grouped')
    x = torch.randn(3, *size, requires_grad=True)
    check_against_reference(layer.eval(), x, export_mode)
    empty = torch.randn(0, *size, requires_grad=True)
    out = layer.train()(empty)
    assert out.shape == (0, 12, 5, 5)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_kwstar_attentions_change_the_output_and_every_kw_path_is_covered(monkeypatch):
    """KW* must never take a path that computes from the cells alone: with
    every native and fused path forced on, its output still equals the
    reference with ODConv's attentions, and differs from plain KW's."""
    from kw_mm import native
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)
    for shape in ('3x3', 'pointwise-stride2'):
        star, size = make_layer('kwstar', shape)
        plain = KWConv2d(**SHAPES[shape][0], budget=2)
        plain.load_state_dict(star.state_dict(), strict=False)  # the same cells and attention
        x = torch.randn(2, *size)
        for mode in (True, False):
            star.train(mode), plain.train(mode)
            with torch.no_grad():
                torch.testing.assert_close(star(x), star.reference_forward(x), atol=2e-5,
                                           rtol=1e-5)
                assert not torch.allclose(star(x), plain(x), atol=1e-3)


def test_kwstar_1d_layer_and_linear_refusal():
    torch.manual_seed(0)
    layer = KWConv1d(4, 8, 3, padding=1, omni_attention=True)
    x = torch.randn(3, 4, 9, requires_grad=True)
    check_against_reference(layer, x)
    with pytest.raises(TypeError, match="omni_attention"):
        KWLinear(8, 4, omni_attention=True)


def test_odconv_attentions_follow_odconv():
    layer = ODConv2d(32, 64, 3, padding=1, kernel_num=4)
    att = layer.attention
    assert att.fc.out_features == 16  # max(int(32 / 16), 16)
    assert (att.channel_fc.out_features, att.filter_fc.out_features,
            att.spatial_fc.out_features, att.kernel_fc.out_features) == (32, 64, 9, 4)
    depthwise = ODConv2d(32, 32, 3, groups=32).attention
    pointwise = ODConv2d(32, 64, 1).attention
    assert depthwise.filter_fc is None and pointwise.spatial_fc is None
    assert ODConv2d(320, 64, 1, kernel_num=1).attention.kernel_fc is None
    assert ODConv2d(320, 64, 1).attention.fc.out_features == 20
    # the kernel attentions sum to one (softmax), the sigmoids are in (0, 1)
    x = torch.randn(2, 32, 5, 5)
    kernel, spatial, channel, filters = layer.eval().attention(x)
    torch.testing.assert_close(kernel.sum(1), torch.ones(2))
    assert all(((a > 0) & (a < 1)).all() for a in (spatial, channel, filters))


def test_temperature_divides_the_logits():
    layer = DYConv2d(8, 8, 3, padding=1).eval()
    with torch.no_grad():  # logits that differ whatever the (ReLU'd) hidden units
        layer.attention.fc2.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
    x = torch.randn(2, 8, 5, 5)
    cold = layer.attention(x)
    layer.attention.temperature.fill_(1e4)
    hot = layer.attention(x)
    assert (cold.max(1).values > hot.max(1).values).all()
    torch.testing.assert_close(hot, torch.full_like(hot, 0.25), atol=1e-3, rtol=0)


def test_caf_starts_at_the_first_kernel():
    layer = ODConv2d(8, 8, 3, padding=1, attention_fn='caf').eval()
    set_temperature(layer, 1.0)
    kernel = layer.attention(torch.randn(2, 8, 5, 5))[0]
    torch.testing.assert_close(kernel, torch.tensor([[1.0, 0, 0, 0]] * 2))


def test_condconv_routing_is_an_unnormalised_sigmoid():
    layer = CondConv2d(8, 8, 3, padding=1).eval()
    routing = layer.attention(torch.randn(4, 8, 5, 5))
    assert routing.shape == (4, 8) and ((routing > 0) & (routing < 1)).all()
    assert not torch.allclose(routing.sum(1), torch.ones(4))


def test_deepcopy_and_state_dict_round_trip():
    layer, size = make_layer('odconv', '3x3')
    layer.eval()
    x = torch.randn(2, *size)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), layer(x))
    fresh = ODConv2d(**SHAPES['3x3'][0], kernel_num=3)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.eval()(x), layer(x))
    assert fresh.attention.temperature.item() == 2.0  # T is saved with the model


def test_builds_through_mmcv():
    from mmcv.cnn import build_conv_layer
    layer = build_conv_layer(dict(type='ODConv2d', kernel_num=2), 8, 16, 3, padding=1)
    assert isinstance(layer, ODConv2d) and layer.weight.shape == (2, 16, 8, 3, 3)


@pytest.mark.parametrize('make, message', [
    (lambda: ODConv2d(8, 8, 3, kernel_num=0), 'kernel_num must be a positive int'),
    (lambda: ODConv2d(8, 8, 3, reduction=-1), 'reduction must be a positive finite number'),
    (lambda: ODConv2d(8, 8, 3, attention_fn='sigmoid'),
     r"attention_fn must be one of \('softmax', 'caf'\), got 'sigmoid'"),
    (lambda: DYConv2d(8, 8, 3, temperature=0.5), 'temperature must be a finite number >= 1'),
    (lambda: CondConv2d(8, 6, 3, groups=4), 'must both be divisible by groups=4'),
    (lambda: CondConv2d(8, 8, 3, padding_mode='reflect'), "padding_mode must be 'zeros'"),
    (lambda: CondConv2d(8, 8, 3, recompute_kernels='yes'), 'recompute_kernels must be True'),
    (lambda: ODConv2d(8, 8, 3)(torch.randn(2, 4, 5, 5)), r'expects an input \[B, 8, H, W\]'),
    (lambda: parse_dynamic_cfg(dict(type='ODconv')),
     r"dynamic_cfg.type must be one of \['CondConv', 'DYConv', 'ODConv'\], got 'ODconv'"),
    (lambda: parse_dynamic_cfg(dict(type='CondConv', reduction=0.25)),
     r"dynamic_cfg.CondConv has no option\(s\) \['reduction'\]"),
    (lambda: parse_dynamic_cfg(dict(type='ODConv', kernel_num=2.5)),
     'dynamic_cfg.kernel_num must be a positive int'),
    (lambda: parse_dynamic_cfg([('type', 'ODConv')]), 'dynamic_cfg must be a dict or None'),
    (lambda: KWConv2d(8, 8, 3, omni_attention=1), 'omni_attention must be True or False'),
])
def test_bad_input_is_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_temperature_setter_and_hook_schedule():
    from types import SimpleNamespace

    from kw_mm.engine import DynamicConvTemperatureHook, set_dynamic_temperature
    model = nn.Sequential(ODConv2d(8, 8, 3), DYConv2d(8, 8, 3), CondConv2d(8, 8, 3))
    assert set_dynamic_temperature(model, 7.0) == 2  # CondConv has no temperature
    with pytest.raises(ValueError, match='temperature must be a finite number >= 1'):
        set_dynamic_temperature(model, 0.5)
    hook = DynamicConvTemperatureHook(epochs=2)
    ema = copy.deepcopy(model)
    scalars = {}
    runner = SimpleNamespace(model=model, hooks=[SimpleNamespace(ema_model=ema)],
                             train_dataloader=[None] * 5, iter=0,
                             message_hub=SimpleNamespace(update_scalar=scalars.__setitem__))
    seen = []
    for it in (0, 5, 10, 11):  # 10 iterations of annealing, 30 -> 1
        runner.iter = it
        hook.before_train_iter(runner, it)
        seen.append((model[0].attention.temperature.item(), ema[1].attention.temperature.item()))
    assert seen == [(30.0, 30.0), (15.5, 15.5), (1.0, 1.0), (1.0, 1.0)]
    assert scalars['train/dynamic_temperature'] == 1.0
    for bad in (dict(epochs=0), dict(iters=-1), dict(start=0.5), dict(end=float('nan'))):
        with pytest.raises(ValueError):
            DynamicConvTemperatureHook(**bad)
