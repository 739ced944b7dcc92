"""Convert a released KernelWarehouse ImageNet checkpoint to kw_mm (mmpretrain).

    python tools/convert_official_kw.py SRC DST [--ema]

Finds which released model SRC holds from its tensor shapes, writes an
mmpretrain checkpoint to DST (atomically), and prints as its last line the
config, relative to the repository root, that builds that model:

    python tools/test.py $(python tools/convert_official_kw.py SRC DST | tail -1) DST
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from kw_mm.convert import CheckpointMismatchError, convert_file  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help="the authors' checkpoint (.pth)")
    parser.add_argument('dst', help='where to write the mmpretrain checkpoint')
    parser.add_argument('--ema', action='store_true',
                        help="take the 'model_ema' weights when the file has both")
    args = parser.parse_args(argv)
    try:
        model = convert_file(args.src, args.dst, prefer_ema=args.ema)
    except (CheckpointMismatchError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'{args.src} is the released {model.name}; wrote {args.dst}')
    print(model.config)
    return 0


if __name__ == '__main__':
    sys.exit(main())
