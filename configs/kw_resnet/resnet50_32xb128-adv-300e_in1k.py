# Plain ResNet50 (KWResNet, kw_cfg=None) with the paper's advanced recipe
# (see resnet18_32xb128-adv-300e_in1k.py).
_base_ = './resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(depth=50), head=dict(in_channels=2048))
