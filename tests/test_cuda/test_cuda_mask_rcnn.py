"""Mask R-CNN with a KW ResNet50 backbone: a loss step and its backward on CUDA
(the demo detection config, real mmdet)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from kw_mm.checkpoint import REPO_ROOT

pytestmark = pytest.mark.cuda


def test_kw_r50_mask_rcnn_loss_and_backward():
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs

    import kw_mm  # noqa: F401  (registers the KW modules)
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_kw_r50_shapes.py'))
    init_default_scope('mmdet')
    assert cfg.model.backbone.type == 'KWResNet' and cfg.model.backbone.depth == 50
    cfg.model.backbone.init_cfg = None  # no pretrained download
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = model.cuda().train()
    packed = demo_mm_inputs(2, [[3, 128, 128], [3, 128, 128]], num_items=[2, 3],
                            num_classes=3, with_mask=True)
    data = model.data_preprocessor(packed, True)
    assert data['inputs'].is_cuda
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    assert {'loss_mask', 'loss_bbox', 'loss_rpn_cls'} <= set(log_vars)
    loss.backward()
    kw = [(n, p) for n, p in model.backbone.named_parameters()
          if ('warehouse' in n or 'attention' in n) and p.requires_grad]
    assert kw, 'no KW parameters in the backbone'
    missing = [n for n, p in kw if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    bad = [n for n, p in kw if not torch.isfinite(p.grad).all()]
    assert not bad, f'non-finite gradients in {bad[:5]}'
    assert any(p.grad.abs().sum() > 0 for n, p in kw if 'warehouse' in n)
