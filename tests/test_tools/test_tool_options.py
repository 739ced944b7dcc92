"""tools/test.py --out / --show-dir, tools/train.py --auto-scale-lr and tools/demo.py's
single evaluation of the trained model, on tiny shapes sets."""
import argparse
import glob
import os
import os.path as osp
import pickle

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from tool_scripts import load_script
from torch import nn

from kw_mm.apis import build_from_config
from kw_mm.checkpoint import REPO_ROOT
from kw_mm.demo.shapes import make_shapes_classification, make_shapes_dataset
from kw_mm.runner import ConfigOptionError, apply_common_args

DET_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_kw_r50_shapes.py')
CLS_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-resnet50_shapes-cls.py')


def load_tool(name):
    return load_script(osp.join(REPO_ROOT, 'tools', name))


def as_cli(options):
    return ['--cfg-options'] + [f'{key}={value}' for key, value in options.items()]


def save_checkpoint(config, options, path):
    torch.manual_seed(0)
    model = build_from_config(config, cfg_options=options)
    model.init_weights()
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), path)
    return str(path)


def test_detection_predictions_dumped_and_painted(tmp_path):
    root = make_shapes_dataset(str(tmp_path / 'shapes'), num_train=1, num_val=3, size=64)
    options = {'model.backbone.depth': 18, 'model.neck.in_channels': '[64,128,256,512]',
               'test_dataloader.dataset.data_root': f'{root}/',
               'test_evaluator.ann_file': f'{root}/annotations/val.json',
               'test_dataloader.batch_size': 3,
               # few proposals and detections: the painting and the masks stay cheap
               'model.test_cfg.rpn.max_per_img': 20, 'model.test_cfg.rcnn.max_per_img': 5}
    checkpoint = save_checkpoint(DET_CONFIG, {'model.backbone.depth': 18,
                                              'model.neck.in_channels': [64, 128, 256, 512]},
                                 tmp_path / 'det.pth')
    work, out = tmp_path / 'work', tmp_path / 'preds.pkl'
    metrics = load_tool('test.py').main([DET_CONFIG, checkpoint, '--work-dir', str(work), '--out',
                                         str(out), '--show-dir', 'painted', *as_cli(options)])
    assert 'coco/segm_mAP' in metrics
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    images = sorted(os.listdir(osp.join(root, 'val')))
    assert sorted(osp.basename(p['img_path']) for p in predictions) == images
    for prediction in predictions:
        instances = prediction['pred_instances']
        assert 'gt_instances' not in prediction
        assert instances['bboxes'].shape[1] == 4
        masks = instances['masks']  # as RLE, as mmdet's DumpDetResults writes them
        assert len(masks) == len(instances['bboxes'])
        assert all(isinstance(mask, dict) and 'counts' in mask for mask in masks)
    # mmdet's place for them: <work_dir>/<timestamp>/<show_dir>
    painted = glob.glob(str(work / '*' / 'painted' / '*'))
    assert sorted(osp.basename(p) for p in painted) == images


def test_classification_predictions_dumped_and_painted(tmp_path):
    root = make_shapes_classification(str(tmp_path / 'cls'), num_train=0, num_val=4, size=32)
    options = {'model.backbone.depth': 18, 'model.head.in_channels': 512,
               'test_dataloader.dataset.data_root': root, 'test_dataloader.batch_size': 2}
    checkpoint = save_checkpoint(CLS_CONFIG, {'model.backbone.depth': 18,
                                              'model.head.in_channels': 512},
                                 tmp_path / 'cls.pth')
    out, show = tmp_path / 'preds.pickle', tmp_path / 'painted'
    metrics = load_tool('test.py').main([CLS_CONFIG, checkpoint, '--work-dir',
                                         str(tmp_path / 'work'), '--out', str(out),
                                         '--show-dir', str(show), *as_cli(options)])
    assert 'accuracy/top1' in metrics
    with open(out, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == 4
    assert all(p['pred_score'].shape == (3,) and 'pred_label' in p for p in predictions)
    assert len(os.listdir(show)) == 4  # mmpretrain's hook: every image, into the folder given


def test_test_options_are_checked(tmp_path, capsys):
    test = load_tool('test.py')
    with pytest.raises(SystemExit):
        test.parse_args(['cfg.py', 'ckpt.pth', '--out', 'preds.json'])
    assert "--out must name a .pkl or .pickle file, got 'preds.json'" in capsys.readouterr().err
    from kw_mm.runner import enable_visualization
    cfg = Config(dict(default_scope='mmdet', default_hooks=dict()))
    with pytest.raises(ConfigOptionError, match="needs a visualization hook.*DetVisualizationHook"):
        enable_visualization(cfg, 'show')
    cfg = Config(dict(default_scope='mmseg', default_hooks=dict()))
    with pytest.raises(ConfigOptionError, match="supports mmdet and mmpretrain.*'mmseg'"):
        enable_visualization(cfg, 'show')


def train_args(config, tmp_path, **extra):
    return argparse.Namespace(config=config, work_dir=str(tmp_path), cfg_options=None,
                              launcher='none', pretrained=None, amp=False, resume=None, **extra)


def test_auto_scale_lr(tmp_path):
    config = osp.join(REPO_ROOT, 'configs', 'mask_rcnn_kw_r50.py')  # mmdet's base_batch_size=16
    cfg = apply_common_args(train_args(config, tmp_path, auto_scale_lr=True), for_training=True)
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    cfg = apply_common_args(train_args(config, tmp_path), for_training=True)
    assert cfg.auto_scale_lr.enable is False
    # the tool refuses a config without auto_scale_lr.base_batch_size before building anything
    without = tmp_path / 'without.py'
    without.write_text(f'_base_ = {config!r}\nauto_scale_lr = dict(_delete_=True, enable=False)\n')
    with pytest.raises(ConfigOptionError, match=r"--auto-scale-lr needs auto_scale_lr = "
                       r"dict\(base_batch_size=N\).*without.py has "
                       r"auto_scale_lr = \{'enable': False\} without base_batch_size"):
        load_tool('train.py').main([str(without), '--auto-scale-lr'])
    without.write_text(f'_base_ = {config!r}\nauto_scale_lr = None\n')
    with pytest.raises(ConfigOptionError, match='without.py has no auto_scale_lr'):
        apply_common_args(train_args(str(without), tmp_path, auto_scale_lr=True), True)
    without.write_text(f'_base_ = {config!r}\nauto_scale_lr = dict(base_batch_size=0)\n')
    with pytest.raises(ConfigOptionError, match='base_batch_size must be a positive int, got 0'):
        apply_common_args(train_args(str(without), tmp_path, auto_scale_lr=True), True)


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, inputs, mode='tensor'):
        out = self.fc(inputs)
        if mode == 'loss':
            return dict(loss=(out - 1).square().mean())
        return [dict(pred=p) for p in out] if mode == 'predict' else out


class MeanPrediction(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [float(d['pred']) for d in data_samples]

    def compute_metrics(self, results):
        return dict(mean=sum(results) / len(results))


class CountValidations(Hook):
    priority = 'LOWEST'

    def __init__(self):
        self.metrics = []

    def after_val_epoch(self, runner, metrics=None):
        self.metrics.append(dict(metrics))


@pytest.mark.parametrize('val_begin, validations', [(1, 2), (3, 0)])
def test_demo_evaluates_the_trained_model_once(tmp_path, val_begin, validations):
    demo = load_tool('demo.py')
    data = [dict(inputs=torch.randn(4, generator=torch.Generator().manual_seed(i)))
            for i in range(8)]
    loader = dict(dataset=data, sampler=dict(type='DefaultSampler', shuffle=False),
                  batch_size=4, num_workers=0, collate_fn=dict(type='default_collate'))
    runner = Runner(model=ToyModel(), work_dir=str(tmp_path), train_dataloader=loader,
                    val_dataloader=loader, val_cfg=dict(), val_evaluator=[MeanPrediction()],
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                    train_cfg=dict(by_epoch=True, max_epochs=2, val_begin=val_begin),
                    default_hooks=dict(checkpoint=None), default_scope='mmengine',
                    log_level='WARNING')
    seen = CountValidations()
    runner.register_hook(seen)
    demo.init_weights(runner)
    untrained = runner.val_loop.run()
    trained = demo.train_and_validate(runner)
    assert seen.metrics[0] == untrained
    # the train loop's validation after its last epoch is the result; only when
    # it did not validate then (val_begin 3 > 2 epochs) does the demo run one
    assert len(seen.metrics) == 1 + (validations or 1)
    assert trained == seen.metrics[-1] != untrained
