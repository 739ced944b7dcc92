# ResNet50 + ODConv (4x), paper Table 2, advanced recipe (./resnet50_32xb128-adv-300e_in1k.py).
# Every convolution of the bottleneck blocks is an ODConv2d with 4 kernels (reduction 1/16,
# hidden width at least 16); stem and shortcuts plain, as in ODConv's od_resnet.
# Temperature 30 -> 1 over the first 10 epochs.
_base_ = './resnet50_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='ODConv', kernel_num=4)))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicConvTemperatureHook', epochs=10),
]
