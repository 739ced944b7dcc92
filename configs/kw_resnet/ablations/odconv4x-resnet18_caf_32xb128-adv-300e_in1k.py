# Paper Table 10, ODConv (4x) with "our CAF": the kernel attention is CAF,
# (1 - tau) * z / (sum|z| + 1e-3) + tau * beta with beta one-hot on the first kernel,
# instead of the softmax; tau falls 1 -> 0 over the first 20 epochs (KW's advanced recipe).
# The spatial and channel sigmoids keep ODConv's temperature annealing (30 -> 1, 10 epochs).
_base_ = '../odconv4x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(attention_fn='caf')))
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicConvTemperatureHook', epochs=10),
    dict(type='KWTemperatureHook', epochs=20),
]
