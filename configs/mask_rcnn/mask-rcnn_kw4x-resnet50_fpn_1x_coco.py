# Mask R-CNN, FPN, KernelWarehouse ResNet50 at b = 4, COCO 1x schedule: the b = 1
# config with a four times larger parameter budget. Also run as
# configs/mask_rcnn_kw4x_r50.py, which inherits this file unchanged.
_base_ = './mask-rcnn_kw1x-resnet50_fpn_1x_coco.py'
model = dict(backbone=dict(kw_cfg=dict(budget=4.0)))
