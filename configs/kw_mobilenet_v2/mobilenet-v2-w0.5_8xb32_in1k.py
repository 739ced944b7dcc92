# Plain MobileNetV2 (0.5x) baseline (last convolution keeps 1280 channels).
_base_ = './mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(widen_factor=0.5))
