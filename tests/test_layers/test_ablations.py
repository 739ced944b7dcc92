"""The paper's ablation switches as kw_cfg values (Tables 8 and 13)."""
import pytest
import torch

from kw_mm import KWConv2d, set_temperature
from kw_mm.layers.partition import ZERO_CELL, KernelShape, plan_warehouse
from kw_mm.models.backbones import KWResNet


def attentions(layer, tau):
    set_temperature(layer, tau)
    layer.eval()
    with torch.no_grad():
        return layer.attention.attentions(torch.randn(3, layer.in_channels, 5, 5))


def test_softmax_attentions_are_a_distribution():
    a = attentions(KWConv2d(16, 16, 3, attention_fn='softmax'), 0.0)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_sigmoid_and_relu_norm_ranges():
    s = attentions(KWConv2d(16, 16, 3, attention_fn='sigmoid'), 0.0)
    assert ((s > 0) & (s < 1)).all()
    r = attentions(KWConv2d(16, 16, 3, attention_fn='relu_norm'), 0.0)
    assert (r >= 0).all() and (r.sum(-1) <= 1).all()
    c = attentions(KWConv2d(16, 16, 3), 0.0)  # CAF: signed, |α| sums to < 1
    assert (c < 0).any() and (c.abs().sum(-1) < 1).all()


def test_all_to_one_and_none():
    torch.manual_seed(0)
    a = attentions(KWConv2d(16, 16, 3, init='all_to_one'), 1.0)
    assert (a[..., :-1] == 1).all() and (a[..., -1] == 0).all()
    layer = KWConv2d(16, 16, 3, init='none')
    x = torch.randn(2, 16, 5, 5)
    layer.eval()
    outs = []
    for tau in (0.0, 1.0):
        set_temperature(layer, tau)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1])  # no τ·β term at all


def test_n_to_one_gives_int_b_cells_per_mixture():
    layer = KWConv2d(16, 16, 3, budget=2, init='n_to_one')
    beta = layer.attention.beta
    assert (beta[:, :-1].sum(-1) == 2).all()
    first = beta[0, :-1].nonzero().flatten().tolist()
    assert first == [0, 1]


def test_one_to_n_shares_each_cell_among_r_mixtures():
    plan = plan_warehouse([KernelShape('a', 16, 16, (3, 3))], 0.5, 1, 1, init='one_to_n')
    beta = plan.layers[0].beta  # m = 9, n = 4: cells 0,0,1,1,2,2,3,3 then used up
    assert beta == (0, 0, 1, 1, 2, 2, 3, 3, ZERO_CELL)


@pytest.mark.parametrize('budget,init', [(1, 'n_to_one'), (1, 'one_to_n'), (0.5, 'n_to_one'),
                                         (1, 'two_to_one')])
def test_strategy_that_does_not_fit_the_budget_is_refused(budget, init):
    with pytest.raises(ValueError, match='init'):
        KWConv2d(16, 16, 3, budget=budget, init=init)


def test_backbone_switches_keep_the_parameter_count():
    with torch.device('meta'):
        base = KWResNet(18, kw_cfg=dict(budget=1))
        soft = KWResNet(18, kw_cfg=dict(budget=1, attention_fn='softmax', init='all_to_one'))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(base) == count(soft)  # Table 8 / 13: same parameters
    with pytest.raises(ValueError, match='attention_fn'):
        KWResNet(18, kw_cfg=dict(attention_fn='tanh'))
