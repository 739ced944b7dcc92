# ResNet18 + CondConv (8x) (Yang et al., NeurIPS 2019), paper Table 1, traditional recipe
# (./resnet18_8xb32_in1k.py). As in CondConv's models, the convolutions of the last three
# residual blocks (layer3.1, layer4.0, layer4.1; the shortcut stays plain) and the classifier
# are CondConv layers with 8 experts; the layers of a block share one routing function
# (GAP -> FC -> sigmoid of the block's input), the classifier has its own.
_base_ = './resnet18_8xb32_in1k.py'
model = dict(backbone=dict(dynamic_cfg=dict(type='CondConv', kernel_num=8)),
             head=dict(type='CondConvLinearClsHead', kernel_num=8))
