# The released ResNet50 1/2x uses the "non-local basis" attention
# (reference README): logits of cells outside a layer's own range come from
# a low-rank basis of max(int(N * 1/16), 16) logits.
_base_ = './kw1x-resnet50_8xb32_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(budget=0.5, nonlocal_basis_ratio=0.0625)))
