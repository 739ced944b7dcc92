# Plain ConvNeXt-Tiny baseline (28.59M) built by KWConvNeXt (kw_cfg=None: the
# same module names as the KW models), with the recipe of the KW configs.
_base_ = './kw1x-convnext-tiny_32xb128_in1k.py'
model = dict(backbone=dict(kw_cfg=None, drop_path_rate=0.1))
custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
