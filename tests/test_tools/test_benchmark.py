"""tools/benchmark.py end to end on tiny settings (batch 1, one repetition),
and its argument checks."""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
from tool_scripts import load_script

from kw_mm.checkpoint import REPO_ROOT

TOOL = osp.join(REPO_ROOT, 'tools', 'benchmark.py')


def load_tool():
    return load_script(TOOL)


@pytest.mark.parametrize('device, message', [
    ('gpu', "--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ('meta', "--device must be 'cpu', 'cuda' or 'cuda:N', got 'meta'"),
    ('cuda:x', "--device must be 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
])
def test_bad_device_is_a_usage_error(device, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--device', device, '--suite', 'resnet18'])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available here')
def test_cuda_device_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--device', 'cuda', '--suite', 'resnet18'])
    assert exit_info.value.code == 2
    assert '--device cuda: CUDA is not available here' in capsys.readouterr().err


def test_cpu_device_is_accepted(monkeypatch):
    """A valid device passes the check and reaches the measurement."""
    tool = load_tool()
    seen = {}

    def fake_run(pairs, kinds, device, *args, **kwargs):
        seen.update(pairs=pairs, kinds=kinds, device=device)
        return []
    monkeypatch.setattr(tool, 'run', fake_run)
    tool.main(['--device', 'cpu', '--suite', 'resnet18', '--inputs', 'cls'])
    assert seen == dict(pairs={'resnet18': tool.SUITES['resnet18']}, kinds=['cls'], device='cpu')


def test_suite_pairs_each_measured_and_tabled(tmp_path):
    out, table = tmp_path / 'rows.json', tmp_path / 'table.md'
    result = subprocess.run(
        [sys.executable, TOOL, '--suite', 'resnet18,mobilenet_v2', '--inputs', 'cls',
         '--reps', '1', '--warmup', '0', '--cls-batch', '1', '--no-memory',
         '--json', str(out), '--markdown', str(table)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert [(r['pair'], r['mode']) for r in rows] == [
        ('resnet18', 'infer'), ('resnet18', 'train'),
        ('mobilenet_v2', 'infer'), ('mobilenet_v2', 'train')]
    for row in rows:
        assert row['input'] == 'cls' and row['batch'] == 1
        assert row['a_median_s'] > 0 and row['b_median_s'] > 0
        assert abs(row['ratio'] - row['b_median_s'] / row['a_median_s']) < 1e-9
        assert 'kw1x' in row['a'] and 'kw' not in osp.basename(row['b'])
    markdown = table.read_text()
    assert markdown.count('| resnet18 |') == 2 and markdown.count('| mobilenet_v2 |') == 2
    # the parent prints every pair's rows as they come
    assert result.stdout.count('| resnet18 | cls b1 |') == 2
    assert result.stdout.count('| mobilenet_v2 | cls b1 |') == 2


@pytest.mark.parametrize('args, message', [
    (['--amp', 'bf16'], '--onnx exports float32 models: --amp does not apply'),
    (['--onnx-batches', '1,0'], "--onnx-batches must be comma-separated positive ints, got '1,0'"),
    (['--onnx-batches', 'eight'], "--onnx-batches must be comma-separated positive ints"),
    (['--onnx-levels', 'all,fast'], "--onnx-levels: unknown level(s) ['fast']; choose from"),
    (['--methods', 'resnet50'], '--onnx times the --suite pairs or two configs, not --methods'),
])
def test_bad_onnx_options_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--onnx', '--suite', 'resnet18', *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_onnx_without_onnxruntime_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--onnx', '--suite', 'resnet18'])
    assert exit_info.value.code == 2
    assert 'onnxruntime' in capsys.readouterr().err


@pytest.mark.parametrize('args, pairs', [
    (['--suite', 'resnet18'], 'resnet18'),
    (['A.py', 'B.py'], 'A vs B'),
])
def test_onnx_mode_runs_onnxruntime_not_pytorch(args, pairs, monkeypatch, capsys):
    tool = load_tool()
    seen = {}

    def fake_run_onnx(pairs, batches, levels, threads, warmup, reps, **kwargs):
        seen.update(pairs=pairs, batches=batches, levels=levels, threads=threads, reps=reps)
        return []
    monkeypatch.setattr(tool, 'run_onnx', fake_run_onnx)
    monkeypatch.setattr(tool, 'run', lambda *a, **k: pytest.fail('PyTorch timing ran'))
    tool.main(['--onnx', *args, '--onnx-batches', '2,4', '--onnx-levels', 'disable',
               '--reps', '3', '--threads', '1'])
    expected = tool.SUITES['resnet18'] if pairs == 'resnet18' else ('A.py', 'B.py')
    assert seen == dict(pairs={pairs: expected}, batches=[2, 4], levels=['disable'], threads=1,
                        reps=3)
    assert 'ONNX Runtime 1.' in capsys.readouterr().out  # the header names it


def test_methods_mode_pairs_every_method_with_the_plain_model(monkeypatch, capsys):
    tool = load_tool()
    seen = {}

    def fake_run(pairs, kinds, device, *args, **kwargs):
        seen.update(pairs=pairs, kinds=kinds)
        rows = []
        for i, (name, (a, b)) in enumerate(pairs.items()):
            for mode in ('infer', 'train'):
                row = dict(pair=name, a=a, b=b, input='cls', mode=mode, ratio=1 / (i + 2),
                           a_params=(i + 2) * 10**6, b_params=10**6)
                if mode == 'train':
                    row['memory_ratio'] = 1.5
                rows.append(row)
        return rows
    monkeypatch.setattr(tool, 'run', fake_run)
    tool.main(['--device', 'cpu', '--methods', 'resnet50,mobilenet_v2', '--inputs', 'cls',
               '--same-process'])
    methods = ['dyconv4x', 'odconv4x', 'kw1d2x', 'kw1x', 'kw4x']
    assert list(seen['pairs']) == [f'{f}:{m}' for f in ('resnet50', 'mobilenet_v2')
                                   for m in methods]
    for name, (a, b) in seen['pairs'].items():
        family, method = name.split(':')
        plain = 'resnet50_8xb32' if family == 'resnet50' else 'mobilenet-v2_8xb32'
        assert osp.basename(b).startswith(plain) and osp.basename(a).startswith(method)
        assert osp.exists(osp.join(REPO_ROOT, a)) and osp.exists(osp.join(REPO_ROOT, b))
    out = capsys.readouterr().out
    assert '| resnet50 | odconv4x (cls) | 3.00M | 3.00x | 0.33x | 0.33x | 1.50x |' in out
    assert out.count('(cls) |') == 10


@pytest.mark.parametrize('argv, message', [
    (['--methods', 'resnet18'], "--methods: unknown model famil(y/ies) ['resnet18']"),
    (['--suite', 'resnet50:odconv8x'], "--suite: unknown pair(s) ['resnet50:odconv8x']"),
])
def test_methods_mode_bad_names_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--device', 'cpu', *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_settle_batch_norm_gives_a_fresh_kw_model_unit_scale_activations():
    """A freshly built KW MobileNetV2 at τ = 0 keeps BatchNorm's initial
    statistics, and its activations vanish layer after layer (into denormal
    floats, which would time the CPU's slow path instead of the model);
    settle_batch_norm gives it a trained model's unit-scale activations and
    leaves the attentions' BatchNorm1d, the momenta and the mode as they were."""
    from kw_mm import KWMobileNetV2, set_temperature
    tool = load_tool()
    torch.manual_seed(0)
    model = KWMobileNetV2(kw_cfg=dict(budget=1.0))
    set_temperature(model, 0.0)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    norms2d = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms1d = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms2d and norms1d
    momenta = [m.momentum for m in norms2d]
    with torch.no_grad():
        before = model(x)[-1].abs().mean().item()
    tool.settle_batch_norm(model, batches=2, batch=4, size=64)
    with torch.no_grad():
        after = model(x)[-1].abs().mean().item()
    assert after > 0.1 > 1e-3 > before, (before, after)
    assert not model.training and not any(m.training for m in model.modules())
    assert [m.momentum for m in norms2d] == momenta
    assert all(int(m.num_batches_tracked) == 2 for m in norms2d)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var))
               and int(m.num_batches_tracked) == 0 for m in norms1d)


@pytest.mark.parametrize('modes, expected', [
    ('infer', ('infer', )), ('train', ('train', )), ('train,infer', ('infer', 'train'))])
def test_modes_choose_what_is_timed(modes, expected, monkeypatch):
    tool = load_tool()
    seen = {}
    monkeypatch.setattr(tool, 'run', lambda *args, **kwargs: seen.update(modes=args[-1]) or [])
    tool.main(['--device', 'cpu', '--suite', 'resnet18', '--inputs', 'cls', '--modes', modes])
    assert seen == dict(modes=expected)


@pytest.mark.parametrize('modes', ['', 'eval', 'infer,backward'])
def test_bad_modes_are_usage_errors(modes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(['--device', 'cpu', '--suite', 'resnet18', '--modes', modes])
    assert exit_info.value.code == 2
    assert f"--modes must be a comma-separated subset of ['infer', 'train'], got {modes!r}" \
        in capsys.readouterr().err
