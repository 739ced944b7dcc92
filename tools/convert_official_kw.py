"""Convert a released KernelWarehouse checkpoint to kw_mm (mmpretrain or mmdet).

    python tools/convert_official_kw.py SRC DST [--ema]

SRC is either an ImageNet checkpoint (``model`` / ``model_ema`` / bare state
dict) or an mmdet 2.x Mask R-CNN checkpoint (``state_dict`` with ``backbone.``,
``neck.`` and ``rpn_head.`` keys); which one is detected automatically. Finds
which released model SRC holds from its tensor shapes, writes an mmpretrain
or mmdet 3.x checkpoint to DST (atomically), and prints as its last line the
config, relative to the repository root, that builds that model:

    python tools/test.py $(python tools/convert_official_kw.py SRC DST | tail -1) DST

Exit status: 0 on success; 1 when SRC is missing or is not a released model
(the message lists the tensors that differ from the closest one); 2 when SRC
cannot be read as a checkpoint or DST cannot be written (one line naming the
file and the problem). SRC is never modified, and DST is either the complete
new file or left as it was.
"""
import argparse
import os.path as osp
import signal
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from kw_mm.checkpoint import CheckpointFileError, CheckpointMismatchError, convert_file  # noqa: E402


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the atomic write, which removes its temporary file
    sys.exit(128 + signum)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help="the authors' checkpoint (.pth)")
    parser.add_argument('dst', help='where to write the mmpretrain / mmdet checkpoint')
    parser.add_argument('--ema', action='store_true',
                        help="ImageNet checkpoints: take the 'model_ema' weights when the file "
                        'has both')
    args = parser.parse_args(argv)
    try:
        model = convert_file(args.src, args.dst, prefer_ema=args.ema)
    except CheckpointFileError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except (CheckpointMismatchError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    kind = 'Mask R-CNN (mmdet)' if model.task == 'detection' else 'ImageNet (mmpretrain)'
    print(f'{args.src} is the released {kind} {model.name}; wrote {args.dst}')
    print(model.config)
    return 0


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
