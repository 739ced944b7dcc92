# MobileNetV2 (1.0x) + KernelWarehouse (b = 4), released "kw4x_mobilenetv2_100":
# every convolution is KW; per stage three warehouses (depth-wise, expansion
# point-wise, reduction point-wise; appendix A.3).
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(budget=4.0), kw_layout='expansion_depthwise_reduction'))
