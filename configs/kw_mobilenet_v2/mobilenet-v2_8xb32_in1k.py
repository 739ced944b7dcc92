# Plain MobileNetV2 (1.0x) baseline built by KWMobileNetV2 (kw_cfg=None): the
# module names and the recipe (appendix A.1.1) of the KW models.
_base_ = './kw1x-mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(kw_cfg=None, kw_layout=None))
custom_hooks = []
