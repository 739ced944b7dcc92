# ResNet50 + DY-Conv (4x), paper Table 2, advanced recipe (./resnet50_32xb128-adv-300e_in1k.py).
# Every convolution of the bottleneck blocks and of the shortcuts is a DYConv2d with 4
# kernels (hidden width C_in / 4; stem plain); temperature 30 -> 1 over the first 10 epochs.
_base_ = './resnet50_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='DYConv', kernel_num=4)))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicConvTemperatureHook', epochs=10),
]
