"""Mixed precision on CUDA: an AMP (float16) training step of a KW classifier,
and a float16 forward of each backbone family close to its float32 forward."""
import copy

import pytest
import torch

from kw_mm import set_temperature
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet

pytestmark = pytest.mark.cuda

BACKBONES = {
    'KWResNet': lambda: KWResNet(depth=18, kw_cfg=dict(budget=1)),
    'KWMobileNetV2': lambda: KWMobileNetV2(widen_factor=0.5, kw_cfg=dict(budget=1)),
    'KWConvNeXt': lambda: KWConvNeXt(arch=dict(depths=[1, 1, 2, 1],
                                               channels=[32, 64, 128, 256]),
                                     kw_cfg=dict(budget=1)),
}


def _build(name):
    torch.manual_seed(0)
    model = BACKBONES[name]()
    model.init_weights()
    set_temperature(model, 0.5)
    return model.cuda()


def _last(outputs):
    return outputs[-1] if isinstance(outputs, (tuple, list)) else outputs


def test_amp_fp16_training_step():
    model = _build('KWResNet').train()
    head = torch.nn.Linear(512, 4).cuda()
    params = list(model.parameters()) + list(head.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler('cuda')
    x = torch.randn(8, 3, 64, 64, device='cuda')
    labels = torch.arange(8, device='cuda') % 4
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.float16):
            features = _last(model(x))
            assert features.dtype == torch.float16  # the KW convolutions ran in fp16
            logits = head(features.mean((2, 3)))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)  # fp32 master weights
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in params)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert sum(moved) > len(params) // 2, 'the optimizer step left most parameters unchanged'


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_fp16_forward_matches_fp32(name):
    model = _build(name).eval()
    half = copy.deepcopy(model).half()
    x = torch.randn(2, 3, 64, 64, device='cuda')
    with torch.no_grad():
        reference = _last(model(x))
        out = _last(half(x.half()))
    assert out.dtype == torch.float16 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 2e-2, f'{name}: float16 output differs from float32 by {error:.2e} (relative)'
