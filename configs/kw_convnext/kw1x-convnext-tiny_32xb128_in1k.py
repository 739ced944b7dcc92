# ConvNeXt-Tiny + KernelWarehouse (b = 1), the layout of the authors' released
# kw1x_convnext_tiny (39.37M parameters; tools/convert_official_kw.py loads it).
# Advanced recipe of appendix A.1.1 (mmpretrain's ConvNeXt-T recipe): AdamW,
# 300 epochs, lr 4e-3 (batch 4096 = 32 x 128; scale with --auto-scale-lr),
# cosine, wd 0.05, RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25,
# label smoothing 0.1, EMA; tau falls linearly 1 -> 0 over the first 20 epochs.
_base_ = 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='KWConvNeXt',
        arch='tiny',
        kw_cfg=dict(budget=1.0),  # attention: LayerNorm, reduction 1/16
        kw_layout='released',
        drop_path_rate=0.3,  # the released model's training option
        out_indices=(3, ),
        gap_before_final_norm=True))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='KWTemperatureHook', epochs=20),
]
