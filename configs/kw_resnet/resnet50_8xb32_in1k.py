# Plain ResNet50 baseline built by KWResNet (kw_cfg=None).
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWResNet', depth=50, kw_cfg=None,
                           out_indices=(3, )))
