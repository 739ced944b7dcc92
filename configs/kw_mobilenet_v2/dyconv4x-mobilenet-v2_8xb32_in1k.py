# MobileNetV2 (1.0x) + DY-Conv (4x), paper Table 4, MobileNetV2 recipe
# (./kw1x-mobilenet-v2_8xb32_in1k.py). Every convolution of the inverted residual blocks and
# the final 1x1 convolution is a DYConv2d with 4 kernels (hidden width C_in / 4); the stem
# stays plain. Softmax temperature 30 -> 1 over the first 10 epochs.
_base_ = './mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='DYConv', kernel_num=4)))
custom_hooks = [dict(type='DynamicConvTemperatureHook', epochs=10)]
