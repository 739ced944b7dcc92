# The paper's detection recipe (appendix A.1.2 with the ConvNeXt fine-tuning
# settings): AdamW lr 1e-4, wd 0.05, multi-scale training with the DETR-style
# crop augmentation, 12 epochs with lr steps at 8 and 11, batch 16.
# Only `paper_*` names are defined here, so this file can be a second base
# next to a model config; the model configs pick them up with {{_base_.*}}.
paper_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(type='RandomChoiceResize',
                 scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333),
                         (640, 1333), (672, 1333), (704, 1333), (736, 1333), (768, 1333),
                         (800, 1333)],
                 keep_ratio=True)
        ], [
            dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                 keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                 allow_negative_crop=True),
            dict(type='RandomChoiceResize',
                 scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333),
                         (640, 1333), (672, 1333), (704, 1333), (736, 1333), (768, 1333),
                         (800, 1333)],
                 keep_ratio=True)
        ]]),
    dict(type='PackDetInputs'),
]
paper_optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
paper_param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
