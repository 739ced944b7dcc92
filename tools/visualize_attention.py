"""Mean KW attention maps of a model, one heatmap per warehouse (paper Figure 3, A.5).

    python tools/visualize_attention.py CONFIG CHECKPOINT [--data demo|PATH]
        [--num-images N] [--batch-size B] [--out FILE.png] [--save-arrays FILE.npz]
        [--temperature T] [--dpi D] [--seed S] [--cfg-options KEY=VALUE ...]

CONFIG is an mmpretrain classification config (the whole classifier runs, so a
KW head such as ``KWLinearClsHead`` is included) or an mmdet config (only the
backbone runs: that is where the KW layers are). CHECKPOINT is a kw_mm / mmengine
checkpoint, loaded safely (``torch.load(weights_only=True)`` with kw_mm's
allow-list) and strictly, or ``none`` for the config's initialisation (seeded
with ``--seed``).

Images go through the config's own test pipeline (test_dataloader's, without
annotation loading) and the model's data preprocessor, i.e. exactly what
``tools/test.py`` feeds the model. ``--data demo`` draws the embedded synthetic
one-shape images (kw_mm/demo/shapes.py) into a temporary folder; ``--data PATH``
reads ``*.jpg`` / ``*.jpeg`` / ``*.png`` below PATH (recursively, sorted).
τ is the checkpoint's unless ``--temperature`` is given.
"""
import argparse
import importlib
import itertools
import os
import os.path as osp
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

from mmengine.config import Config, DictAction  # noqa: E402

from kw_mm.apis import load_config  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
#: images drawn for ``--data demo`` when ``--num-images`` is not given.
DEMO_IMAGES = 32
#: transforms of a test pipeline that need annotations, dropped for bare images.
ANNOTATION_TRANSFORMS = ('LoadAnnotations', 'LoadPanopticAnnotations', 'LoadProposals')
_LOGGER_IDS = itertools.count()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {text}')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Mean KW attention maps per warehouse (paper Figure 3)')
    parser.add_argument('config', help='mmpretrain or mmdet config file')
    parser.add_argument('checkpoint', help="checkpoint file, or 'none' for the config's "
                                           'initialisation')
    parser.add_argument('--data', default='demo',
                        help="'demo' (embedded synthetic shapes) or an image folder, searched "
                             "recursively for *.jpg/*.jpeg/*.png (write ./demo for a folder "
                             "called demo; default: demo)")
    parser.add_argument('--num-images', type=_positive_int, default=None,
                        help=f'images to average over (default: all; {DEMO_IMAGES} for demo)')
    parser.add_argument('--batch-size', type=_positive_int, default=16)
    parser.add_argument('--out', default=None,
                        help='PNG to write (default: work_dirs/attention_maps/<config>.png)')
    parser.add_argument('--save-arrays', default=None, metavar='FILE.npz',
                        help='also save the averaged attentions as .npz')
    parser.add_argument('--temperature', type=_temperature, default=None,
                        help="override τ (default: the checkpoint's)")
    parser.add_argument('--dpi', type=_positive_int, default=100)
    parser.add_argument('--seed', type=int, default=0,
                        help="seed of the initialisation when CHECKPOINT is 'none'")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE')
    return parser.parse_args(argv)


def build_model(cfg: Config):
    """Build ``cfg.model`` in the config's default scope (with its data preprocessor)."""
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, init_default_scope

    import kw_mm  # noqa: F401  (registers the KW modules; safe checkpoint loading)
    # init_weights reports to the latest logger: a new one that shows warnings only
    MMLogger.get_instance(f'kw_visualize_attention_{next(_LOGGER_IDS)}', log_level='WARNING')
    scope = cfg.get('default_scope')
    if scope:
        importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
        init_default_scope(scope)
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return MODELS.build(model_cfg)


def load_weights(model, checkpoint: str) -> None:
    """Load ``checkpoint`` strictly; ``'none'`` keeps the config's initialisation."""
    if checkpoint.lower() == 'none':
        model.init_weights()
        return
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (pass 'none' for the "
                                "config's initialisation)")
    from mmengine.runner import load_checkpoint
    # mmengine calls torch.load without weights_only, i.e. torch's safe
    # default; kw_mm.checkpoint allow-lists mmengine's own objects.
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                    revise_keys=[(r'^module\.', '')])


def image_paths(folder: str) -> List[str]:
    """``*.jpg`` / ``*.jpeg`` / ``*.png`` below ``folder``, recursively, sorted."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f"--data must be 'demo' or an image folder; folder not found: "
                                f'{folder}')
    paths = sorted(osp.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f'--data {folder} holds no image ({"/".join(IMAGE_EXTENSIONS)})')
    return paths


def demo_images(folder: str, num_images: int) -> List[str]:
    """Draw ``num_images`` synthetic one-shape images into ``folder``."""
    from kw_mm.demo.shapes import make_shapes_classification
    root = make_shapes_classification(osp.join(folder, 'shapes'), num_train=0,
                                      num_val=num_images, size=64)
    return image_paths(osp.join(root, 'val'))


def _transform_name(transform: dict) -> str:
    kind = transform.get('type', '')
    return kind if isinstance(kind, str) else getattr(kind, '__name__', str(kind))


class MissingPipelineError(ValueError):
    """The config says nothing about how to prepare images for its model."""


def inference_pipeline(cfg: Config) -> Callable[[dict], dict]:
    """The config's test pipeline without annotation loading."""
    from mmengine.dataset import Compose
    pipeline = None
    for loader in ('test_dataloader', 'val_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        while dataset is not None and pipeline is None:
            pipeline = dataset.get('pipeline')
            dataset = dataset.get('dataset')  # dataset wrappers
        if pipeline is not None:
            break
    if pipeline is None:
        pipeline = cfg.get('test_pipeline')
    if pipeline is None:
        raise MissingPipelineError(
            'the config has no test pipeline (test_dataloader.dataset.pipeline or '
            'test_pipeline) to prepare the images with; add one, or call '
            'kw_mm.analysis.collect_attention_maps on the model from Python')
    return Compose([t for t in pipeline if _transform_name(t) not in ANNOTATION_TRANSFORMS])


def analysed_part(model) -> Tuple[Any, Callable[[dict], Any]]:
    """The module whose KW layers are mapped and how to run it on a
    preprocessed batch: a detector's backbone, a classifier whole
    (``mode='tensor'``: backbone, neck and head), any other model as is."""
    detectors = sys.modules.get('mmdet.models.detectors')
    if detectors is not None and isinstance(model, detectors.BaseDetector):
        return model.backbone, lambda data: model.backbone(data['inputs'])
    classifiers = sys.modules.get('mmpretrain.models.classifiers')
    if classifiers is not None and isinstance(model, classifiers.BaseClassifier):
        return model, lambda data: model(data['inputs'], data.get('data_samples'), mode='tensor')
    return model, lambda data: model(data['inputs'])


def preprocessed_batches(paths: Sequence[str], pipeline: Callable[[dict], dict], batch_size: int,
            preprocess: Callable[[dict], dict]) -> Iterator[dict]:
    """Preprocessed batches, loaded one at a time."""
    from mmengine.dataset import pseudo_collate
    for start in range(0, len(paths), batch_size):
        items = [pipeline(dict(img_path=path, img_id=start + i, sample_idx=start + i))
                 for i, path in enumerate(paths[start:start + batch_size])]
        yield preprocess(pseudo_collate(items))


def with_progress(batches: Iterator[dict], num_images: int, batch_size: int) -> Iterator[dict]:
    """``batches`` as they are, with mmengine's progress bar over the images
    (advanced once each batch has been through the model)."""
    from mmengine.utils import ProgressBar
    bar = ProgressBar(num_images)
    for start, batch in zip(range(0, num_images, batch_size), batches):
        yield batch
        bar.update(min(batch_size, num_images - start))
    bar.file.write('\n')
    bar.file.flush()


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    if args.checkpoint.lower() != 'none' and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint} (pass 'none' for the "
                                "config's initialisation)")
    if args.data != 'demo' and not osp.isdir(args.data):
        raise FileNotFoundError(f"--data must be 'demo' or an image folder; folder not found: "
                                f'{args.data}')
    import torch

    import kw_mm
    from kw_mm.analysis import (
        collect_attention_maps,
        find_kw_layers,
        render_attention_maps,
        save_attention_arrays,
    )
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    target, forward = analysed_part(model)
    find_kw_layers(target)  # fail before loading weights and images
    load_weights(model, args.checkpoint)
    if args.temperature is not None:
        kw_mm.set_temperature(model, args.temperature)
    tau = kw_mm.get_temperature(target)
    model.eval()
    preprocess = getattr(model, 'data_preprocessor', None)
    if preprocess is None:  # a bare backbone config: stack the images as they are
        from mmengine.model import ImgDataPreprocessor
        preprocess = ImgDataPreprocessor()

    with tempfile.TemporaryDirectory(prefix='kw_attention_') as tmp:
        if args.data == 'demo':
            paths = demo_images(tmp, args.num_images or DEMO_IMAGES)
        else:
            paths = image_paths(args.data)[:args.num_images]
        data = preprocessed_batches(paths, inference_pipeline(cfg), args.batch_size,
                                    lambda batch: preprocess(batch, False))
        data = with_progress(data, len(paths), args.batch_size)
        maps = collect_attention_maps(target, data, forward)

    out = args.out or osp.join('work_dirs', 'attention_maps',
                               osp.splitext(osp.basename(args.config))[0] + '.png')
    weights = ('initialisation' if args.checkpoint.lower() == 'none'
               else osp.basename(args.checkpoint))
    title = (f'{osp.basename(args.config)} | {weights} | mean α over {len(paths)} images '
             f'({args.data}) | τ = {tau:g}')
    width, height = render_attention_maps(maps, out, title=title, dpi=args.dpi)
    print(f'wrote {out} ({width}x{height} px): {len(maps)} warehouse(s), {len(paths)} '
          f'images, tau={tau:g}')
    if args.save_arrays:
        save_attention_arrays(maps, args.save_arrays)
        print(f'wrote {args.save_arrays}')
    return out


if __name__ == '__main__':
    from kw_mm.analysis import NoKWLayersError
    try:
        main()
    except (FileNotFoundError, NoKWLayersError, MissingPipelineError) as err:
        sys.exit(f'error: {err}')
