# Mask R-CNN, FPN, KernelWarehouse ResNet50 (b = 1), COCO 1x schedule
# (mmdet's mask-rcnn_r50_fpn_1x_coco.py with the backbone swapped). Also run as
# configs/mask_rcnn_kw_r50.py, which inherits this file unchanged.
#
#   python tools/train.py configs/mask_rcnn/mask-rcnn_kw1x-resnet50_fpn_1x_coco.py \
#       [--pretrained work_dirs/kw1x_resnet50_mmpretrain.pth]
#
# COCO is read from data/coco/ (README.md shows the layout). The attention
# initialisation (beta) is off for the whole run (KWFinetuneHook, tau = 0), as
# in the paper's fine-tuning on COCO (appendix A.1.2).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)

# An ImageNet-pretrained KW-ResNet50 checkpoint in mmpretrain layout (e.g.
# written by tools/convert_official_kw.py); tools/train.py --pretrained CKPT
# sets the same thing. This is a fine-tuning config, as in the paper: stage 1
# frozen, every BatchNorm in eval mode, beta off. With pretrained = None the
# backbone keeps its random initialisation under those settings (fine for the
# demo and smoke tests); for real from-scratch training also set
# frozen_stages=-1, norm_eval=False and custom_hooks=[KWTemperatureHook].
pretrained = None
kw_cfg = dict(budget=1.0)

model = dict(
    backbone=dict(
        _delete_=True,
        type='KWResNet',
        depth=50,
        kw_cfg=kw_cfg,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=(dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')
                  if pretrained else None)))

custom_hooks = [dict(type='KWFinetuneHook')]

val_evaluator = dict(type='CocoMetric', metric=['bbox', 'segm'])
test_evaluator = val_evaluator
