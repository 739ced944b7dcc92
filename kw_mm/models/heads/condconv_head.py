"""A linear classification head whose classifier is a CondConv layer.

The CondConv ResNet18 (8×) of the paper's Table 1 (81.35M parameters) has a
CondConv classifier as well as CondConv layers in its last three residual
blocks (as CondConv's own models do). In an mmpretrain ``ImageClassifier``
the head is built on its own, so the classifier is this head's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from mmengine.registry import MODELS
from mmpretrain.models.heads import ClsHead

from ...layers.dynamic.condconv import CondConvLinear


@MODELS.register_module()
class CondConvLinearClsHead(ClsHead):
    """Linear classifier head with a CondConv classifier
    (:class:`~kw_mm.layers.dynamic.condconv.CondConvLinear`).

    ``forward`` is ``fc(feats[-1])``, as mmpretrain's ``LinearClsHead``.

    Args:
        num_classes (int): Number of classes.
        in_channels (int): Channels of the input feature.
        kernel_num (int): Number of experts of the classifier. Defaults to 8.
        init_cfg (dict, optional): mmengine init config. Defaults to None
            (the layer initialises itself: experts ``Normal(0, 0.01)``).
        **kwargs: ``loss``, ``topk``, ``cal_acc`` of mmpretrain's ``ClsHead``.
    """

    def __init__(self, num_classes: int, in_channels: int, kernel_num: int = 8,
                 init_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(init_cfg=init_cfg, **kwargs)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.fc = CondConvLinear(in_channels, num_classes, kernel_num=kernel_num)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The feature of the last stage (as ``LinearClsHead``)."""
        return feats[-1]

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """Class scores ``[B, num_classes]``."""
        return self.fc(self.pre_logits(feats))
