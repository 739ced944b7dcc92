"""Each backbone family trains and predicts in a tiny mmpretrain classifier and
in a tiny mmdet Mask R-CNN (real registries, configs from configs/)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import init_default_scope

from kw_mm import set_temperature
from kw_mm.checkpoint import REPO_ROOT

# (classification config, detection config, backbone overrides that shrink it)
FAMILIES = {
    'resnet': ('configs/kw_resnet/kw1x-resnet18_8xb32_in1k.py',
               'configs/mask_rcnn_kw_r50.py', dict(depth=18), [64, 128, 256, 512]),
    'mobilenet_v2': ('configs/kw_mobilenet_v2/kw1x-mobilenet-v2-w0.5_8xb32_in1k.py',
                     'configs/mask_rcnn/mask-rcnn_kw1x-mobilenet-v2_fpn_1x_coco.py',
                     dict(widen_factor=0.5), [16, 16, 48, 1280]),
    'convnext': ('configs/kw_convnext/kw1x-convnext-tiny_32xb128_in1k.py',
                 'configs/mask_rcnn/mask-rcnn_kw1x-convnext-t_fpn_1x_coco.py',
                 dict(arch=dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256])),
                 [32, 64, 128, 256]),
}


def build(path, scope, **overrides):
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    import kw_mm  # noqa: F401
    init_default_scope(scope)
    for key, value in overrides.items():  # assign (not merge): arch may change type
        *parents, leaf = key.split('.')
        node = cfg
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    model.init_weights()
    return model


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_classifier_train_and_predict(family):
    from mmpretrain.structures import DataSample
    cls_cfg, _, backbone, _ = FAMILIES[family]
    torch.manual_seed(0)
    overrides = {f'model.backbone.{k}': v for k, v in backbone.items()}
    overrides['model.head.num_classes'] = 4
    overrides['model.train_cfg'] = None  # mixup/cutmix need the runner's data_preprocessor
    model = build(cls_cfg, 'mmpretrain', **overrides)
    if family == 'convnext':
        model.head.fc = torch.nn.Linear(256, 4)
    elif family == 'resnet':
        model.head.fc = torch.nn.Linear(512, 4)
    set_temperature(model, 0.5)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (1, 3)])
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01))
    before = [w.cells.detach().clone() for w in model.backbone.warehouses]
    losses = model.train_step(data, wrapper)
    assert torch.isfinite(losses['loss'])
    changed = [not torch.equal(b, w.cells) for b, w in zip(before, model.backbone.warehouses)]
    assert sum(changed) >= len(changed) // 2, changed  # (zero-initialised last norms block some)
    pred = model.val_step(data)[0]
    assert pred.pred_score.shape == (4, )


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_mask_rcnn_loss_and_predict(family):
    from mmdet.testing import demo_mm_inputs
    _, det_cfg, backbone, channels = FAMILIES[family]
    torch.manual_seed(0)
    overrides = {f'model.backbone.{k}': v for k, v in backbone.items()}
    overrides['model.neck.in_channels'] = channels
    model = build(det_cfg, 'mmdet', **overrides)
    packed = demo_mm_inputs(2, [[3, 64, 64], [3, 64, 64]], num_items=[1, 2], num_classes=80,
                            with_mask=True)
    model.train()
    losses = model(**model.data_preprocessor(packed, True), mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [w.cells.grad for w in model.backbone.warehouses]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(results) == 2 and results[0].pred_instances.bboxes.shape[-1] == 4


def small_backbone(family):
    from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet
    if family == 'resnet':
        return KWResNet(18, kw_cfg=dict(budget=1))
    if family == 'mobilenet_v2':
        return KWMobileNetV2(widen_factor=0.5, kw_cfg=dict(budget=1))
    return KWConvNeXt(arch=dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256]),
                      kw_cfg=dict(budget=1))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_batch_of_one_trains(family):
    torch.manual_seed(0)
    model = small_backbone(family).train()
    set_temperature(model, 0.5)
    before = [w.cells.detach().clone() for w in model.warehouses]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(1, 3, 64, 64))
    sum(o.float().square().mean() for o in out).backward()
    opt.step()
    assert any(not torch.equal(b, w.cells) for b, w in zip(before, model.warehouses))


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_bf16_autocast_step_is_finite(family):
    torch.manual_seed(0)
    model = small_backbone(family).train()
    set_temperature(model, 0.5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sync_bn_conversion_covers_attention_norms():
    from mmengine.model import convert_sync_batchnorm
    model = convert_sync_batchnorm(small_backbone('resnet'), implementation='torch')
    norms = [m for n, m in model.named_modules() if n.endswith('attention.norm1')]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@requires_cuda
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_fp16_autocast_step_is_finite_on_cuda(family):
    torch.manual_seed(0)
    model = small_backbone(family).cuda().train()
    set_temperature(model, 0.5)
    scaler = torch.amp.GradScaler('cuda', init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 64, 64, device='cuda')
    # the scaler skips steps whose scaled fp16 gradients overflow, halving its
    # scale each time; within 12 steps it must find one that does not
    for _ in range(12):
        opt.zero_grad()
        with torch.autocast('cuda', dtype=torch.float16):
            out = model(x)
            loss = sum(o.float().square().mean() for o in out)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters()
                     if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        if finite:
            break
    assert finite and scaler.get_scale() > 0


@requires_cuda
def test_sync_bn_trains_on_cuda(tmp_path):
    import torch.distributed as dist
    from mmengine.model import convert_sync_batchnorm
    created = not dist.is_initialized()
    if created:  # a one-process group is enough for SyncBatchNorm's all-reduce
        dist.init_process_group('nccl', init_method=f'file://{tmp_path}/pg', rank=0,
                                world_size=1)
    try:
        model = convert_sync_batchnorm(small_backbone('resnet'), implementation='torch')
        model = model.cuda().train()
        attention_norm = model.layer1[0].conv1.attention.norm1
        assert isinstance(attention_norm, torch.nn.SyncBatchNorm)
        before = attention_norm.running_mean.clone()
        out = model(torch.randn(4, 3, 64, 64, device='cuda'))
        loss = sum(o.float().square().mean() for o in out)
        loss.backward()
        assert torch.isfinite(loss)
        assert not torch.equal(before, attention_norm.running_mean)  # synced statistics
        assert attention_norm.weight.grad is not None
    finally:
        if created:
            dist.destroy_process_group()
