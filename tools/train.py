"""Train a kw_mm config with mmengine's Runner (mmpretrain or mmdet configs).

    python tools/train.py configs/mask_rcnn_kw_r50.py [--work-dir DIR] [--resume [CKPT]]
        [--amp] [--auto-scale-lr] [--pretrained CKPT] [--cfg-options k=v ...]
        [--launcher pytorch]

``--auto-scale-lr`` turns on the config's ``auto_scale_lr``: the learning rate
is scaled by the real total batch size (processes × batch per process) over
``auto_scale_lr.base_batch_size``, which the config must set.
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
    parser = argparse.ArgumentParser(description='Train a kw_mm model')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='where to save logs and checkpoints')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help="resume from CKPT, or from the latest checkpoint in the work dir "
                             "when no path is given")
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (fp16 on GPU, bf16 on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the total batch size over the '
                             "config's auto_scale_lr.base_batch_size")
    parser.add_argument('--pretrained', help='ImageNet-pretrained KW checkpoint for the '
                        "backbone (mmpretrain layout, loaded with prefix 'backbone.')")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_epochs=2')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = apply_common_args(args, for_training=True)
    runner = build_runner(cfg, check_loaders=('train_dataloader', 'val_dataloader'))
    try:  # a checkpoint of another variant is refused while it loads
        runner.train()
    except CheckpointMismatchError as err:
        raise name_checkpoint(err, cfg) from None
    shutdown_distributed()


if __name__ == '__main__':
    try:
        main()
    except USER_ERRORS as err:
        sys.exit(f'error: {err}')
