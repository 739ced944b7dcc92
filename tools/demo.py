"""The embedded demo: Mask R-CNN with a KW-ResNet50 on synthetic shapes.

Generates the shapes set on first use (data/demo_shapes/), evaluates the
untrained model, trains configs/demo/mask_rcnn_kw_r50_shapes.py, evaluates
again with mmdet's CocoMetric (pycocotools) and prints bbox / segm AP of
both.

    python tools/demo.py [--config CFG] [--work-dir DIR] [--cfg-options k=v ...]
    python tools/demo.py --pretrain   # the paper's pipeline in miniature:
        # pretrain the KW-ResNet50 classifier on synthetic one-shape images
        # (configs/demo/kw1x-resnet50_shapes-cls.py, with the tau schedule),
        # then fine-tune Mask R-CNN from that checkpoint (beta off).
"""
import argparse
import logging
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

from mmengine.config import DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

DEFAULT_CONFIG = 'configs/demo/mask_rcnn_kw_r50_shapes.py'
PRETRAIN_CONFIG = 'configs/demo/kw1x-resnet50_shapes-cls.py'
KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='kw_mm demo')
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    parser.add_argument('--pretrain', action='store_true',
                        help=f'first pretrain the backbone with {PRETRAIN_CONFIG}')
    return parser.parse_args(argv)


class LastValidation(Hook):
    """Keeps the metrics of the latest validation and the epoch it ran after,
    so that the train loop's final validation need not be run again."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.metrics = None
        self.epoch = None

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = dict(metrics or {})
        self.epoch = runner.epoch


def train_and_validate(runner) -> dict:
    """Train, then return the metrics of the trained model: those of the train
    loop's validation after the last epoch, or (when that did not run, e.g.
    without a val loop or after an early stop) of one validation run here."""
    record = LastValidation()
    runner.register_hook(record)
    runner.train()
    if record.metrics is not None and record.epoch == runner.max_epochs:
        return record.metrics
    return runner.val_loop.run()


def init_weights(runner) -> None:
    """Initialise the model as ``runner.train()`` will (mmengine's ``init_weights``,
    which then runs only once), so that it can be evaluated untrained."""
    from mmengine.model import is_model_wrapper
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    model.init_weights()


def pretrain(work_dir: str) -> str:
    """Train the demo classifier; returns its checkpoint path."""
    from kw_mm.demo.shapes import make_shapes_classification
    from kw_mm.runner import build_runner, training_config
    print('[demo] preparing the synthetic classification set in data/demo_shapes_cls/ ...',
          flush=True)
    make_shapes_classification('data/demo_shapes_cls')
    cfg = training_config(PRETRAIN_CONFIG, work_dir)
    runner = build_runner(cfg)
    top1 = train_and_validate(runner).get('accuracy/top1', float('nan'))
    print(f'[demo] pretrained KW-ResNet50 classifier: top-1 {top1:.1f}% on the val split',
          flush=True)
    return osp.join(work_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')


def ap(metrics: dict) -> dict:
    """The bbox / segm AP entries of ``metrics`` (NaN where missing)."""
    return {k: float(metrics.get(k, float('nan'))) for k in KEYS}


def main(argv=None):
    args = parse_args(argv)
    import os
    os.chdir(ROOT)
    start = time.time()
    from kw_mm.demo.shapes import make_shapes_dataset
    print('[demo] preparing the synthetic shapes set in data/demo_shapes/ ...', flush=True)
    make_shapes_dataset('data/demo_shapes')

    from mmengine.logging import print_log

    from kw_mm.runner import build_runner, training_config
    checkpoint = pretrain(args.work_dir + '_cls') if args.pretrain else None
    cfg = training_config(args.config, args.work_dir, args.cfg_options, pretrained=checkpoint)
    runner = build_runner(cfg)
    print_log(f'[demo] config {args.config}; evaluating the untrained model first',
              logger='current', level=logging.INFO)
    init_weights(runner)
    untrained = ap(runner.val_loop.run())
    print_log('[demo] training ...', logger='current', level=logging.INFO)
    trained = ap(train_and_validate(runner))
    minutes = (time.time() - start) / 60
    rows = [('', 'untrained', 'trained')]
    for key in KEYS:
        rows.append((key.replace('coco/', ''), f'{untrained[key]:.3f}', f'{trained[key]:.3f}'))
    print()
    start_from = 'the demo-pretrained backbone' if args.pretrain else 'scratch'
    print(f'kw_mm demo: Mask R-CNN + KW-ResNet50 (b = 1) on synthetic shapes, from '
          f'{start_from}, {minutes:.1f} min')
    for name, a, b in rows:
        print(f'  {name:<14}{a:>10}{b:>10}')
    print(f'  checkpoint: {osp.join(args.work_dir, "epoch_%d.pth" % cfg.train_cfg.max_epochs)}')
    if not trained['coco/bbox_mAP'] > untrained['coco/bbox_mAP']:
        print('[demo] warning: training did not improve bbox AP', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
