# DeiT-Tiny + KernelWarehouse (b = 4), paper Table 11: the layout of
# kw1x-deit-tiny_4xb256_in1k.py with four times the cells (4 warehouses of 120
# cells of 192x192). 19.98M parameters against the paper's 20.44M (README.md).
_base_ = './kw1x-deit-tiny_4xb256_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(budget=4.0)))
