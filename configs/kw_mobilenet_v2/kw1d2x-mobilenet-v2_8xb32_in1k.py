# MobileNetV2 (1.0x) + KernelWarehouse (b = 1/2), released "kw1d2x_mobilenetv2_100":
# KW on the stem and every depth-wise convolution (b = 1, gcd cells), on the
# point-wise convolutions of the last stage group (b = 1/2, half-gcd cells) and
# on the classifier (b = 1/2, cells 1000 x 32, a warehouse owned by the head),
# attention reduction 1/32; the released classifier has dropout 0.1.
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'
model = dict(
    backbone=dict(kw_cfg=dict(budget=0.5, reduction=1 / 32), kw_layout='compact'),
    head=dict(type='KWLinearClsHead', dropout=0.1,
              kw_cfg=dict(budget=0.5, reduction=1 / 32, cell_in_ratio=0.025,
                          cell_out_ratio=1.0)))
