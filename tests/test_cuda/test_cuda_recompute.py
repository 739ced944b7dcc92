"""``recompute_kernels`` on CUDA: the same gradients as keeping the assembled
kernels, and the kernels really not kept between forward and backward."""
import pytest
import torch

from kw_mm import KWConv2d, set_temperature
from kw_mm.models.backbones import KWResNet

pytestmark = pytest.mark.cuda

LAYERS = {
    'dense 3x3': lambda r: KWConv2d(16, 32, 3, padding=1, recompute_kernels=r),
    'pointwise strided': lambda r: KWConv2d(16, 32, 1, stride=2, recompute_kernels=r),
    'depthwise': lambda r: KWConv2d(16, 16, 3, padding=1, groups=16, recompute_kernels=r),
}


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    out = module(x)
    out = out[-1] if isinstance(out, (tuple, list)) else out
    (out.float().square().mean()).backward()
    return [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize('name', sorted(LAYERS))
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'amp-fp16'])
def test_layer_gradients_equal_with_and_without(name, amp, deterministic_cuda):
    x = torch.randn(4, 16, 12, 12, device='cuda')
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = LAYERS[name](recompute).cuda().train()
        with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
            grads[recompute] = _grads(layer, x)
    for kept, rebuilt in zip(grads[False], grads[True]):
        assert kept is not None and rebuilt is not None
        torch.testing.assert_close(rebuilt, kept, rtol=1e-5, atol=1e-6)


def test_backbone_gradients_equal_with_and_without(deterministic_cuda):
    x = torch.randn(4, 3, 64, 64, device='cuda')
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = KWResNet(depth=18, kw_cfg=dict(budget=1, recompute_kernels=recompute))
        model.init_weights()
        set_temperature(model, 0.5)
        grads[recompute] = _grads(model.cuda().train(), x)
    assert len(grads[False]) == len(grads[True])
    for kept, rebuilt in zip(grads[False], grads[True]):
        torch.testing.assert_close(rebuilt, kept, rtol=1e-5, atol=1e-6)


def test_kernels_not_kept_until_backward():
    """Between forward and backward, recompute_kernels holds less memory by
    about the batch's assembled kernels (B × the layer's kernel)."""
    batch, channels = 16, 256
    kernel_bytes = batch * channels * channels * 9 * 4
    held = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = KWConv2d(channels, channels, 3, padding=1,
                         recompute_kernels=recompute).cuda().train()
        x = torch.randn(batch, channels, 8, 8, device='cuda', requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = layer(x)
        torch.cuda.synchronize()
        held[recompute] = torch.cuda.memory_allocated() - base
        out.square().mean().backward()  # the rebuilt kernel serves the backward pass
        assert layer.kw_warehouse.cells.grad is not None
        del layer, x, out
    assert held[False] - held[True] > 0.8 * kernel_bytes, (held, kernel_bytes)
