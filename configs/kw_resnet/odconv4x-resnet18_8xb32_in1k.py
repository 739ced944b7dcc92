# ResNet18 + ODConv (4x) (Li, Zhou & Yao, ICLR 2022), paper Table 1, traditional recipe
# (./resnet18_8xb32_in1k.py). Every convolution of the residual blocks is an ODConv2d with
# 4 kernels and attention reduction 1/16 (hidden width at least 16); the stem and the
# shortcuts' downsampling convolutions stay plain, as in ODConv's od_resnet. The attention
# temperature falls linearly 30 -> 1 over the first 10 epochs, as ODConv's training code does.
_base_ = './resnet18_8xb32_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='ODConv', kernel_num=4)))
custom_hooks = [dict(type='DynamicConvTemperatureHook', epochs=10)]
