# Paper Table 10, DY-Conv (4×) with "our CAF": CAF and the one-to-one β initialisation
# (τ schedule from the base config) on top of the DY-Conv configuration.
_base_ = './dyconv4x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(attention_fn='caf', init='one_to_one')))
