# Mask R-CNN + FPN with a plain MobileNetV2 1.0 (KWMobileNetV2, kw_cfg=None),
# mmdet's 1x recipe. The KW configs inherit this one and only change kw_cfg.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
pretrained = None  # an ImageNet checkpoint in mmpretrain layout, or None
model = dict(
    backbone=dict(
        _delete_=True,
        type='KWMobileNetV2',
        widen_factor=1.0,
        kw_cfg=None,
        out_indices=(1, 2, 4, 7),  # strides 4, 8, 16, 32: 24, 32, 96, 1280 channels
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=(dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')
                  if pretrained else None)),
    neck=dict(in_channels=[24, 32, 96, 1280]))
val_evaluator = dict(type='CocoMetric', metric=['bbox', 'segm'])
test_evaluator = val_evaluator
