# Mask R-CNN, FPN, KernelWarehouse ResNet50 (b = 1), COCO 1x schedule: the
# short name of mask_rcnn/mask-rcnn_kw1x-resnet50_fpn_1x_coco.py, which defines
# the model (see there).
#
#   python tools/train.py configs/mask_rcnn_kw_r50.py \
#       [--pretrained work_dirs/kw1x_resnet50_mmpretrain.pth]
#
# `pretrained = ...` only takes effect in the file that defines the backbone;
# here, pass --pretrained CKPT to tools/train.py (or set
# model.backbone.init_cfg).
_base_ = './mask_rcnn/mask-rcnn_kw1x-resnet50_fpn_1x_coco.py'
