_base_ = './kw1x-resnet18_8xb32_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(budget=2.0)))
