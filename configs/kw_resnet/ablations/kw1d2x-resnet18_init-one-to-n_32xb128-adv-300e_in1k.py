# Paper Table 13, KW (1/2×) '1 kernel cell to 2 linear mixtures'.
# Ablation on the paper's advanced recipe (paper §4.3); only kw_cfg differs from the base.
_base_ = '../kw1d2x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(init='one_to_n')))
