"""A Mask R-CNN with KWResNet runs a loss step and a predict step (real mmdet)."""
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from kw_mm import get_temperature
from kw_mm.checkpoint import REPO_ROOT


def build_detector(**backbone):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_kw_r50_shapes.py'))
    import kw_mm  # noqa: F401
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    # depth 18 keeps the test fast; the configs' depth-50 build is checked below
    cfg.model.backbone.update(depth=18, **backbone)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def test_config_builds_kw_resnet50_backbone():
    for name, budget in (('mask_rcnn_kw_r50.py', 1.0), ('mask_rcnn_kw4x_r50.py', 4.0)):
        cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', name))
        assert cfg.model.backbone.type == 'KWResNet' and cfg.model.backbone.depth == 50
        assert cfg.model.backbone.kw_cfg.budget == budget
        assert {'type': 'KWFinetuneHook'} in cfg.custom_hooks
        assert set(cfg.val_evaluator.metric) == {'bbox', 'segm'}
        assert cfg.train_dataloader.dataset.data_root == 'data/coco/'


def test_loss_and_predict_step():
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_detector()
    assert get_temperature(model) is not None
    packed = demo_mm_inputs(2, [[3, 96, 96], [3, 96, 96]], num_items=[2, 3], num_classes=3,
                            with_mask=True)
    model.train()
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and {'loss_mask', 'loss_bbox', 'loss_rpn_cls'} <= set(log_vars)
    loss.backward()
    kw_grads = [p.grad for n, p in model.backbone.named_parameters() if 'warehouses' in n
                and p.requires_grad]
    assert kw_grads and all(g is not None for g in kw_grads)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(results) == 2
    inst = results[0].pred_instances
    assert inst.bboxes.shape[1] == 4 and inst.masks.shape[1:] == (96, 96)
