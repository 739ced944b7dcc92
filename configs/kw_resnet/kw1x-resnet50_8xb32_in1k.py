# ResNet50 + KernelWarehouse (b = 1), traditional recipe (appendix A.1.1).
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWResNet', depth=50, kw_cfg=dict(budget=1.0),
                           out_indices=(3, )))
custom_hooks = [dict(type='KWTemperatureHook', epochs=10)]
