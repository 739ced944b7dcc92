# Mask R-CNN, FPN, KernelWarehouse ResNet50 at b = 4, COCO 1x schedule: the
# short name of mask_rcnn/mask-rcnn_kw4x-resnet50_fpn_1x_coco.py, which defines
# the model.
_base_ = './mask_rcnn/mask-rcnn_kw4x-resnet50_fpn_1x_coco.py'
