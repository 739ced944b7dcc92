# MobileNetV2 (1.0x) + ODConv (4x), paper Tables 4 and 17, MobileNetV2 recipe
# (./kw1x-mobilenet-v2_8xb32_in1k.py). Every convolution is an ODConv2d with 4 kernels
# (reduction 1/16, hidden width at least 16), the stem included: that gives the paper's
# 11.52M (ODConv's released od_mobilenetv2 keeps the stem plain: 11.51M). Temperature
# 30 -> 1 over the first 10 epochs.
_base_ = './mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='ODConv', kernel_num=4)))
custom_hooks = [dict(type='DynamicConvTemperatureHook', epochs=10)]
