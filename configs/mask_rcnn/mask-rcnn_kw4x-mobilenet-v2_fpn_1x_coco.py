# Mask R-CNN + FPN with KernelWarehouse MobileNetV2 1.0 at b = 4, mmdet's 1x
# recipe; beta off while fine-tuning (appendix A.1.2).
_base_ = './mask-rcnn_mobilenet-v2_fpn_1x_coco.py'
model = dict(backbone=dict(kw_cfg=dict(_delete_=True, budget=4.0)))
custom_hooks = [dict(type='KWFinetuneHook')]
