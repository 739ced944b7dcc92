# KW DeiT-Tiny (b = 1, configs/kw_deit/kw1x-deit-tiny_4xb256_in1k.py) on the
# synthetic one-shape-per-image classification set (kw_mm/demo/shapes.py:
# make_shapes_classification), changing only the data, the image size (64x64,
# 16 patches of 16x16), the batch augmentations (none) and the schedule
# (3 epochs of batch 16, AdamW lr 1e-3, tau over the first epoch).
_base_ = '../kw_deit/kw1x-deit-tiny_4xb256_in1k.py'

data_root = 'data/demo_shapes_cls/'
classes = ('circle', 'square', 'triangle')
model = dict(backbone=dict(img_size=64), head=dict(num_classes=len(classes)), train_cfg=None)
data_preprocessor = dict(num_classes=len(classes))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.6, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 data_prefix='train', classes=classes, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 data_prefix='val', classes=classes, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

max_epochs = 3
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs),
]
custom_hooks = [dict(type='KWTemperatureHook', epochs=1)]
auto_scale_lr = dict(enable=False)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=max_epochs))
