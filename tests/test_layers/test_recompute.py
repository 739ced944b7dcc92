"""Assembled kernels are rebuilt in backward instead of kept (kw_cfg.recompute_kernels)."""
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kw_mm import KWConv1d, KWConv2d, KWConv3d, KWLinear
from kw_mm.layers.execution import dispatch
from kw_mm.models.backbones import KWResNet

LAYERS = {
    'dense 3x3': lambda r: KWConv2d(8, 16, 3, padding=1, recompute_kernels=r),
    'pointwise strided': lambda r: KWConv2d(8, 16, 1, stride=2, recompute_kernels=r),
    'depthwise': lambda r: KWConv2d(8, 8, 3, padding=1, groups=8, recompute_kernels=r),
    'conv1d bias': lambda r: KWConv1d(8, 16, 3, bias=True, recompute_kernels=r),
    'conv3d': lambda r: KWConv3d(4, 8, 3, padding=1, recompute_kernels=r),
    'linear': lambda r: KWLinear(8, 16, recompute_kernels=r),
    'b=1/2 whole kernels': lambda r: KWConv2d(8, 8, 3, budget=2, kernel_partition=False,
                                              recompute_kernels=r),
}
INPUTS = {'conv1d bias': (8, 11), 'conv3d': (4, 5, 5, 5), 'linear': (8,)}


def run(name, recompute, batch):
    torch.manual_seed(0)
    layer = LAYERS[name](recompute).train()
    x = torch.randn(batch, *INPUTS.get(name, (8, 9, 9)), requires_grad=True)
    built, kernels = [], []  # assemblies; storages of everything assembled

    def recording(method):
        def wrapper(alpha):
            result = method(alpha)
            kernels.append(StorageWeakRef(result.untyped_storage()))
            if method.__name__ == 'mix_cells':
                built.append(1)
            return result
        return wrapper
    # the CPU per-sample path keeps the mixtures, the others the reordered kernel
    # (the grouped-convolution path: flattened over the batch)
    layer.mix_cells = recording(layer.mix_cells)
    layer.assemble_kernel = recording(layer.assemble_kernel)
    original = dispatch.batched_kernel

    def batched_kernel(assemble, alpha):
        result = original(assemble, alpha)
        kernels.append(StorageWeakRef(result.untyped_storage()))
        return result
    dispatch.batched_kernel = batched_kernel
    try:
        out = layer(x)
    finally:
        dispatch.batched_kernel = original
    gc.collect()
    # is any of the forward's kernels alive until backward?
    kept = any(not kernel.expired() for kernel in kernels)
    in_forward = len(built)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    return out.detach(), grads, kept, (in_forward, len(built) - in_forward)


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_same_gradients_without_keeping_the_kernel(name, batch, assembly):
    out0, grads0, kept0, built0 = run(name, False, batch)
    out1, grads1, kept1, built1 = run(name, True, batch)
    assert kept0 and built0 == (1, 0)  # the plain autograd graph holds the kernel
    # freed after forward (or never built there: the fused CPU path), rebuilt once in backward
    assert not kept1 and built1 in ((1, 1), (0, 1))
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert len(grads1) == len(grads0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


def test_inference_and_no_grad_build_the_kernel_once():
    layer = KWConv2d(8, 16, 3, padding=1).eval()
    count = []
    mix = layer.mix_cells
    layer.mix_cells = lambda a: count.append(1) or mix(a)
    with torch.no_grad():
        layer(torch.randn(2, 8, 9, 9))
    assert len(count) == 1


def test_backbone_option_default_and_bad_value():
    with torch.device('meta'):
        model = KWResNet(18, kw_cfg=dict(recompute_kernels=False))
        default = KWResNet(18, kw_cfg=dict())
    assert not model.layer1[0].conv1.recompute_kernels
    assert default.layer1[0].conv1.recompute_kernels and KWConv2d(4, 4, 3).recompute_kernels
    with pytest.raises(ValueError, match='kw_cfg.recompute_kernels must be True or False'):
        KWResNet(18, kw_cfg=dict(recompute_kernels='yes'))


@pytest.mark.parametrize('recompute', [False, True])
def test_retained_graph_gives_the_same_gradients_twice(recompute):
    # the recomputing backward overwrites its rebuilt kernels with their gradient;
    # a second backward through a retained graph must rebuild them again
    torch.manual_seed(0)
    layer = KWConv2d(8, 16, 3, padding=1, recompute_kernels=recompute).train()
    x = torch.randn(3, 8, 9, 9, requires_grad=True)
    out = layer(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward(retain_graph=True)
    first = [g.clone() for g in (x.grad, layer.warehouse.cells.grad)]
    (out * weights).sum().backward()
    for once, twice in zip(first, (x.grad, layer.warehouse.cells.grad)):
        torch.testing.assert_close(twice, 2 * once)


def test_runs_on_devices_without_autocast():
    # 'meta' (shape inference) has no autocast state for the rebuild to copy
    with torch.device('meta'):
        layer = KWConv2d(8, 16, 3, padding=1).train()
        x = torch.empty(2, 8, 9, 9, requires_grad=True)
        out = layer(x)
        out.sum().backward()
    assert out.shape == (2, 16, 9, 9) and x.grad.shape == x.shape
