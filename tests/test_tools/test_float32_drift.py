"""tools/analysis_tools/float32_drift.py: argument checks and a two-iteration run."""
import json
import os.path as osp

import pytest
from tool_scripts import load_script

from kw_mm.checkpoint import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'analysis_tools', 'float32_drift.py')


def load_tool():
    return load_script(TOOL)


@pytest.mark.parametrize('argv, message', [
    (['--variants', 'kw-bn,resnet'], "--variants: unknown ['resnet']"),
    (['--iters', '0'], '--iters must be a positive int, got 0'),
    (['--base-channels', '-1'], '--base-channels must be a positive int, got -1'),
    (['--size', '16'], '--size must be at least 32'),
    (['--lr', '0'], '--lr must be positive, got 0.0'),
    (['--tau-iters', '-2'], '--tau-iters must be >= 0, got -2'),
    (['--depth', '20'], 'invalid choice: 20'),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults():
    args = load_tool().parse_args([])
    assert args.variants == ['kw-bn', 'kw-ln', 'plain']
    assert (args.iters, args.batch, args.size, args.depth) == (300, 8, 64, 18)
    assert args.tau_iters == 100


def test_two_iterations_of_a_tiny_model(tmp_path, capsys):
    out = tmp_path / 'drift.json'
    results = load_tool().main([
        '--variants', 'kw-bn,plain', '--iters', '2', '--interval', '1', '--batch', '2',
        '--size', '32', '--base-channels', '8', '--threads', '1',
        '--data-root', str(tmp_path / 'shapes'), '--json', str(out)])
    assert sorted(results) == ['kw-bn', 'plain']
    for rows in results.values():
        assert [r['iter'] for r in rows] == [0, 1]
        first = rows[0]  # same initial weights: only rounding separates the runs
        assert first['param'] == pytest.approx(0, abs=1e-6)
        assert 0 <= first['loss_diff'] < 1e-4
        assert 0 < first['grad'] < 1e-2 and first['step'] == pytest.approx(first['grad'])
        assert rows[1]['param'] > 0  # one float32 step later the parameters differ
    assert json.loads(out.read_text())['results'].keys() == results.keys()
    printed = capsys.readouterr().out
    assert printed.count(' kw-bn ') == 2 and printed.count(' plain ') == 2
