"""A linear classification head whose classifier is a KW linear layer.

The released MobileNetV2 1/2x models put their 1000-way classifier in a
warehouse of its own (paper appendix A.3: cells of 1000 × 32, b = 1/2). In
an mmpretrain ``ImageClassifier`` the backbone and the head are built
independently from their configs, so this head owns that warehouse: its
``fc`` is a :class:`~kw_mm.layers.KWLinear` with a private warehouse
(``head.fc.warehouse.cells``). That is exactly the authors' model, because
no other layer draws from the classifier's warehouse (its cells and β walk
start at 0 either way); only the parameter's name differs, which
:mod:`kw_mm.convert` maps (the authors' last warehouse is the classifier's).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from mmengine.registry import MODELS
from mmpretrain.models.heads import ClsHead
from torch import nn

from ...layers.kw_conv import KWLinear
from ...layers.options import KWOptions


@MODELS.register_module()
class KWLinearClsHead(ClsHead):
    """Linear classifier head with a KernelWarehouse linear layer.

    ``forward`` is ``fc(dropout(feats[-1]))``, as mmpretrain's
    ``LinearClsHead`` plus the dropout of the released MobileNetV2 1/2x
    classifier (which also feeds the KW attention). Registered in mmengine's
    root ``MODELS``, so ``type='KWLinearClsHead'`` builds from mmpretrain
    configs once ``kw_mm`` is imported.

    Args:
        num_classes (int): Number of classes.
        in_channels (int): Channels of the input feature.
        kw_cfg (dict, optional): The KW options of the classifier and its
            own warehouse, any of :class:`~kw_mm.layers.KWOptions` (which
            documents each one and its default; the cell ratios are
            fractions of ``in_channels`` / ``num_classes``; ``sharing``
            cannot be 'none'; ``inference_basis`` does not apply); kept as
            ``self.kw_options``. The released MobileNetV2 1/2x uses
            ``dict(budget=0.5, reduction=1/32, cell_in_ratio=0.025,
            cell_out_ratio=1)`` (1000 × 32 cells for 1280 input channels).
            ``None`` gives a plain ``nn.Linear`` (then the head is
            ``LinearClsHead`` with dropout). Defaults to ``dict(budget=1)``.
        dropout (float): Dropout probability before the classifier.
            Defaults to 0.
        init_cfg (dict, optional): mmengine init config. Defaults to None:
            the KW layer initialises itself; a plain ``fc`` gets
            ``Normal(std=0.01)`` as in ``LinearClsHead``.
        **kwargs: ``loss``, ``topk``, ``cal_acc`` of mmpretrain's ``ClsHead``.
    """

    def __init__(self, num_classes: int, in_channels: int,
                 kw_cfg: Optional[Dict[str, Any]] = dict(budget=1.0), dropout: float = 0.0,
                 init_cfg: Optional[dict] = None, **kwargs) -> None:
        for label, value in (('num_classes', num_classes), ('in_channels', in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0 <= dropout < 1):
            raise ValueError(f'dropout must be a number in [0, 1), got {dropout!r}')
        options = KWOptions.from_kw_cfg(kw_cfg)
        if init_cfg is None and options is None:
            init_cfg = dict(type='Normal', layer='Linear', std=0.01)
        super().__init__(init_cfg=init_cfg, **kwargs)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.kw_options = options
        self.kw_cfg = None if options is None else options.as_dict()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if options is None:
            self.fc: nn.Module = nn.Linear(in_channels, num_classes)
        else:
            # The head owns its warehouse, so every sharing range short of 'none'
            # means the same thing here.
            if options.sharing == 'none':
                raise ValueError("kw_cfg.sharing='none' is not supported by KWLinearClsHead "
                                 "(its single layer owns its warehouse); use 'layer'")
            self.fc = KWLinear(in_channels, num_classes, bias=True, name='fc', options=options)

    def pre_logits(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """The feature of the last stage (as ``LinearClsHead``)."""
        return feats[-1]

    def forward(self, feats: Tuple[torch.Tensor]) -> torch.Tensor:
        """Class scores ``[B, num_classes]``."""
        return self.fc(self.dropout(self.pre_logits(feats)))
