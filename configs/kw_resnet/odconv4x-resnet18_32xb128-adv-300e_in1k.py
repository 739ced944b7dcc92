# ResNet18 + ODConv (4x), paper Tables 2 and 10 (softmax row), advanced recipe
# (./resnet18_32xb128-adv-300e_in1k.py, with EMA as every advanced-recipe model).
# Layers as odconv4x-resnet18_8xb32_in1k.py; temperature 30 -> 1 over the first 10 epochs.
_base_ = './resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='ODConv', kernel_num=4)))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicConvTemperatureHook', epochs=10),
]
