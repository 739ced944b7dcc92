# DeiT-Tiny + KernelWarehouse (b = 1), paper Table 11: the value, output
# projection and MLP layers are KW, every three consecutive blocks share one
# warehouse (4 warehouses of 30 cells of 192x192), query and key stay plain
# (see README.md for how this layout was chosen). mmpretrain's DeiT recipe
# (AdamW, 300 epochs, batch 1024); tau falls linearly 1 -> 0 over the first
# 20 epochs, as in the paper's 300-epoch recipe for ConvNets.
_base_ = 'mmpretrain::deit/deit-tiny_4xb256_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWVisionTransformer', arch='deit-tiny',
                           img_size=224, patch_size=16, kw_cfg=dict(budget=1.0),
                           blocks_per_warehouse=3, kw_proj=True))
custom_hooks = [dict(type='KWTemperatureHook', epochs=20)]
