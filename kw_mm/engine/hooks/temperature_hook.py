"""mmengine hooks that drive the KW attention temperature τ (paper Eq. 4) and the
softmax temperature T of DY-Conv and ODConv."""
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


class _LinearSchedule(Hook):
    """A value going linearly from ``self.start`` to ``self.end`` over
    ``self.iters`` iterations, or ``self.epochs`` epochs of the runner's
    training data, by global iteration (so a resumed run continues it)."""

    start: float
    end: float
    epochs: Optional[float]
    iters: Optional[int]

    def decay_iters(self, runner) -> int:
        if self.iters is not None:
            return self.iters
        return max(int(round(self.epochs * len(runner.train_dataloader))), 1)

    def temperature_at(self, iteration: int, decay_iters: int) -> float:
        """The value at global iteration ``iteration`` of a schedule over ``decay_iters``."""
        progress = min(iteration / decay_iters, 1.0)
        return self.start + (self.end - self.start) * progress


@HOOKS.register_module()
class KWTemperatureHook(_LinearSchedule):
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

    def before_train(self, runner) -> None:
        set_runner_temperature(runner, self.temperature_at(runner.iter, self.decay_iters(runner)))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        tau = self.temperature_at(runner.iter, self.decay_iters(runner))
        set_runner_temperature(runner, tau)
        runner.message_hub.update_scalar('train/kw_temperature', tau)


def set_dynamic_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature T of every ODConv / DY-Conv attention in ``model``.

    Args:
        model (nn.Module): Any module (wrappers such as DDP are traversed).
        value (float): The new temperature, a finite number >= 1.

    Returns:
        int: How many attentions were updated.
    """
    from ...layers.dynamic.dyconv import DYConvAttention
    from ...layers.dynamic.odconv import ODConvAttention, check_temperature
    value = check_temperature(value, 'temperature')
    count = 0
    for module in model.modules():
        if isinstance(module, (ODConvAttention, DYConvAttention)):
            module.temperature.fill_(value)
            count += 1
    return count


@HOOKS.register_module()
class DynamicConvTemperatureHook(_LinearSchedule):
    """The temperature annealing of DY-Conv (Chen et al., 2020) and ODConv:
    the attentions' logits are divided by T, which falls linearly from
    ``start`` (30) to ``end`` (1) over the first ``epochs`` (10) epochs.

    T is recomputed from the runner's global iteration before every training
    iteration (so a resumed run continues the schedule), written to the live
    model and to EMA copies; validation and testing use the value of the
    last training iteration (1 once the annealing is over).

    Args:
        epochs (float, optional): Length of the annealing in epochs. Defaults
            to 10 (DY-Conv's and ODConv's).
        iters (int, optional): Length in iterations, for iteration-based
            loops; overrides ``epochs``.
        start (float): T at iteration 0, at least 1. Defaults to 30.
        end (float): T after the annealing, at least 1. Defaults to 1.
    """

    priority = 'HIGH'

    def __init__(self, epochs: Optional[float] = 10, iters: Optional[int] = None,
                 start: float = 30.0, end: float = 1.0) -> None:
        from ...layers.dynamic.odconv import check_temperature
        if iters is None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                              or not epochs > 0):
            raise ValueError(f'epochs must be a positive number when iters is not given, '
                             f'got epochs={epochs!r}')
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int)
                                  or iters <= 0):
            raise ValueError(f'iters must be a positive int, got {iters!r}')
        self.epochs = epochs
        self.iters = iters
        self.start = check_temperature(start, 'start')
        self.end = check_temperature(end, 'end')

    def _apply(self, runner) -> float:
        value = self.temperature_at(runner.iter, self.decay_iters(runner))
        for model in _models_of(runner):
            set_dynamic_temperature(model, value)
        return value

    def before_train(self, runner) -> None:
        self._apply(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        value = self._apply(runner)
        runner.message_hub.update_scalar('train/dynamic_temperature', value)


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
