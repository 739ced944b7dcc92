# Plain DeiT-Tiny baseline (5.72M) built by KWVisionTransformer (kw_cfg=None:
# mmpretrain's VisionTransformer, the same module names and outputs), on
# mmpretrain's DeiT recipe: AdamW, 300 epochs, batch 1024 (4x256), RandAugment,
# mixup, cutmix, random erasing, label smoothing.
_base_ = 'mmpretrain::deit/deit-tiny_4xb256_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWVisionTransformer', arch='deit-tiny',
                           img_size=224, patch_size=16, kw_cfg=None))
