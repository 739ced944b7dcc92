"""mmengine hooks that drive the KW attention temperature τ (paper Eq. 4)."""
from __future__ import annotations

from typing import Iterator, Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from ...layers.attention import set_temperature


def _models_of(runner) -> Iterator[nn.Module]:
    """The live model and every averaged copy (EMA) that hooks keep."""
    yield runner.model
    for hook in runner.hooks:
        ema = getattr(hook, 'ema_model', None)
        if isinstance(ema, nn.Module):
            yield ema


def set_runner_temperature(runner, value: float) -> None:
    """Set τ on ``runner.model`` (DDP-wrapped or not) and on EMA copies."""
    for model in _models_of(runner):
        set_temperature(model, value)


@HOOKS.register_module()
class KWTemperatureHook(Hook):
    """Linear τ schedule: 1 → 0 over the first ``epochs`` epochs (or ``iters``).

    τ is recomputed from the runner's global iteration before every training
    iteration, so a resumed run continues the schedule exactly where it
    stopped, and it is written to the live model (unwrapped or DDP) and to
    the EMA model of :class:`mmengine.hooks.EMAHook` if one is registered.
    Validation and testing use the value of the last training iteration.

    Args:
        epochs (float, optional): Length of the decay in epochs (paper: 10
            with the traditional and MobileNetV2 recipes, 20 with the
            advanced recipe). Defaults to 10.
        iters (int, optional): Length of the decay in iterations, for
            iteration-based loops; overrides ``epochs``.
        start (float): τ at iteration 0. Defaults to 1.
        end (float): τ after the decay. Defaults to 0.
    """

    priority = 'HIGH'

    def __init__(self, epochs: Optional[float] = 10, iters: Optional[int] = None,
                 start: float = 1.0, end: float = 0.0) -> None:
        if iters is None and (epochs is None or epochs <= 0):
            raise ValueError(f'epochs must be a positive number when iters is not given, '
                             f'got epochs={epochs!r}')
        if iters is not None and (not isinstance(iters, int) or iters <= 0):
            raise ValueError(f'iters must be a positive int, got {iters!r}')
        for label, value in (('start', start), ('end', end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{label} must be in [0, 1], got {value!r}')
        self.epochs = epochs
        self.iters = iters
        self.start = float(start)
        self.end = float(end)

    def decay_iters(self, runner) -> int:
        if self.iters is not None:
            return self.iters
        return max(int(round(self.epochs * len(runner.train_dataloader))), 1)

    def temperature_at(self, iteration: int, decay_iters: int) -> float:
        progress = min(iteration / decay_iters, 1.0)
        return self.start + (self.end - self.start) * progress

    def before_train(self, runner) -> None:
        set_runner_temperature(runner, self.temperature_at(runner.iter, self.decay_iters(runner)))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        tau = self.temperature_at(runner.iter, self.decay_iters(runner))
        set_runner_temperature(runner, tau)
        runner.message_hub.update_scalar('train/kw_temperature', tau)


@HOOKS.register_module()
class KWFinetuneHook(Hook):
    """Keep β off (τ = 0) for the whole run.

    The paper does not use the attention initialisation when fine-tuning a
    pretrained KW backbone (appendix A.1.2); this hook pins τ to 0 before
    training, every training iteration, validation and testing.
    """

    priority = 'HIGH'

    def _off(self, runner) -> None:
        set_runner_temperature(runner, 0.0)

    def before_train(self, runner) -> None:
        self._off(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._off(runner)

    def before_val(self, runner) -> None:
        self._off(runner)

    def before_test(self, runner) -> None:
        self._off(runner)
