# MobileNetV2 (1.0x) + KW* (4x), paper appendix A.4, Table 17: KW (4x)
# (./kw4x-mobilenet-v2_8xb32_in1k.py) whose layers' attentions also compute ODConv's
# attentions along the kernel's spatial positions, input channels and output channels
# (kw_cfg.omni_attention), which multiply each sample's assembled kernel. tau as for KW.
_base_ = './kw4x-mobilenet-v2_8xb32_in1k.py'
model = dict(backbone=dict(kw_cfg=dict(omni_attention=True)))
