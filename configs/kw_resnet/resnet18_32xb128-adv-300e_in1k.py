# Plain ResNet18 (KWResNet, kw_cfg=None) with the paper's "advanced" recipe
# (appendix A.1.1, following ConvNeXt): AdamW lr 4e-3 cosine, wd 0.05, 300
# epochs, batch 4096, RandAugment, mixup, cutmix, random erasing, label
# smoothing -- mmpretrain's ConvNeXt-T ImageNet recipe with the backbone and
# head swapped. The KW configs of Table 2 inherit this file.
_base_ = 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='KWResNet', depth=18, kw_cfg=None, out_indices=(3, ),
                  drop_path_rate=0.1),
    # ConvNeXt pools inside its backbone; ResNet needs the usual pooling neck
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=512))
