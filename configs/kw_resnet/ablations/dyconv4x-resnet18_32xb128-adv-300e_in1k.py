# Paper Tables 2 and 10 (softmax row): ResNet18 + DY-Conv (4x) (Chen et al., CVPR 2020) on the
# advanced recipe (../resnet18_32xb128-adv-300e_in1k.py, with EMA). Every convolution of the
# residual blocks and of the shortcuts is a DYConv2d with 4 kernels (attention
# GAP -> FC -> ReLU -> FC -> softmax, hidden width C_in / 4; stem plain); the softmax
# temperature falls linearly 30 -> 1 over the first 10 epochs, as in DY-Conv.
# (DY-Conv as a KW configuration, paper §3.5: kw_cfg=dict(budget=4.0, kernel_partition=False,
# sharing='layer', attention_fn='softmax', init='none', reduction=0.25), 45,473,991 params.)
_base_ = '../resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='DYConv', kernel_num=4)))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicConvTemperatureHook', epochs=10),
]
