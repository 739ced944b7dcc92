"""The parts of mmpretrain's backbone contract the KW backbones follow:
``with_cp``, ConvNeXt's ``linear_pw_conv``, MobileNetV2's ``frozen_stages``
range, and mmpretrain's module names as read-only aliases."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from kw_mm.layers.kw_conv import KWConv2d, KWLinear
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet
from kw_mm.models.backbones.kw_resnet import BasicBlock, Bottleneck

SMALL_CONVNEXT = dict(depths=[2, 2, 2, 2], channels=[16, 32, 64, 128])
KW_CFGS = {'plain': None, 'kw': dict(budget=1, recompute_kernels=True),
           'kw-no-recompute': dict(budget=1, recompute_kernels=False)}


def peak_bytes(fn) -> int:
    """Peak CPU memory allocated while ``fn()`` runs, from the allocator's own
    allocation and free events as the profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def make_backbone(family: str, kw_cfg, with_cp: bool) -> nn.Module:
    if family == 'resnet':
        return KWResNet(18, kw_cfg=kw_cfg, stem_channels=16, base_channels=16, with_cp=with_cp,
                        zero_init_residual=False, drop_path_rate=0.1)
    if family == 'mobilenet_v2':
        return KWMobileNetV2(0.25, kw_cfg=kw_cfg, with_cp=with_cp)
    return KWConvNeXt(arch=SMALL_CONVNEXT, kw_cfg=kw_cfg, with_cp=with_cp,
                      layer_scale_init_value=0.5, drop_path_rate=0.1)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)  # the same drop-path masks in every run
    model(x)[-1].square().mean().backward()


@pytest.mark.parametrize('family,size', [('resnet', 96), ('mobilenet_v2', 32),
                                         ('convnext', 64)])
@pytest.mark.parametrize('cfg', list(KW_CFGS))
def test_with_cp_cuts_peak_memory_with_the_same_gradients(family, size, cfg):
    if family == 'mobilenet_v2' and cfg == 'kw-no-recompute':
        pytest.skip('the KW MobileNetV2 is slow on CPU; the other two families cover it')
    torch.manual_seed(0)
    plain = make_backbone(family, KW_CFGS[cfg], with_cp=False).train()
    checkpointed = make_backbone(family, KW_CFGS[cfg], with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, size, size)
    peaks = []
    for model in (plain, checkpointed):
        train_step(model, x)  # warm-up: allocator and native caches, gradient buffers
        model.zero_grad(set_to_none=False)
        peaks.append(peak_bytes(lambda: train_step(model, x)))
    assert peaks[1] < 0.95 * peaks[0], peaks
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            # equal up to float32 rounding (the KW kernels' gradients sum in another order)
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5,
                                       atol=1e-5 * float(a.grad.abs().max()), msg=name)
    # the KW option is left as configured after the checkpointed runs
    kw_layers = [m for m in checkpointed.modules() if isinstance(m, (KWConv2d, KWLinear))]
    assert all(m.recompute_kernels == (cfg == 'kw') for m in kw_layers)


def test_with_cp_matches_mmpretrain_resnet():
    """Outputs, gradients and BatchNorm statistics equal mmpretrain's ResNet
    with_cp: the checkpointed block runs twice, so its BatchNorms update their
    running statistics twice, in both."""
    from mmpretrain.models.backbones import ResNet
    torch.manual_seed(0)
    ours = KWResNet(18, kw_cfg=None, stem_channels=16, base_channels=16, with_cp=True,
                    out_indices=(3, )).train()
    ref = ResNet(18, stem_channels=16, base_channels=16, with_cp=True, out_indices=(3, ))
    ref.train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    plain = copy.deepcopy(ours)
    for block in plain.modules():
        if hasattr(block, 'with_cp'):
            block.with_cp = False
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # mmpretrain calls checkpoint without use_reentrant
        out_ref = ref(x)[0]
        out_ref.square().mean().backward()
    out = ours(x)[0]
    out.square().mean().backward()
    plain(x)[0].square().mean().backward()
    torch.testing.assert_close(out, out_ref)
    state, state_ref, state_plain = ours.state_dict(), ref.state_dict(), plain.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(value, state_ref[key], msg=key)
    assert state['layer2.0.bn1.num_batches_tracked'] == 2
    assert state_plain['layer2.0.bn1.num_batches_tracked'] == 1
    assert state['bn1.num_batches_tracked'] == 1  # the stem is not checkpointed
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_with_cp_only_when_the_input_requires_grad():
    """As mmpretrain: a block whose input needs no grad is not checkpointed
    (a frozen stem), and ``torch.autograd.grad`` works through checkpoints."""
    torch.manual_seed(0)
    model = KWResNet(18, kw_cfg=dict(budget=1), stem_channels=16, base_channels=16,
                     with_cp=True, frozen_stages=1).train()
    calls = []
    for name in ('layer1.0', 'layer2.0', 'layer2.1'):
        model.get_submodule(name).bn1.register_forward_hook(
            lambda *args, name=name: calls.append(name))
    out = model(torch.randn(2, 3, 32, 32))[0]
    (grad, ) = torch.autograd.grad(out.sum(), model.layer2[1].bn1.weight)
    # layer2.1 ran again to recompute; layer1 (frozen) and layer2.0 (its input, layer1's
    # output, needs no grad) were not checkpointed
    assert calls == ['layer1.0', 'layer2.0', 'layer2.1', 'layer2.1']
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize('cls', [KWResNet, KWMobileNetV2, KWConvNeXt])
def test_with_cp_must_be_a_bool(cls):
    args = (18, ) if cls is KWResNet else ()
    with pytest.raises(ValueError, match=r"with_cp must be True or False, got 'yes'"):
        cls(*args, kw_cfg=None, with_cp='yes')


@pytest.mark.parametrize('kw_cfg', [None, dict(budget=1)])
def test_convnext_linear_pw_conv_forms_agree(kw_cfg):
    torch.manual_seed(0)
    kwargs = dict(arch=SMALL_CONVNEXT, kw_cfg=kw_cfg, layer_scale_init_value=0.5,
                  out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    conv = KWConvNeXt(linear_pw_conv=False, **kwargs).eval()
    linear = KWConvNeXt(linear_pw_conv=True, **kwargs).eval()
    pw_type = (nn.Conv2d, nn.Linear) if kw_cfg is None else (KWConv2d, KWLinear)
    assert isinstance(conv.stages[1][0].pwconv1, pw_type[0])
    assert isinstance(linear.stages[1][0].pwconv2, pw_type[1])
    count = [sum(p.numel() for p in m.parameters()) for m in (conv, linear)]
    assert count[0] == count[1]
    state, shapes = conv.state_dict(), linear.state_dict()
    assert list(state) == list(shapes)
    # equal weights: the linear form's tensors are the convolution's without the 1x1
    linear.load_state_dict({k: v.reshape(shapes[k].shape) for k, v in state.items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = [conv(x), linear(x)]
    assert [tuple(o.shape) for o in outs[1]] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2),
                                                (2, 128, 1, 1)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert outs[0][-1].abs().max() > 0.1  # the blocks contribute (layer scale 0.5)


def test_convnext_linear_form_equals_mmpretrain():
    from mmpretrain.models.backbones import ConvNeXt
    torch.manual_seed(0)
    ours = KWConvNeXt(arch=SMALL_CONVNEXT, kw_cfg=None, linear_pw_conv=True,
                      layer_scale_init_value=0.5, out_indices=(1, 3)).eval()
    ref = ConvNeXt(arch=SMALL_CONVNEXT, linear_pw_conv=True, layer_scale_init_value=0.5,
                   out_indices=[1, 3])
    ref.eval()
    names = dict(dwconv='depthwise_conv', pwconv1='pointwise_conv1', pwconv2='pointwise_conv2')
    state = {}
    for key, value in ours.state_dict().items():
        parts = key.split('.')
        if key.startswith('stages.'):
            parts[3] = names.get(parts[3], parts[3])
        state['.'.join(parts)] = value.flatten() if parts[-1] == 'gamma' else value
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b)


def test_convnext_linear_pw_conv_must_be_a_bool():
    with pytest.raises(ValueError, match=r'linear_pw_conv must be True or False, got 1'):
        KWConvNeXt(arch=SMALL_CONVNEXT, kw_cfg=None, linear_pw_conv=1)


def test_mobilenet_v2_frozen_stages_range_is_mmpretrains():
    from mmpretrain.models.backbones import MobileNetV2
    for bad in (8, -2):
        with pytest.raises(ValueError, match=r'range\(-1, 8\)'):
            MobileNetV2(frozen_stages=bad)
        with pytest.raises(ValueError, match=rf'frozen_stages must be in range\(-1, 8\).*'
                                             rf'got {bad}'):
            KWMobileNetV2(0.25, kw_cfg=None, frozen_stages=bad)
    model = KWMobileNetV2(0.25, kw_cfg=None, frozen_stages=7).train()
    assert not any(p.requires_grad for p in model.features[:18].parameters())
    assert all(p.requires_grad for p in model.features[18].parameters())


def test_resnet_aliases():
    for depth, norms in ((18, ('norm1', 'norm2')), (50, ('norm1', 'norm2', 'norm3'))):
        model = KWResNet(depth, kw_cfg=dict(budget=1) if depth == 18 else None)
        keys = list(model.state_dict())
        assert model.norm1 is model.bn1
        for block in model.modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                for i, name in enumerate(norms, 1):
                    assert getattr(block, name) is getattr(block, f'bn{i}')
        # no alias in the keys (the KW attentions have norms of their own)
        assert not any(part.startswith('norm') for k in keys
                       for part in k.split('.attention.')[0].split('.'))
        assert list(model.state_dict()) == keys
    block = model.layer1[0]
    with pytest.raises(AttributeError, match=r'Bottleneck.norm3 is a read-only alias of bn3.*'
                                             r'assign to bn3 instead'):
        block.norm3 = nn.BatchNorm2d(256)
    with pytest.raises(AttributeError, match='KWResNet.norm1 is a read-only alias of bn1'):
        model.norm1 = None
    with pytest.raises(AttributeError, match='read-only alias of bn1'):
        del model.norm1
    assert list(model.state_dict()) == keys and model.norm1 is model.bn1


def test_mobilenet_v2_aliases():
    model = KWMobileNetV2(0.25, kw_cfg=dict(budget=1))
    keys = list(model.state_dict())
    count = sum(p.numel() for p in model.parameters())
    assert model.conv1 is model.features[0] and model.conv2 is model.features[18]
    assert model.conv1.conv is model.features[0][0]
    assert model.conv1.norm is model.features[0][1]
    assert model.conv2.activate is model.features[18][2]
    blocks = [list(getattr(model, f'layer{i}')) for i in range(1, 8)]
    assert [len(b) for b in blocks] == [1, 2, 3, 4, 3, 3, 1]
    assert [m for b in blocks for m in b] == list(model.features[1:18])
    assert all(a is b for a, b in zip([m for b in blocks for m in b], model.features[1:18]))
    # code written against mmpretrain acts on the real modules
    model.train()
    model.layer3.eval()
    assert not model.features[5].training and model.features[7].training
    assert not model.layer3.training and model.layer4.training
    assert list(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == count
    assert not any(name.split('.')[-1] in ('conv1', 'conv2', 'layer1', 'norm', 'activate')
                   for name, _ in model.named_modules())
    with pytest.raises(AttributeError, match=r'KWMobileNetV2.layer2 is a read-only alias of '
                                             r'features\[2:4\]'):
        model.layer2 = nn.Sequential()
    with pytest.raises(AttributeError, match=r'conv2 is a read-only alias of features.18'):
        model.conv2 = nn.Identity()
    with pytest.raises(AttributeError, match=r'ConvNormAct.conv is a read-only alias of 0'):
        model.features[0].conv = nn.Identity()
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize('make', [
    lambda: KWResNet(18, frozen_stages=1), lambda: KWMobileNetV2(widen_factor=0.5),
    lambda: KWConvNeXt(arch='atto')], ids=['resnet18-frozen', 'mobilenet_v2', 'convnext'])
def test_meta_device_shapes_in_train_and_eval(make):
    """On the meta device (shape-only builds, as mmengine's and mmpretrain's tools do) every
    KW path runs and gives the shapes of a CPU run; the CPU-only paths (the native kernels,
    the inference kernel basis) are not taken."""
    with torch.device('meta'):
        model = make()
    for mode in (False, True):
        model.train(mode)
        for batch in (1, 2):
            outs = model(torch.empty(batch, 3, 64, 64, device='meta'))
            assert all(out.device.type == 'meta' and out.shape[0] == batch for out in outs)
    outs[-1].sum().backward()
    cells = [p for name, p in model.named_parameters()
             if name.endswith('cells') and p.requires_grad]  # frozen stages' have none
    assert cells and all(p.grad is not None and p.grad.device.type == 'meta' for p in cells)
