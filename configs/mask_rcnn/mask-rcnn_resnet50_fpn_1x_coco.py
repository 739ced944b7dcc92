# Mask R-CNN + FPN with a plain ResNet50 built by KWResNet (kw_cfg=None): the
# baseline of ../mask_rcnn_kw_r50.py, same names, mmdet's 1x recipe.
_base_ = '../mask_rcnn_kw_r50.py'
model = dict(backbone=dict(kw_cfg=None))
custom_hooks = []
