"""τ schedule and fine-tune hooks in a real mmengine Runner (with resume and EMA)."""
import copy

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from torch import nn
from toy_training import ToyData, ToyModel

from kw_mm import get_temperature
from kw_mm.engine import KWTemperatureHook


class RecordTemperature(Hook):
    priority = 'LOWEST'

    def __init__(self):
        self.seen = []
        self.ema_seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append((runner.iter, get_temperature(runner.model)))
        for hook in runner.hooks:
            if getattr(hook, 'ema_model', None) is not None:
                self.ema_seen.append(get_temperature(hook.ema_model))


def make_runner(work_dir, max_epochs, hooks, resume=False):
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        custom_hooks=hooks, default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                                                logger=dict(type='LoggerHook', interval=1)),
        resume=resume, randomness=dict(seed=0, deterministic=True),
        default_scope='mmengine')


def test_linear_schedule_and_resume(tmp_path):
    # 4 iterations per epoch, decay over 2 epochs = 8 iterations
    record = RecordTemperature()
    runner = make_runner(tmp_path, 2, [dict(type='KWTemperatureHook', epochs=2), record])
    runner.train()
    assert [it for it, _ in record.seen] == list(range(8))
    for it, tau in record.seen:
        assert tau == pytest.approx(1 - it / 8)
    # a fresh process resumes from epoch_2.pth and continues at tau(8) = 0 ...
    record2 = RecordTemperature()
    runner = make_runner(tmp_path, 3, [dict(type='KWTemperatureHook', epochs=4), record2],
                         resume=True)
    runner.train()
    # ... here with a 4-epoch decay (16 iterations): the schedule picks up at iteration 8
    assert [it for it, _ in record2.seen] == list(range(8, 12))
    for it, tau in record2.seen:
        assert tau == pytest.approx(1 - it / 16)


def test_ema_copy_gets_the_same_temperature(tmp_path):
    record = RecordTemperature()
    runner = make_runner(tmp_path, 1, [dict(type='EMAHook'), dict(type='KWTemperatureHook',
                                                                    epochs=1), record])
    runner.train()
    assert record.ema_seen and record.ema_seen == [tau for _, tau in record.seen]


def test_finetune_hook_keeps_beta_off(tmp_path):
    record = RecordTemperature()
    runner = make_runner(tmp_path, 1, [dict(type='KWFinetuneHook'), record])
    runner.train()
    assert {tau for _, tau in record.seen} == {0.0}


def test_hook_arguments_are_checked():
    with pytest.raises(ValueError, match='epochs'):
        KWTemperatureHook(epochs=0)
    with pytest.raises(ValueError, match='start'):
        KWTemperatureHook(start=2)


def test_set_temperature_reaches_wrapped_and_copied_models():
    from kw_mm import set_temperature
    model = ToyModel()
    wrapper = nn.Sequential(model)  # stands in for a DDP-style wrapper: modules() recurse
    assert set_temperature(wrapper, 0.3) == 1
    assert get_temperature(copy.deepcopy(model)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match='temperature'):
        set_temperature(model, 1.5)


def test_set_temperature_through_real_ddp(tmp_path):
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel

    from kw_mm import set_temperature
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        model = ToyModel()
        ddp = MMDistributedDataParallel(module=model)
        assert set_temperature(ddp, 0.7) == 1
        assert get_temperature(model) == pytest.approx(0.7)
    finally:
        dist.destroy_process_group()


class RecordTrain(Hook):
    priority = 'LOWEST'

    def __init__(self):
        self.rows = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        self.rows[runner.iter] = (get_temperature(runner.model), lr, float(outputs['loss']))


class Crash(Exception):
    pass


class CrashAfterEpoch(Hook):
    priority = 'LOWEST'  # after the checkpoint hook has saved

    def __init__(self, epoch):
        self.epoch = epoch

    def after_train_epoch(self, runner):
        if runner.epoch + 1 == self.epoch:  # the loop counts the epoch after this hook
            raise Crash(f'simulated crash after epoch {self.epoch}')


def run_schedule(work_dir, max_epochs, record, resume=False, crash_after=None):
    torch.manual_seed(0)  # same initial weights for every run (resume overwrites them anyway)
    hooks = [dict(type='KWTemperatureHook', epochs=2), record]
    if crash_after is not None:
        hooks.append(CrashAfterEpoch(crash_after))
    runner = Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=[dict(type='MultiStepLR', milestones=[2], gamma=0.1, by_epoch=True)],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        custom_hooks=hooks,
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume, randomness=dict(seed=0, deterministic=True), default_scope='mmengine')
    runner.train()


def test_interrupted_and_resumed_run_continues_exactly(tmp_path):
    straight = RecordTrain()
    run_schedule(tmp_path / 'straight', 3, straight)
    first, second = RecordTrain(), RecordTrain()
    with pytest.raises(Crash):
        run_schedule(tmp_path / 'interrupted', 3, first, crash_after=1)
    run_schedule(tmp_path / 'interrupted', 3, second, resume=True)
    assert sorted(first.rows) == list(range(4)) and sorted(second.rows) == list(range(4, 12))
    resumed = {**first.rows, **second.rows}
    assert resumed.keys() == straight.rows.keys()
    for it in straight.rows:  # tau, learning rate and loss, iteration by iteration
        assert resumed[it] == pytest.approx(straight.rows[it], rel=1e-6, abs=1e-7), it
