"""The shared part of tools/train.py and tools/test.py: config → Runner."""
from __future__ import annotations

import argparse
import os.path as osp
import warnings
from typing import Optional

# mmengine 0.10.7 imports pkg_resources, which setuptools deprecates loudly;
# the tools need it (config bases `mmdet::` / `mmpretrain::`), so hush it.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402

from .checkpoint import CheckpointFileError, CheckpointMismatchError  # noqa: E402
from .utils import check_dataset_paths, tune_cpu_allocator  # noqa: E402


class ConfigOptionError(ValueError):
    """A command-line option needs something the config does not have."""


#: what the tools turn into one ``error: ...`` line and a non-zero exit
USER_ERRORS = (FileNotFoundError, CheckpointFileError, CheckpointMismatchError, ConfigOptionError)


def apply_common_args(args, for_training: bool) -> Config:
    """Load ``args.config`` and apply the command-line options to it.

    ``args`` has ``config``, ``work_dir``, ``cfg_options`` (a dict or None),
    ``launcher``, ``pretrained``, ``amp`` and ``resume``, and may have
    ``auto_scale_lr`` (training).
    """
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:  # already a dict: the tools parse it with mmengine's DictAction
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if getattr(args, 'pretrained', None):
        if not osp.isfile(args.pretrained):
            raise FileNotFoundError(f'--pretrained checkpoint not found: {args.pretrained}')
        cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=args.pretrained,
                                           prefix='backbone.')
    if for_training and args.amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
            wrapper.type = 'AmpOptimWrapper'
            if torch.cuda.is_available():
                wrapper.loss_scale = 'dynamic'
            else:
                wrapper.dtype = 'bfloat16'
    if for_training:
        # checkpoints are written atomically (kw_mm/checkpoint/io.py)
        checkpoint_hook = cfg.setdefault('default_hooks', {}).setdefault(
            'checkpoint', dict(type='CheckpointHook', interval=1))
        if checkpoint_hook.get('backend_args') is None and not checkpoint_hook.get('out_dir'):
            checkpoint_hook['backend_args'] = dict(backend='kw_atomic_local')
    if for_training and getattr(args, 'auto_scale_lr', False):
        enable_auto_scale_lr(cfg, args.config)
    if for_training and args.resume:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
        if cfg.load_from and not osp.isfile(cfg.load_from):
            raise FileNotFoundError(f'--resume checkpoint not found: {cfg.load_from}')
    return cfg


def enable_auto_scale_lr(cfg: Config, config: str) -> None:
    """``--auto-scale-lr``: turn on the config's ``auto_scale_lr``, which
    scales the learning rate by (processes × batch size per process) /
    ``base_batch_size`` (mmengine's ``Runner.scale_lr``)."""
    scale = cfg.get('auto_scale_lr')
    if not scale or scale.get('base_batch_size') is None:
        found = ('no auto_scale_lr' if not scale else
                 f'auto_scale_lr = {dict(scale)} without base_batch_size')
        raise ConfigOptionError(
            f'--auto-scale-lr needs auto_scale_lr = dict(base_batch_size=N) in the config, N '
            f'being the total batch size its learning rate is set for; {config} has {found}')
    base = scale.base_batch_size
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ConfigOptionError(f'--auto-scale-lr: auto_scale_lr.base_batch_size must be a '
                                f'positive int, got {base!r} in {config}')
    scale.enable = True


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """``tools/test.py --show-dir``: paint the predictions into ``show_dir``
    with the config's visualization hook, as mmdet's and mmpretrain's test
    tools do: a detector's under ``<work_dir>/<timestamp>/<show_dir>`` (an
    absolute ``show_dir`` as it is), a classifier's in ``show_dir``, every
    image."""
    scope = cfg.get('default_scope')
    hook = cfg.get('default_hooks', {}).get('visualization')
    if scope not in ('mmdet', 'mmpretrain'):
        raise ConfigOptionError(f"--show-dir supports mmdet and mmpretrain configs; this config "
                                f"has default_scope={scope!r}")
    if hook is None:
        kind = 'DetVisualizationHook' if scope == 'mmdet' else 'VisualizationHook'
        raise ConfigOptionError(f"--show-dir needs a visualization hook in the config: add "
                                f"default_hooks = dict(visualization=dict(type='{kind}'))")
    if scope == 'mmdet':
        hook.draw = True
        hook.test_out_dir = show_dir
    else:
        hook.enable = True
        hook.out_dir = show_dir
        hook.interval = 1


def prediction_dumper(cfg: Config, out_file: str):
    """``tools/test.py --out``: the metric that pickles every prediction,
    mmdet's ``DumpDetResults`` (masks as RLE) for a detector, mmengine's
    ``DumpResults`` otherwise."""
    if not out_file.endswith(('.pkl', '.pickle')):
        raise ConfigOptionError(f'--out must name a .pkl or .pickle file, got {out_file!r}')
    if cfg.get('default_scope') == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out_file)
    from mmengine.evaluator import DumpResults
    return DumpResults(out_file_path=out_file)


def training_config(config: str, work_dir: str, cfg_options=None,
                    pretrained: Optional[str] = None) -> Config:
    """``config`` as ``tools/train.py`` would prepare it for a single process."""
    return apply_common_args(
        argparse.Namespace(config=config, work_dir=work_dir, cfg_options=cfg_options,
                           launcher='none', pretrained=pretrained, amp=False, resume=None),
        for_training=True)


def build_runner(cfg: Config, check_loaders=('train_dataloader', 'val_dataloader')):
    """Check the dataset paths, then build mmengine's Runner from ``cfg``."""
    check_dataset_paths(cfg, check_loaders)
    import kw_mm  # noqa: F401  (registers modules, allows safe checkpoint loading)
    tune_cpu_allocator()
    if cfg.get('launcher') == 'pytorch' and not torch.cuda.is_available():
        _init_cpu_distributed(cfg)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def name_checkpoint(err: CheckpointMismatchError, cfg: Config) -> CheckpointMismatchError:
    """``err`` with the checkpoint that ``load_from`` / resume was loading named.

    The KW backbones refuse a checkpoint of another variant while it is
    loaded, where the file name is unknown; ``init_cfg`` refusals already
    name their file and are returned as they are.
    """
    text = str(err)
    if text.startswith('init_cfg checkpoint'):
        return err
    if cfg.get('load_from'):
        where = f'checkpoint {cfg.load_from}'
    elif cfg.get('resume'):
        where = f"the latest checkpoint in {cfg.get('work_dir')}"
    else:
        return err
    return CheckpointMismatchError(f'{where}: {text}')


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down.

    mmengine leaves the group alive until the interpreter exits; gloo's
    background threads then die with the process, which on a loaded machine
    sometimes aborts a rank after its work is done ("terminate called
    without an active exception"). A no-op without a process group.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _init_cpu_distributed(cfg: Config) -> None:
    """Distributed training on CPU processes (gloo).

    mmengine 0.10.7's ``pytorch`` launcher always calls
    ``torch.cuda.set_device``, which fails without a GPU; initialising the
    process group first (mmengine then skips its own) and building DDP
    without device ids lets ``tools/dist_train.sh CONFIG N`` run on CPU.
    """
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend', 'gloo')
        dist.init_process_group(backend='gloo' if backend == 'nccl' else backend)
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.setdefault('device_ids', None)
    cfg.model_wrapper_cfg = wrapper
