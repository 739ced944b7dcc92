# Paper Tables 1, 2 and 10: DY-Conv (4×) as a configuration of the same code (paper §3.5):
# no kernel partition (m = 1), each convolution owns its warehouse of 4 whole kernels, softmax
# attention without β, attention hidden width 1/4 of the input channels as in DY-Conv.
# Not modelled: DY-Conv's softmax temperature annealing (30 -> 1) and its dynamic stem.
_base_ = '../kw1x-resnet18_32xb128-adv-300e_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(
    budget=4.0, kernel_partition=False, sharing='layer', attention_fn='softmax', init='none',
    reduction=0.25)))
