# Mask R-CNN, FPN, KernelWarehouse ResNet50 at b = 4, COCO 1x schedule.
_base_ = './mask_rcnn_kw_r50.py'
model = dict(backbone=dict(kw_cfg=dict(budget=4.0)))
