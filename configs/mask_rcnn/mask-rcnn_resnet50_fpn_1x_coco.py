# Mask R-CNN + FPN with a plain ResNet50 built by KWResNet (kw_cfg=None): the
# baseline of mask-rcnn_kw1x-resnet50_fpn_1x_coco.py, same names, mmdet's 1x recipe.
_base_ = './mask-rcnn_kw1x-resnet50_fpn_1x_coco.py'
model = dict(backbone=dict(kw_cfg=None))
custom_hooks = []
