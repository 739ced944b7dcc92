"""torch.compile of KW layers: one graph (no graph breaks) in training and
inference, and compiled training gives eager's outputs and gradients."""
import copy

import pytest
import torch

from kw_mm import KWConv2d

LAYERS = {
    'pointwise strided': lambda: KWConv2d(8, 16, 1, stride=2),
    'dense 3x3': lambda: KWConv2d(8, 16, 3, padding=1),
    'depthwise': lambda: KWConv2d(8, 8, 3, padding=1, groups=8),
}


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_traces_as_one_graph(name, train):
    """A graph break inside a KW layer makes torch.compile recompile the layer
    for each new shape, with dynamic shapes, which Inductor then fails on."""
    torch.manual_seed(0)
    layer = LAYERS[name]().train(train)
    x = torch.randn(2, 8, 9, 9, requires_grad=train)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_training_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(KWConv2d(4, 8, 1), torch.nn.ReLU(),
                                KWConv2d(8, 8, 3, padding=1, stride=2)).train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 8, 8)
    out = torch.compile(model, fullgraph=True)(x)
    out.square().mean().backward()
    expected = reference(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
