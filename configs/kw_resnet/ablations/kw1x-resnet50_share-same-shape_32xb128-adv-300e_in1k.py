# Paper Table 7, 'same dimensioned kernels': a stage's warehouse is split by kernel shape.
# Ablation on the paper's advanced recipe (paper §4.3); only kw_cfg differs from the base.
_base_ = '../kw1x-resnet50_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(share_across_shapes=False)))
