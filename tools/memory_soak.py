"""Memory soak: train a config for many iterations and report memory at chosen ones.

    python tools/memory_soak.py [CONFIG] [--iters 2000] [--report 100 2000]
        [--interval 50] [--work-dir DIR] [--cfg-options k=v ...]

CONFIG defaults to the demo classification config
(configs/demo/kw1x-resnet50_shapes-cls.py; its synthetic data is generated on
first use). The run switches the schedule to ``--iters`` iterations
(IterBasedTrainLoop; the config's τ schedule and learning-rate schedule keep
their lengths), turns validation and checkpoints off, and records resident
memory (VmRSS) and its peak (VmHWM) with ``KWMemoryHook``. It prints a table
of the reported iterations and the growth from the first to the last; the
records are also in ``<work-dir>/memory.json``.
"""
import argparse
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmengine.config import DictAction  # noqa: E402

DEFAULT_CONFIG = 'configs/demo/kw1x-resnet50_shapes-cls.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='kw_mm memory soak')
    parser.add_argument('config', nargs='?', default=DEFAULT_CONFIG)
    parser.add_argument('--iters', type=int, default=2000, help='training iterations')
    parser.add_argument('--report', type=int, nargs='+', default=[100, 2000],
                        help='iterations whose memory is reported')
    parser.add_argument('--interval', type=int, default=50, help='record every N iterations')
    parser.add_argument('--work-dir', default='work_dirs/memory_soak')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f'--iters must be a positive int, got {args.iters}')
    bad = [i for i in args.report if not 1 <= i <= args.iters]
    if bad:
        parser.error(f'--report iterations must lie in [1, --iters={args.iters}], got {bad}')
    return args


def soak_config(args):
    from kw_mm.runner import training_config
    cfg = training_config(args.config, args.work_dir, args.cfg_options)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=args.iters, val_interval=10**9)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=args.interval)
    cfg.log_processor = dict(by_epoch=False)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
        dict(type='KWMemoryHook', interval=args.interval, record_iters=args.report)]
    # keep the config's epoch-based schedules meaningful with an infinite sampler
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)
    if args.config == DEFAULT_CONFIG:
        from kw_mm.demo.shapes import make_shapes_classification
        make_shapes_classification('data/demo_shapes_cls')
    from kw_mm.engine import KWMemoryHook
    from kw_mm.runner import build_runner
    cfg = soak_config(args)
    runner = build_runner(cfg, check_loaders=('train_dataloader',))
    start = time.time()
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, KWMemoryHook))
    by_iter = {r['iter']: r for r in hook.records}
    print(f'\nmemory soak: {args.config}, {args.iters} iterations in '
          f'{(time.time() - start) / 60:.1f} min')
    columns = (('RSS', 'rss_mib'), ('peak RSS', 'peak_rss_mib'), ('RSS anon', 'rss_anon_mib'),
               ('RSS file', 'rss_file_mib'), ('heap in use', 'heap_in_use_mib'),
               ('heap held', 'heap_held_mib'))
    print(f"  {'iteration':>9}" + ''.join(f'  {title + " MiB":>15}' for title, _ in columns))
    for i in args.report:
        r = by_iter[i]
        print(f'  {i:>9}' + ''.join(f'  {r.get(key, float("nan")):>15.1f}' for _, key in columns))
    first, last = by_iter[min(args.report)], by_iter[max(args.report)]
    print(f"  peak growth {min(args.report)} -> {max(args.report)}: "
          f"{last['peak_rss_mib'] - first['peak_rss_mib']:+.1f} MiB "
          f"({last['peak_rss_mib'] / first['peak_rss_mib']:.3f}x)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
