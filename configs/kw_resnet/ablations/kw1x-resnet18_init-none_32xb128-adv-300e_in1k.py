# Paper Tables 9 and 13, 'without attentions initialization': no τ·β term (τ has no effect).
# Ablation on the paper's advanced recipe (paper §4.3); only kw_cfg differs from the base.
_base_ = '../kw1x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(init='none')))
