"""A one-KW-layer classifier and its 8-sample dataset, for tests that run
mmengine's Runner (hooks, resume, DDP) without building a backbone."""
import torch
from mmengine.model import BaseModel
from torch import nn
from torch.utils.data import Dataset

from kw_mm import KWConv2d


class ToyModel(BaseModel):
    """A KW convolution, global pooling and a 2-class linear head."""

    def __init__(self):
        super().__init__()
        self.conv = KWConv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        logits = self.head(self.conv(inputs).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, labels))
        if mode == 'predict':
            return [dict(pred=p) for p in logits.argmax(1)]
        return logits


class ToyData(Dataset):
    """8 fixed random 3×6×6 images with alternating labels."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 6, 6, generator=g), labels=i % 2)
