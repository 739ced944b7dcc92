# ResNet18 + DY-Conv (4x) (Chen et al., CVPR 2020), paper Table 1, traditional recipe
# (./resnet18_8xb32_in1k.py). Every convolution of the residual blocks and of the shortcuts
# is a DYConv2d with 4 kernels (attention GAP -> FC -> ReLU -> FC -> softmax, hidden width
# C_in / 4; stem plain); the softmax temperature falls linearly 30 -> 1 over the first 10
# epochs, as in DY-Conv.
_base_ = './resnet18_8xb32_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='DYConv', kernel_num=4)))
custom_hooks = [dict(type='DynamicConvTemperatureHook', epochs=10)]
