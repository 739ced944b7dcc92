# MobileNetV2 (1.0x) + KernelWarehouse (b = 1), released "kw1x_mobilenetv2_100":
# every convolution is KW; per stage one warehouse for the point-wise and one
# for the depth-wise convolutions (appendix A.3).
# MobileNetV2 recipe of appendix A.1.1, inherited by every config in this
# folder: SGD (momentum 0.9), 150 epochs, lr 0.1 annealed to zero by a cosine
# schedule, weight decay 4e-5, batch 256 (8 GPUs x 32), random resized crop +
# horizontal flip, tau falling linearly 1 -> 0 over the first 10 epochs.
# (The authors' released run configs say lr 0.05 and 15 tau epochs.)
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'
custom_imports = dict(imports=['kw_mm'], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='KWMobileNetV2', widen_factor=1.0,
                           kw_cfg=dict(budget=1.0), kw_layout='pointwise_depthwise',
                           out_indices=(7, )))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=4e-5))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', by_epoch=True, begin=0, end=150,
                       T_max=150, eta_min=0.0, convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=150, val_interval=1)
custom_hooks = [dict(type='KWTemperatureHook', epochs=10)]
