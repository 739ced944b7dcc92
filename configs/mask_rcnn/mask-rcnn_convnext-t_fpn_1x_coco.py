# Mask R-CNN + FPN with a plain ConvNeXt-T (KWConvNeXt, kw_cfg=None), mmdet's
# 1x recipe. The KW config inherits this one and only changes kw_cfg.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
pretrained = None  # an ImageNet checkpoint in mmpretrain layout, or None
model = dict(
    backbone=dict(
        _delete_=True,
        type='KWConvNeXt',
        arch='tiny',
        kw_cfg=None,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        gap_before_final_norm=False,
        init_cfg=(dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')
                  if pretrained else None)),
    neck=dict(in_channels=[96, 192, 384, 768]))
val_evaluator = dict(type='CocoMetric', metric=['bbox', 'segm'])
test_evaluator = val_evaluator
