"""Evaluate a checkpoint with a kw_mm config (mmpretrain or mmdet).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--cfg-options k=v ...] [--launcher pytorch]

``--out`` pickles every prediction (mmdet's ``DumpDetResults``, masks as RLE,
for a detector; mmengine's ``DumpResults`` for a classifier), for offline
evaluation. ``--show-dir`` paints the predictions with the config's
visualization hook: a detector's into ``<work_dir>/<timestamp>/DIR`` (as mmdet's
test tool; an absolute DIR as it is), a classifier's into DIR (as mmpretrain's).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from kw_mm.checkpoint import CheckpointMismatchError  # noqa: E402
from kw_mm.runner import (  # noqa: E402
    USER_ERRORS,
    apply_common_args,
    build_runner,
    enable_visualization,
    name_checkpoint,
    prediction_dumper,
    shutdown_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a kw_mm model')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where to save evaluation logs')
    parser.add_argument('--out', metavar='FILE.pkl',
                        help='dump the predictions to this pickle file (.pkl or .pickle)')
    parser.add_argument('--show-dir', metavar='DIR',
                        help='save images painted with the predictions (detection: under '
                             '<work_dir>/<timestamp>/DIR)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl or .pickle file, got {args.out!r}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    args.resume = None
    args.amp = False
    args.pretrained = None
    cfg = apply_common_args(args, for_training=False)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    runner = build_runner(cfg, check_loaders=('test_dataloader',))
    if args.out:
        runner.test_evaluator.metrics.append(prediction_dumper(cfg, args.out))
    try:  # a checkpoint of another variant is refused while it loads
        metrics = runner.test()
    except CheckpointMismatchError as err:
        raise name_checkpoint(err, cfg) from None
    from mmengine.dist import is_main_process
    if args.show_dir and is_main_process():
        where = args.show_dir
        if cfg.get('default_scope') == 'mmdet':  # DetVisualizationHook's place
            where = osp.join(runner.work_dir, runner.timestamp, args.show_dir)
        print(f'painted predictions: {where}')
    if args.out and is_main_process():
        print(f'predictions: {args.out}')
    shutdown_distributed()
    return metrics


if __name__ == '__main__':
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f'error: {err}')
