# ResNet18 + KernelWarehouse (b = 2.0), paper Table 2 (advanced recipe);
# tau falls linearly 1 -> 0 over the first 20 epochs.
_base_ = './resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(_delete_=True, budget=2.0)))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='KWTemperatureHook', epochs=20),
]
