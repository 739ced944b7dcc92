"""KWMemoryHook records memory at the iterations asked for, and the soak tool's arguments."""
import json
import os
import os.path as osp
import sys
from types import SimpleNamespace

import pytest
from mmengine.logging import MessageHub

from kw_mm.checkpoint import REPO_ROOT
from kw_mm.engine import KWMemoryHook


def fake_runner(tmp_path):
    return SimpleNamespace(iter=0, work_dir=str(tmp_path),
                           message_hub=MessageHub.get_instance('kw_memory_hook_test'))


def test_records_first_interval_and_requested_iterations(tmp_path):
    hook = KWMemoryHook(interval=4, record_iters=(3, 10))
    runner = fake_runner(tmp_path)
    for i in range(10):
        runner.iter = i
        hook.after_train_iter(runner, i)
    assert [r['iter'] for r in hook.records] == [1, 3, 4, 8, 10]
    last = hook.records[-1]
    assert last['peak_rss_mib'] >= last['rss_mib'] > 0
    # anonymous + file-backed pages: all of the resident set but shared memory
    assert 0 < last['rss_anon_mib'] + last['rss_file_mib'] <= last['rss_mib'] + 1
    # the same resident size as /proc/self/statm says (pages), within what a few
    # allocations between the two readings can change
    with open('/proc/self/statm') as f:
        resident = int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    assert abs(hook.snapshot()['rss_mib'] - resident) < 0.05 * resident
    assert runner.message_hub.get_scalar('train/rss_mib').current() == last['rss_mib']
    hook.after_train(runner)
    with open(osp.join(tmp_path, 'memory.json')) as f:
        assert json.load(f) == hook.records


@pytest.mark.parametrize('kwargs, match', [(dict(interval=0), 'interval must be a positive int'),
                                           (dict(record_iters=(0,)), 'record_iters must be')])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KWMemoryHook(**kwargs)


def test_soak_tool_checks_its_arguments_and_switches_to_iterations(capsys):
    sys.path.insert(0, osp.join(REPO_ROOT, 'tools'))
    try:
        import memory_soak
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        memory_soak.parse_args(['--iters', '50', '--report', '100'])
    assert '--report iterations must lie in [1, --iters=50], got [100]' in capsys.readouterr().err
    args = memory_soak.parse_args(['--iters', '30', '--report', '10', '30',
                                   '--work-dir', '/tmp/unused'])
    cfg = memory_soak.soak_config(args)
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=30, val_interval=10**9)
    assert cfg.val_dataloader is None and cfg.default_hooks.checkpoint is None
    memory = [h for h in cfg.custom_hooks if h['type'] == 'KWMemoryHook']
    assert memory and tuple(memory[0]['record_iters']) == (10, 30)
    assert any(h['type'] == 'KWTemperatureHook' for h in cfg.custom_hooks)


def test_heap_in_use_follows_live_allocations():
    from kw_mm.utils.memory import malloc_heap_mib
    if malloc_heap_mib() is None:
        pytest.skip('no glibc malloc_info here')
    import torch
    before = malloc_heap_mib()
    block = torch.ones(64 * 2**18)  # 64 MiB, allocated by this (the main) thread
    during = malloc_heap_mib()
    del block
    after = malloc_heap_mib()
    assert 63 < during['in_use'] - before['in_use'] < 66
    assert during['held'] >= during['in_use']
    assert abs(after['in_use'] - before['in_use']) < 1
    snapshot = KWMemoryHook().snapshot()
    assert snapshot['heap_held_mib'] >= snapshot['heap_in_use_mib'] > 0
