"""Float32 against float64 training of the same model, side by side.

Trains one initial model twice, in float32 and in float64, on identical
batches of the demo classification set (``kw_mm/demo/shapes.py``), and
reports every ``--interval`` iterations how far the float32 run is from the
float64 one:

- ``param``: ‖θ32 − θ64‖ / ‖θ64‖ over all parameters (accumulated drift);
- ``loss``: |L32 − L64| of the iteration's batch;
- ``grad``: median over parameter tensors of ‖g32 − g64‖ / ‖g64‖, the two
  runs' gradients (each at its own parameters);
- ``step``: the same median for one step's rounding alone: the gradient of
  a float32 copy of the float64 model against the float64 gradient, on the
  same batch (what a single training step's float32 error is at that point
  of training, without the drift).

Variants: ``kw-bn`` (KW ResNet, attention with BatchNorm1d, the default),
``kw-ln`` (attention with LayerNorm) and ``plain`` (the same ResNet with
ordinary convolutions). τ falls linearly from 1 to 0 over ``--tau-iters`` as
``KWTemperatureHook`` would make it.

    python tools/analysis_tools/float32_drift.py --iters 300 --interval 25

This is an analysis script: numbers depend on the settings shown in its header.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = {'kw-bn': dict(budget=1.0, norm='BN'), 'kw-ln': dict(budget=1.0, norm='LN'),
            'plain': None}
#: mmpretrain's ImageNet normalisation (BGR images, as cv2 reads them, → RGB)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class Classifier(nn.Module):
    """KWResNet (or the plain ResNet with ``kw_cfg=None``), global pooling, linear head."""

    def __init__(self, depth: int, base_channels: int, kw_cfg: Optional[dict],
                 num_classes: int) -> None:
        super().__init__()
        from kw_mm.models.backbones import KWResNet
        self.backbone = KWResNet(depth=depth, kw_cfg=kw_cfg, stem_channels=base_channels,
                                 base_channels=base_channels)
        self.backbone.init_weights()
        self.head = nn.Linear(self.backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def load_images(data_root: str, size: int) -> Dict[str, torch.Tensor]:
    """The demo set's training images ``[N, 3, size, size]`` (normalised RGB) and labels."""
    import cv2

    from kw_mm.demo.shapes import CLASSES, make_shapes_classification
    make_shapes_classification(data_root)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted(glob.glob(osp.join(data_root, 'train', name, '*.png'))):
            img = cv2.resize(cv2.imread(path), (size, size), interpolation=cv2.INTER_AREA)
            images.append(torch.from_numpy(img[:, :, ::-1].copy()))
            labels.append(label)
    if not images:
        raise RuntimeError(f'no training images found under {data_root}/train')
    x = torch.stack(images).permute(0, 3, 1, 2).double()
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return dict(images=x, labels=torch.tensor(labels), num_classes=len(CLASSES))


def tensor_relative(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Median over tensors of ‖a − b‖ / ‖b‖ (tensors with ‖b‖ = 0 left out)."""
    ratios = [float((x.double() - y).norm() / y.norm()) for x, y in zip(a, b)
              if y is not None and x is not None and float(y.norm()) > 0]
    return statistics.median(ratios) if ratios else float('nan')


def global_relative(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together."""
    diff = sum(float((x.double() - y).square().sum()) for x, y in zip(a, b))
    norm = sum(float(y.square().sum()) for y in b)
    return (diff / norm) ** 0.5 if norm > 0 else float('nan')


def gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Loss and parameter gradients of one forward/backward in ``model``'s dtype."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), [p.grad for p in model.parameters()]


def set_tau(model: nn.Module, iteration: int, tau_iters: int) -> None:
    from kw_mm import set_temperature
    set_temperature(model, max(1.0 - iteration / tau_iters, 0.0) if tau_iters > 0 else 0.0)


def run_variant(name: str, data: Dict[str, torch.Tensor], args: argparse.Namespace
                ) -> List[Dict[str, float]]:
    torch.manual_seed(args.seed)
    model32 = Classifier(args.depth, args.base_channels, VARIANTS[name],
                         data['num_classes']).float().train()
    model64 = copy.deepcopy(model32).double()
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
            for m in (model32, model64)]
    order = torch.Generator().manual_seed(args.seed)
    num = data['images'].shape[0]
    rows = []
    for it in range(args.iters):
        index = torch.randint(0, num, (args.batch,), generator=order)
        flip = torch.rand(args.batch, generator=order) < 0.5
        x64 = data['images'][index]
        x64[flip] = x64[flip].flip(-1)
        y = data['labels'][index]
        warmup = min(1.0, 0.1 + 0.9 * it / max(args.warmup, 1))
        for m, opt in zip((model32, model64), opts):
            set_tau(m, it, args.tau_iters)
            for group in opt.param_groups:
                group['lr'] = args.lr * warmup
        log = it % args.interval == 0 or it == args.iters - 1
        if log:  # one step's float32 rounding at the float64 run's current state
            probe = copy.deepcopy(model64).float()
            _, step32 = gradients(probe, x64.float(), y)
            del probe
        loss32, g32 = gradients(model32, x64.float(), y)
        loss64, g64 = gradients(model64, x64, y)
        if log:
            row = dict(iter=it, loss64=loss64, loss_diff=abs(loss32 - loss64),
                       param=global_relative([p.detach() for p in model32.parameters()],
                                             [p.detach() for p in model64.parameters()]),
                       grad=tensor_relative(g32, g64), step=tensor_relative(step32, g64))
            rows.append(row)
            print(f'{name:>6} {it:5d} {loss64:9.4f} {row["loss_diff"]:10.2e} '
                  f'{row["param"]:10.2e} {row["grad"]:10.2e} {row["step"]:10.2e}', flush=True)
        for opt in opts:
            opt.step()
        if not all(torch.isfinite(p).all() for p in model64.parameters()):
            raise RuntimeError(f'{name}: the float64 run diverged at iteration {it} '
                               f'(lower --lr)')
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', default='kw-bn,kw-ln,plain',
                        help=f'comma-separated, from {sorted(VARIANTS)}')
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--interval', type=int, default=25, help='report every N iterations')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=64, help='image side (pixels)')
    parser.add_argument('--depth', type=int, default=18, choices=[18, 34, 50])
    parser.add_argument('--base-channels', type=int, default=64,
                        help='ResNet width (stem and first stage)')
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--warmup', type=int, default=10, help='linear warm-up iterations')
    parser.add_argument('--tau-iters', type=int, default=None,
                        help='τ falls from 1 to 0 over these iterations (default: iters / 3)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data', 'demo_shapes_cls'),
                        help='the demo classification set (created there if missing)')
    parser.add_argument('--json', help='also write the rows as JSON')
    args = parser.parse_args(argv)
    names = args.variants.split(',')
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f'--variants: unknown {unknown}; choose from {sorted(VARIANTS)}')
    for label in ('iters', 'interval', 'batch', 'size', 'base_channels', 'threads'):
        if getattr(args, label) < 1:
            parser.error(f'--{label.replace("_", "-")} must be a positive int, '
                         f'got {getattr(args, label)}')
    if args.size < 32:
        parser.error(f'--size must be at least 32 (the ResNet downsamples 32x), got {args.size}')
    if not args.lr > 0:
        parser.error(f'--lr must be positive, got {args.lr}')
    if args.tau_iters is None:
        args.tau_iters = max(args.iters // 3, 1)
    elif args.tau_iters < 0:
        parser.error(f'--tau-iters must be >= 0, got {args.tau_iters}')
    args.variants = names
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, float]]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_images(args.data_root, args.size)
    print(f'# float32 vs float64: ResNet{args.depth} width {args.base_channels}, '
          f'{args.size}x{args.size}, batch {args.batch}, {args.iters} iterations, '
          f'lr {args.lr}, tau 1 -> 0 over {args.tau_iters}, seed {args.seed}, '
          f'torch {torch.__version__}, {args.threads} threads')
    print(f'{"model":>6} {"iter":>5} {"loss64":>9} {"|dloss|":>10} {"param":>10} '
          f'{"grad":>10} {"step":>10}')
    results = {}
    for name in args.variants:
        start = time.perf_counter()
        results[name] = run_variant(name, data, args)
        print(f'# {name}: {time.perf_counter() - start:.0f} s', flush=True)
    if args.json:
        from kw_mm.checkpoint.io import write_atomically
        payload = json.dumps(dict(settings={k: v for k, v in vars(args).items()},
                                  results=results), indent=1)
        write_atomically(args.json, lambda f: f.write(payload.encode()))
    return results


if __name__ == '__main__':
    main()
