"""Evaluate a checkpoint with a kw_mm config (mmpretrain or mmdet).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
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
    name_checkpoint,
    shutdown_distributed,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a kw_mm model')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where to save evaluation logs')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
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
    runner = build_runner(cfg, check_loaders=('test_dataloader',))
    try:  # a checkpoint of another variant is refused while it loads
        metrics = runner.test()
    except CheckpointMismatchError as err:
        raise name_checkpoint(err, cfg) from None
    shutdown_distributed()
    return metrics


if __name__ == '__main__':
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f'error: {err}')
