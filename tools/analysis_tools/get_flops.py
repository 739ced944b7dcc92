"""FLOPs and parameters of kw_mm configs, KW against the plain counterpart.

    python tools/analysis_tools/get_flops.py CONFIG [CONFIG ...] [--shape H [W]]
        [--no-plain] [--table] [--cfg-options KEY=VALUE ...]

Counts one image of ``3 × H × W`` (default 224 × 224) in eval mode with
mmengine's analysis (``mmengine.analysis.FlopAnalyzer``): multiply-adds, one
fused multiply-add being one FLOP. A KW layer is counted as the paper computes
it, in three parts shown separately: the convolution with the assembled
kernel, the kernel assembly (paper Eq. 3, per sample: ``m·n·cell numel``) and
the attention branch (pooling, FCs, norm); ``kw_mm/analysis/complexity.py``
describes how. A classifier is counted whole (backbone, neck, head), a
detector's backbone and neck (``extract_feat``: the RPN and RoI heads depend on
the proposals, and KW changes only the backbone).

The plain counterpart is the same config with every ``kw_cfg`` set to None
(kw_mm's backbones and head then build the plain network); ``--no-plain``
skips it. ``--table`` prints one Markdown row per config instead of the
report, e.g. for ``configs/README.md``.
"""
import argparse
import copy
import os.path as osp
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from kw_mm.apis import load_config  # noqa: E402

TABLE_HEADER = ('| config | params | FLOPs | KW conv | KW assembly | KW attention | '
                'plain FLOPs |\n|---|---|---|---|---|---|---|')


#: the width of the report's labels
LABEL = 54


class PlainCounterpartError(ValueError):
    """The config's plain counterpart cannot be built without KW layers."""


def _shape(values: List[int]) -> Tuple[int, int]:
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='FLOPs (multiply-adds) and parameters of kw_mm configs, KW against plain')
    parser.add_argument('configs', nargs='+', metavar='CONFIG', help='config file(s)')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224], metavar='SIZE',
                        help='input size: H W, or one size for a square (default: 224 224)')
    parser.add_argument('--no-plain', action='store_true',
                        help='do not count the plain counterpart (kw_cfg=None)')
    parser.add_argument('--table', action='store_true',
                        help='print one Markdown table row per config instead of the report')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries of every config')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2):
        parser.error(f'--shape takes H W or one size, got {len(args.shape)} values: '
                     f'{" ".join(map(str, args.shape))}')
    if min(args.shape) < 1:
        parser.error(f'--shape sizes must be positive, got {" ".join(map(str, args.shape))}')
    args.shape = _shape(args.shape)
    return args


def counted_part(model):
    """(what runs, its description): a classifier whole, a detector's ``extract_feat``."""
    detectors = sys.modules.get('mmdet.models.detectors')
    if detectors is not None and isinstance(model, detectors.BaseDetector):
        return model.extract_feat, (f'{type(model).__name__}: FLOPs of the backbone and neck, '
                                    'parameters of the whole model')
    classifiers = sys.modules.get('mmpretrain.models.classifiers')
    if classifiers is not None and isinstance(model, classifiers.BaseClassifier):
        return None, f'{type(model).__name__}: backbone, neck and head'
    return None, type(model).__name__


def count(cfg: Config, shape: Tuple[int, int]):
    """(Complexity, description) of ``cfg``'s model on one ``3 × H × W`` image."""
    import torch

    from kw_mm.analysis.complexity import model_complexity
    from kw_mm.apis import build_from_config
    model = build_from_config(cfg).eval()
    forward, what = counted_part(model)
    image = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    return model_complexity(model, image, forward), what


def count_plain(cfg: Config, shape: Tuple[int, int]):
    """The Complexity of ``cfg``'s plain counterpart (every ``kw_cfg`` None)."""
    from kw_mm.analysis.complexity import plain_counterpart
    plain = copy.deepcopy(cfg)
    plain.model = plain_counterpart(cfg.model)
    result, _ = count(plain, shape)
    if result.kw_layers:
        raise PlainCounterpartError(
            f'{cfg.filename}: the plain counterpart (every kw_cfg set to None) still has '
            f'{result.kw_layers} KW layer(s), built without a kw_cfg argument; pass --no-plain')
    return result


def human(value: float) -> str:
    """``value`` with a G / M / K suffix, three significant digits."""
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if abs(value) >= scale:
            return f'{value / scale:.3g} {suffix}'
    return f'{value:g}'


def report(path: str, result, plain, what: str) -> str:
    """The text report of one config."""
    from kw_mm.analysis.complexity import FLOP_PART_NAMES, PARAM_PART_NAMES
    shape = 'x'.join(map(str, result.input_shape))
    lines = [path, f'  {what}; input {shape}; {result.kw_layers} KW layer(s)']
    head = f'  {"":<{LABEL}}{"KW" if result.kw_layers else "model":>10}'
    if plain is not None:
        head += f'{"plain":>10}{"ratio":>8}'
    lines.append(head)

    def row(label, value, plain_value, indent):
        text = f'  {" " * indent}{label:<{LABEL - indent}}{human(value):>10}'
        if plain is not None:
            text += f'{human(plain_value):>10}'
            if indent == 0 and plain_value:
                text += f'{value / plain_value:>7.2f}x'
        return text

    lines.append(row('parameters', result.params, plain and plain.params, 0))
    for key, name in PARAM_PART_NAMES.items():
        lines.append(row(name, result.param_parts[key], plain and plain.param_parts[key], 2))
    lines.append(row('FLOPs (multiply-adds, per image)', result.flops, plain and plain.flops, 0))
    for key, name in FLOP_PART_NAMES.items():
        lines.append(row(name, result.flop_parts[key], plain and plain.flop_parts[key], 2))
    if result.uncounted_ops:
        ops = ', '.join(op.replace('aten::', '') for op in result.uncounted_ops)
        lines.append(f'  not counted (element-wise): {ops}')
    return '\n'.join(lines)


def table_row(path: str, result, plain) -> str:
    """One Markdown row: params (M), then FLOPs, the KW parts and the plain FLOPs."""
    parts = result.flop_parts
    flops = [result.flops, parts['kw_conv'], parts['kw_assembly'], parts['kw_attention']]
    cells = [f'`{path}`', f'{result.params / 1e6:.2f}M', *map(human, flops),
             '–' if plain is None else human(plain.flops)]
    return '| ' + ' | '.join(cells) + ' |'


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    args = parse_args(argv)
    for path in args.configs:  # every path before the first (slow) count
        if not osp.isfile(path):
            raise FileNotFoundError(f'config not found: {path}')
    # building models logs through the latest logger: one that shows warnings only
    MMLogger.get_instance('kw_get_flops', log_level='WARNING')
    out = []
    if args.table:
        print(TABLE_HEADER, flush=True)
    for path in args.configs:
        cfg = load_config(path, args.cfg_options)
        result, what = count(cfg, args.shape)
        plain = None if args.no_plain or not result.kw_layers else count_plain(cfg, args.shape)
        text = table_row(path, result, plain) if args.table else report(path, result, plain,
                                                                        what)
        print(text, flush=True)
        out.append(text)
    return out


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, PlainCounterpartError) as err:
        sys.exit(f'error: {err}')
