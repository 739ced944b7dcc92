"""Partition planning and β assignment, checked against cases worked by hand."""
import pytest

from kw_mm.layers.partition import ZERO_CELL, KernelShape, assign_beta, plan_warehouse


def k(name, out, inp, size=3):
    return KernelShape(name, out, inp, (size, size))


def test_resnet18_stage1_at_b1():
    # Warehouse 0 of KW ResNet18: four 3x3 64->64 convs, then layer2.0.conv1
    # (3x3 64->128) and its 1x1 downsample: cells 64x64, m = 9,9,9,9,18,2.
    kernels = [k(f'l1.{i}', 64, 64) for i in range(4)] + [k('l2.conv1', 128, 64),
                                                           k('l2.down', 128, 64, 1)]
    plan = plan_warehouse(kernels, 1)
    assert (plan.cell_out, plan.cell_in) == (64, 64)
    assert [l.num_mixtures for l in plan.layers] == [9, 9, 9, 9, 18, 2]
    assert plan.total_mixtures == 56 and plan.num_cells == 56
    assert plan.cell_shape == (56, 64, 64, 1, 1)
    # one-to-one: mixture i of the whole warehouse gets cell i
    flat = [c for l in plan.layers for c in l.beta]
    assert flat == list(range(56))
    assert [l.first_cell for l in plan.layers] == [0, 9, 18, 27, 36, 54]


def test_quarter_budget_uses_half_gcd_cells_and_zero_cell():
    kernels = [k(f'l1.{i}', 64, 64) for i in range(4)] + [k('l2.conv1', 128, 64),
                                                           k('l2.down', 128, 64, 1)]
    plan = plan_warehouse(kernels, 0.25)
    assert (plan.cell_out, plan.cell_in) == (32, 32)
    assert [l.num_mixtures for l in plan.layers] == [36, 36, 36, 36, 72, 8]
    assert plan.num_cells == 56  # int(224 / 4), paper Table 14
    # r = 4: mixture i gets a cell when i % 4 == (i // 4) % 4
    first = plan.layers[0].beta
    chosen = [i for i, c in enumerate(first) if c != ZERO_CELL]
    assert chosen == [0, 5, 10, 15, 16, 21, 26, 31, 32]
    assert [first[i] for i in chosen] == list(range(9))
    assert plan.layers[1].first_cell == 9


def test_budget_two_steps_counter_by_two():
    beta = assign_beta([3, 2], num_cells=10, budget=2)
    assert beta == (((0, 2, 4), 0), ((6, 8), 6))


def test_half_budget_pattern_by_hand():
    # r = 2: i % 2 == (i // 2) % 2 holds for i = 0, 3, 4, 7
    ((beta, first),) = assign_beta([8], num_cells=4, budget=0.5)
    assert beta == (0, ZERO_CELL, ZERO_CELL, 1, 2, ZERO_CELL, ZERO_CELL, 3)


def test_used_up_cells_fall_back_to_zero_cell():
    ((beta, _),) = assign_beta([4], num_cells=3, budget=1)
    assert beta == (0, 1, 2, ZERO_CELL)


def test_depthwise_and_grouped_partition():
    # depth-wise 3x3 over 32 and 96 channels: per-group input 1, cells 32x1
    plan = plan_warehouse([KernelShape('dw1', 32, 1, (3, 3)), KernelShape('dw2', 96, 1, (3, 3))], 1)
    assert (plan.cell_out, plan.cell_in) == (32, 1)
    assert [l.num_mixtures for l in plan.layers] == [9, 27]


@pytest.mark.parametrize('budget', [0, -1, float('nan'), 'one', True])
def test_bad_budget_is_refused(budget):
    with pytest.raises((ValueError, TypeError), match='budget'):
        plan_warehouse([k('a', 8, 8)], budget)


def test_cells_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match='cell_in_ratio'):
        plan_warehouse([k('a', 8, 6)], 1, cell_in_ratio=0.25)


def test_budget_giving_zero_cells_is_refused():
    # one 1x1 16->16 layer at b = 1 has m_t = 1 mixture; b = 0.5 would give int(0.5) = 0 cells
    with pytest.raises(ValueError, match=r'zero cells.*at least 1/1'):
        plan_warehouse([k('a', 16, 16, 1)], 0.5, cell_in_ratio=1, cell_out_ratio=1)
