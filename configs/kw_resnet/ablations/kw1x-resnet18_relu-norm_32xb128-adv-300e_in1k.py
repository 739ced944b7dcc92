# Paper Table 8, max(z, 0) / Σ|z| attention function.
# Ablation on the paper's advanced recipe (paper §4.3); only kw_cfg differs from the base.
_base_ = '../kw1x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(attention_fn='relu_norm')))
