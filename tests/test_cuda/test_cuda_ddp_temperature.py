"""The τ schedule (``KWTemperatureHook``) reaches a model that mmengine's Runner
wraps in DistributedDataParallel: one process, world size 1, on the GPU."""
import socket

import pytest
import torch
from mmengine.hooks import Hook
from toy_training import ToyData, ToyModel

from kw_mm import get_temperature

pytestmark = pytest.mark.cuda


class Record(Hook):
    priority = 'LOWEST'  # after KWTemperatureHook has set τ for the iteration

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        module = runner.model.module  # what DDP wraps
        self.seen.append((runner.iter, type(runner.model).__name__,
                          get_temperature(module), module.conv.kw_warehouse.cells.device.type))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        assert torch.isfinite(outputs['loss'])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('backend', ['nccl', 'gloo'])
def test_temperature_schedule_under_ddp(tmp_path, monkeypatch, backend):
    import torch.distributed as dist
    from mmengine.runner import Runner
    if backend == 'nccl' and not dist.is_nccl_available():
        pytest.skip('this torch build has no NCCL')
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), RANK='0',
                           LOCAL_RANK='0', WORLD_SIZE='1').items():
        monkeypatch.setenv(key, value)
    record = Record()
    try:
        runner = Runner(
            model=ToyModel(), work_dir=str(tmp_path), launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend=backend)),
            train_dataloader=dict(dataset=ToyData(),
                                  sampler=dict(type='DefaultSampler', shuffle=False),
                                  batch_size=2, num_workers=0,
                                  collate_fn=dict(type='default_collate')),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
            train_cfg=dict(by_epoch=True, max_epochs=3),
            custom_hooks=[dict(type='KWTemperatureHook', epochs=2), record],
            default_hooks=dict(logger=dict(type='LoggerHook', interval=1)),
            randomness=dict(seed=0), default_scope='mmengine')
        assert runner.distributed and runner.world_size == 1
        runner.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # 4 iterations per epoch: τ falls linearly from 1 to 0 over the first 8, then stays 0
    assert [it for it, *_ in record.seen] == list(range(12))
    assert {wrapper for _, wrapper, _, _ in record.seen} == {'MMDistributedDataParallel'}
    assert {device for *_, device in record.seen} == {'cuda'}
    for it, _, tau, _ in record.seen:
        assert tau == pytest.approx(max(1 - it / 8, 0.0)), (it, tau)
