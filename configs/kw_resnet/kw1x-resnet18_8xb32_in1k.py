# ResNet18 + KernelWarehouse (b = 1), traditional recipe of appendix A.1.1:
# SGD, 100 epochs, lr 0.1 stepped x0.1 every 30 epochs, wd 1e-4, batch 256,
# tau falling linearly 1 -> 0 over the first 10 epochs.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWResNet', depth=18, kw_cfg=dict(budget=1.0),
                           out_indices=(3, )))
custom_hooks = [dict(type='KWTemperatureHook', epochs=10)]
