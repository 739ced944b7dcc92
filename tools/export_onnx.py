"""Export a KW classifier (or a KW backbone) to ONNX with a dynamic batch size.

    python tools/export_onnx.py CONFIG [--checkpoint CKPT] --out FILE.onnx
        [--shape 3 224 224] [--backbone-only] [--opset N] [--temperature T]
        [--tolerance 1e-4] [--optimize] [--cfg-options k=v ...]

Builds the model of an mmpretrain (or, with --backbone-only, mmdet) config,
exports it (input ``[B, *shape]``, normalised images; B dynamic), runs the
ONNX model with onnxruntime at batch sizes 1 and 3 (traced at 2) and
compares with PyTorch. FILE.onnx is written, atomically, only when the
outputs agree; otherwise the tool exits with status 1. A progress bar shows
the stages (build, export, each check, write). Needs the ``export``
extra: pip install "kw_mm[export]" (or -r requirements/export.txt).
"""
import argparse
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

# mmengine 0.10.7 imports pkg_resources, which setuptools deprecates loudly
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import DictAction  # noqa: E402

from kw_mm.export import (  # noqa: E402
    CHECK_BATCHES,
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    ExportDependencyError,
    ExportVerificationError,
    build_exportable,
    export_and_verify,
    require_export_dependencies,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmpretrain / mmdet config file')
    parser.add_argument('--checkpoint', help='weights to export (default: random initialisation)')
    parser.add_argument('--out', required=True, help='the ONNX file to write (.onnx)')
    parser.add_argument('--shape', type=int, nargs='+', default=[3, 224, 224],
                        metavar='N', help='input shape without the batch: C H W '
                        '(default: 3 224 224)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='export model.backbone (its feature maps) instead of the classifier')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset, >= 18 (default: {DEFAULT_OPSET})')
    parser.add_argument('--temperature', type=float,
                        help='set the KW temperature τ before exporting (default: the '
                        "checkpoint's)")
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='max |onnxruntime - PyTorch| allowed, relative to max(1, max '
                        f'|output|) (default: {DEFAULT_TOLERANCE:g})')
    parser.add_argument('--optimize', action='store_true',
                        help="run onnxscript's graph optimiser (slower export)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config settings')
    return parser.parse_args(argv)


class StageProgress:
    """An mmengine ProgressBar over the tool's stages (started by the first one
    done, so that argument errors come before any output), each stage's
    description on its line."""

    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.bar = None

    def __call__(self, description: str) -> None:
        from mmengine.utils import ProgressBar
        if self.bar is None:
            self.bar = ProgressBar(self.stages, file=sys.stdout)
        self.bar.update()
        sys.stdout.write(f'  {description}\n')
        sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    progress = StageProgress(3 + len(CHECK_BATCHES))  # build, export, checks, write
    try:
        require_export_dependencies()  # fail before building the model
        model = build_exportable(args.config, args.checkpoint, args.backbone_only,
                                 args.cfg_options, args.temperature)
        progress(f'built {type(getattr(model, "classifier", model)).__name__}')
        report = export_and_verify(model, args.out, args.shape, opset=args.opset,
                                   tolerance=args.tolerance, optimize=args.optimize,
                                   progress=progress)
    except ExportVerificationError as err:
        print(f'error: {err}; {args.out} was not written', file=sys.stderr)
        return 1
    except (ExportDependencyError, FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == '__main__':
    sys.exit(main())
