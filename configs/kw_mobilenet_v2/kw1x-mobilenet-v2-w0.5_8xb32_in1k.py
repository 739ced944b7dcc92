# The 0.5x-width counterpart of ./kw1x-mobilenet-v2_8xb32_in1k.py, released
# "kw1x_mobilenetv2_050" (last convolution keeps 1280 channels).
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(widen_factor=0.5))
