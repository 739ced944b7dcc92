# Paper Table 5, 'kernel partition ✗': each cell is a whole kernel (m = 1); without partition only same-shaped kernels can share a warehouse.
# Ablation on the paper's advanced recipe (paper §4.3); only kw_cfg differs from the base.
_base_ = '../kw1x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(kernel_partition=False, share_across_shapes=False)))
