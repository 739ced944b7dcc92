# Plain ResNet18 baseline built by KWResNet (kw_cfg=None): same module names
# as the KW models, traditional recipe (paper appendix A.1.1).
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWResNet', depth=18, kw_cfg=None,
                           out_indices=(3, )))
