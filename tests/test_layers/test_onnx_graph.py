"""The ONNX graph formulation of KW convolutions (kw_mm/layers/execution/onnx_graph.py)
gives the per-sample reference's values for every branch it takes, in eager mode."""
import pytest
import torch

from kw_mm import KWConv1d, KWConv2d, KWConv3d, set_temperature
from kw_mm.layers.execution import onnx_graph
from kw_mm.layers.execution.geometry import mixture_to_kernel
from kw_mm.layers.execution.onnx_graph import kernel_from_mixtures, onnx_forwards

RATIOS = dict(cell_in_ratio=0.25, cell_out_ratio=0.5)  # 4 input and 2 output cell groups
# (name, layer, input size): which branch of onnx_conv_forward each one takes
CASES = [
    ('3x3', lambda: KWConv2d(8, 12, 3, padding=1, budget=1), (7, 6)),
    ('3x3 cell groups, stride 2', lambda: KWConv2d(32, 16, 3, stride=2, padding=1, budget=2,
                                                    **RATIOS), (7, 6)),
    ('1x1, one input group', lambda: KWConv2d(16, 32, 1, budget=1), (5, 5)),
    ('1x1 strided', lambda: KWConv2d(16, 32, 1, stride=2, budget=1), (5, 5)),
    ('1x1 cell groups, large map: reorder', lambda: KWConv2d(32, 16, 1, budget=1, **RATIOS),
     (5, 5)),
    ('1x1 cell groups, small map: sum', lambda: KWConv2d(32, 16, 1, budget=1, **RATIOS), (2, 3)),
    ('depth-wise', lambda: KWConv2d(8, 8, 3, padding=1, groups=8, budget=1), (6, 6)),
    ('grouped, same padding', lambda: KWConv2d(8, 12, 4, padding='same', groups=4, budget=1),
     (6, 6)),
    ('whole-kernel cells', lambda: KWConv2d(8, 12, 3, padding=1, budget=2,
                                            kernel_partition=False), (6, 6)),
    ('1x1 kernel basis', lambda: KWConv2d(8, 12, 1, budget=40), (5, 5)),
    ('3x3 kernel basis', lambda: KWConv2d(8, 12, 3, padding=1, budget=16), (5, 5)),
    ('KW* (ODConv attentions)', lambda: KWConv2d(8, 12, 3, padding=1, budget=1,
                                                 omni_attention=True), (6, 6)),
    ('1-d dilated', lambda: KWConv1d(8, 8, 3, padding=2, dilation=2, budget=1), (9, )),
    ('3-d', lambda: KWConv3d(4, 8, 3, padding=1, budget=1), (3, 4, 5)),
]


@pytest.mark.parametrize('name,build,size', CASES, ids=[c[0] for c in CASES])
def test_onnx_formulation_equals_the_reference(name, build, size):
    torch.manual_seed(0)
    layer = build().eval()
    set_temperature(layer, 0.5)  # kernels differ per sample
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, layer.in_channels, *size)
    with torch.no_grad():
        reference = layer.reference_forward(x)
        with onnx_forwards(layer) as switched:
            out = layer(x)
        assert switched == 1
        assert 'forward' not in layer.__dict__  # the layer's own forward is back
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    with torch.no_grad(), onnx_forwards(layer):  # an empty batch gives an empty output
        assert layer(x[:0]).shape == (0, *reference.shape[1:])


@pytest.mark.parametrize('inference_basis', [True, False])
def test_kernel_basis_where_the_layer_uses_it(inference_basis, monkeypatch):
    calls = []
    original = onnx_graph.build_kernel_basis
    monkeypatch.setattr(onnx_graph, 'build_kernel_basis',
                        lambda *args: calls.append(1) or original(*args))
    small = KWConv2d(8, 12, 1, budget=4).eval()  # 4 cells: mixing 17 rows would not pay
    large = KWConv2d(8, 12, 1, budget=40, inference_basis=inference_basis).eval()
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        reference = large.reference_forward(x)
        with onnx_forwards(torch.nn.Sequential(small, large)):
            assert calls == ([1] if inference_basis else [])  # built once, on entry
            small(x)
            out = large(x)
    assert len(calls) == int(inference_basis)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_kernel_reorder_is_the_layers_reorder():
    layer = KWConv2d(32, 16, 3, padding=1, budget=2, **RATIOS)
    g = layer.geometry
    assert (g.out_groups, g.in_groups, g.spatial_positions) == (2, 4, 9)
    mixed = torch.randn(2, g.num_mixtures, g.cell_out * g.cell_in)
    assert torch.equal(kernel_from_mixtures(g, mixed), mixture_to_kernel(g, mixed))


def test_pointwise_branches_are_chosen_by_map_size(monkeypatch):
    calls = []
    original = onnx_graph.kernel_from_mixtures
    monkeypatch.setattr(onnx_graph, 'kernel_from_mixtures',
                        lambda *args: calls.append(1) or original(*args))
    layer = KWConv2d(32, 16, 1, budget=1, **RATIOS).eval()
    with torch.no_grad(), onnx_forwards(layer):
        layer(torch.randn(1, 32, 2, 3))  # 6 positions × 4 groups < 32 channels: summed
        assert calls == []
        layer(torch.randn(1, 32, 5, 5))
        assert calls == [1]


def test_onnx_forwards_restores_the_forward_on_error():
    layer = KWConv2d(4, 4, 3, padding=1)
    cells = layer.kw_warehouse.cells
    with pytest.raises(RuntimeError, match='inside'):
        with onnx_forwards(torch.nn.Sequential(layer)):
            assert 'forward' in layer.__dict__
            # the cells as [n, cell numel], the same storage
            flat = layer.kw_warehouse.cells
            assert flat.shape == (cells.shape[0], cells[0].numel())
            assert flat.data_ptr() == cells.data_ptr()
            raise RuntimeError('inside')
    assert 'forward' not in layer.__dict__
    assert layer.kw_warehouse.cells is cells
    assert [name for name, _ in layer.named_parameters()].count('warehouse.cells') == 1
    with pytest.raises(ValueError, match=r'KWConv2d expects a 4-D input'):
        with onnx_forwards(layer):
            layer(torch.randn(4, 5, 5))
