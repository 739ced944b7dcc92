"""Export KW models (a backbone, or a whole mmpretrain classifier) to ONNX.

The exported graph takes a normalised image batch ``[B, C, *S]`` (the
config's ``data_preprocessor`` is not part of it) whose batch size ``B`` is
dynamic; a classifier returns its class scores (``mode='tensor'``: before
softmax), a backbone its feature maps (one output per ``out_indices``).

How dynamic batches export: the normal forward of a KW convolution chooses
its computation from the batch size in Python, which a trace freezes. While
exporting (:func:`export_mode`, and ``torch.onnx.is_in_onnx_export()``),
KW convolutions switch to the batch-agnostic formulation of
:mod:`kw_mm.layers.execution.export` (one im2col convolution with static
groups and one batched MatMul with the per-sample kernels), which computes
the same thing. :func:`export_onnx` goes further: while it exports, the KW
convolutions run :mod:`kw_mm.layers.execution.onnx_graph`
(:func:`onnx_forwards`), a graph that ONNX Runtime runs faster (mixtures
by one MatMul, 1×1 layers as batched MatMuls, the others as one ``Conv``
per sample inside a ``Scan``; measurements in docs/compile_and_export.md).
KWLinear and the attention (GAP, BatchNorm1d or LayerNorm in eval mode,
CAF) are batch-agnostic already.

Which exporter: ``torch.onnx.export(..., dynamo=True)`` (``torch.export``
based). With torch 2.13 the TorchScript-based exporter (``dynamo=False``,
deprecated) did not work on KW models: its trace kept the tracing batch
size as a constant in the Reshape of the kernel assembly (onnxruntime then
fails on any other batch size), and its Conv symbolic refuses the im2col
convolution ("kernel of unknown shape"). ``torch.export`` keeps the batch
size symbolic (``Dim('batch')``) through every reshape. The onnxscript
graph optimiser (``optimize=True``) is off by default: onnxruntime folds
constants itself when it loads the model, and the optimiser triples the
export time of KWMobileNetV2.

The ONNX model is checked before it is written: onnxruntime runs it on
random inputs at batch sizes other than the traced one and its outputs are
compared with PyTorch's; the file is only written (atomically) when they
agree.
"""
from __future__ import annotations

import math
import os.path as osp
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint.io import write_atomically
from .layers import set_temperature
from .layers.execution.export import export_mode
from .layers.execution.onnx_graph import onnx_forwards

#: the opset the exporter targets unless told otherwise
DEFAULT_OPSET = 18
#: max |onnxruntime − PyTorch| allowed, relative to max(1, max |PyTorch|)
DEFAULT_TOLERANCE = 1e-4
#: batch size the model is traced with; the check uses other sizes
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)

INSTALL_HINT = ('pip install "kw_mm[export]" (or pip install -r requirements/export.txt: onnx, '
                'onnxruntime, onnxscript)')

__all__ = [
    'DEFAULT_OPSET', 'DEFAULT_TOLERANCE', 'ExportDependencyError', 'ExportVerificationError',
    'ExportReport', 'ClassifierForExport', 'BackboneForExport', 'export_mode', 'onnx_forwards',
    'require_export_dependencies', 'build_exportable', 'export_onnx', 'verify_onnx',
    'export_and_verify'
]


class ExportDependencyError(ImportError):
    """onnx, onnxruntime or onnxscript is not installed."""


class ExportVerificationError(RuntimeError):
    """The exported model fails the onnxruntime check: its batch dimension is fixed,
    it fails to run, or its outputs differ from PyTorch's beyond the tolerance."""


def require_export_dependencies() -> Tuple[Any, Any]:
    """Import onnx and onnxruntime (and check for onnxscript, which the exporter needs).

    Returns:
        tuple: The ``onnx`` and ``onnxruntime`` modules.

    Raises:
        ExportDependencyError: Naming what is missing and how to install it.
    """
    modules, missing = {}, []
    for name in ('onnx', 'onnxruntime', 'onnxscript'):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportDependencyError(f'ONNX export needs {", ".join(missing)}, which '
                                    f'{"is" if len(missing) == 1 else "are"} not installed: '
                                    f'{INSTALL_HINT}')
    return modules['onnx'], modules['onnxruntime']


class ClassifierForExport(nn.Module):
    """An mmpretrain classifier as ``images -> class scores`` (``mode='tensor'``)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x, mode='tensor')


class BackboneForExport(nn.Module):
    """A backbone as ``images -> tuple of feature maps`` (a bare tensor becomes a 1-tuple)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out, )


def build_exportable(config: str, checkpoint: Optional[str] = None, backbone_only: bool = False,
                     cfg_options: Optional[Dict[str, Any]] = None,
                     temperature: Optional[float] = None) -> nn.Module:
    """Build the model of an mmpretrain or mmdet config, ready to export (eval mode).

    Args:
        config (str): Config file (``custom_imports`` kw_mm, or plain
            mmpretrain/mmdet models with KW backbones from kw_mm).
        checkpoint (str, optional): Weights to load (mmengine checkpoint or
            the output of tools/convert_official_kw.py); its keys must match
            the model exactly. Without one the weights are the random
            initialisation.
        backbone_only (bool): Export ``model.backbone`` (always needed for
            models that are not mmpretrain classifiers, e.g. detectors).
        cfg_options (dict, optional): Config overrides (``--cfg-options``).
        temperature (float, optional): Set τ of every KW attention before
            exporting (τ is baked into the graph). Defaults to the value in
            the checkpoint (or the config's initial τ without one).

    Returns:
        nn.Module: :class:`ClassifierForExport` or :class:`BackboneForExport`.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'config not found: {config}')
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    from .apis import build_from_config
    model = build_from_config(config, cfg_options=cfg_options)
    if checkpoint is not None:
        from mmengine.runner import load_checkpoint
        try:
            load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
        except RuntimeError as err:  # mmengine lists the missing / unexpected keys
            raise ValueError(f'checkpoint {checkpoint} does not fit the model of {config}: '
                             f'{err}') from err
    if backbone_only:
        if not isinstance(getattr(model, 'backbone', None), nn.Module):
            raise ValueError(f'--backbone-only: the model of {config} '
                             f'({type(model).__name__}) has no backbone')
        wrapped: nn.Module = BackboneForExport(model.backbone)
    else:
        from mmpretrain.models import ImageClassifier
        if not isinstance(model, ImageClassifier):
            raise ValueError(f'only mmpretrain ImageClassifier models export whole; the model of '
                             f'{config} is a {type(model).__name__}: export its backbone with '
                             f'--backbone-only')
        wrapped = ClassifierForExport(model)
    if temperature is not None:
        if set_temperature(wrapped, temperature) == 0:
            raise ValueError(f'--temperature {temperature}: the model has no KW layers')
    return wrapped.eval()


@dataclass
class ExportReport:
    """What :func:`export_and_verify` did and measured."""
    path: str
    opset: int
    output_names: List[str]
    export_seconds: float
    #: batch size -> max |onnxruntime − PyTorch| over all outputs
    max_abs_diff: Dict[int, float] = field(default_factory=dict)
    #: batch size -> max |PyTorch output| (the scale the tolerance is relative to)
    max_abs_reference: Dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        checks = ', '.join(f'batch {b}: max abs diff {d:.3g} (outputs up to '
                           f'{self.max_abs_reference[b]:.3g})'
                           for b, d in self.max_abs_diff.items())
        return (f'exported {self.path} (opset {self.opset}, dynamic batch, outputs '
                f'{", ".join(self.output_names)}) in {self.export_seconds:.1f} s; '
                f'onnxruntime vs PyTorch: {checks}')


def _check_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(input_shape)
    if not 2 <= len(shape) <= 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f'input shape must be 2 to 4 positive ints (C, *spatial, without the '
                         f'batch), got {shape!r}')
    return shape


def _output_names(model: nn.Module, example: torch.Tensor) -> List[str]:
    with torch.no_grad(), export_mode():
        out = model(example)
    if isinstance(out, torch.Tensor):
        return ['scores']
    return [f'feat{i}' for i in range(len(out))]


def export_onnx(model: nn.Module, input_shape: Sequence[int], opset: int = DEFAULT_OPSET,
                optimize: bool = False) -> Tuple[bytes, List[str]]:
    """Export ``model`` (eval mode) with a dynamic batch dimension.

    Args:
        model (nn.Module): Takes one tensor ``[B, *input_shape]``.
        input_shape (Sequence[int]): ``(C, *spatial)`` without the batch.
        opset (int): ONNX opset. Defaults to :data:`DEFAULT_OPSET`.
        optimize (bool): Run onnxscript's graph optimiser. Defaults to False.

    Returns:
        tuple: The serialised ONNX model and its output names.
    """
    require_export_dependencies()
    shape = _check_shape(input_shape)
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f'opset must be an int >= 18 (the torch.export-based exporter), '
                         f'got {opset!r}')
    if model.training:
        raise ValueError('export the model in eval mode (model.eval()): training-mode '
                         'BatchNorm/DropPath do not export')
    example = torch.randn(TRACE_BATCH, *shape)
    output_names = _output_names(model, example)
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad(), export_mode(), onnx_forwards(model), warnings.catch_warnings():
        # torch 2.13's exporter trips over its own pytree deprecation
        warnings.filterwarnings('ignore', message=r'.*isinstance\(treespec, LeafSpec\)')
        program = torch.onnx.export(
            model, (example, ), dynamo=True, input_names=['input'], output_names=output_names,
            dynamic_shapes=({0: batch}, ), opset_version=opset, optimize=optimize,
            verbose=False)
    return program.model_proto.SerializeToString(), output_names


def verify_onnx(onnx_model: bytes, model: nn.Module, input_shape: Sequence[int],
                batch_sizes: Sequence[int] = CHECK_BATCHES, tolerance: float = DEFAULT_TOLERANCE,
                seed: int = 0, progress: Optional[Callable[[str], None]] = None
                ) -> Tuple[Dict[int, float], Dict[int, float]]:
    """Run ``onnx_model`` with onnxruntime and ``model`` with PyTorch on the same inputs.

    Args:
        onnx_model (bytes): A serialised ONNX model with one input.
        model (nn.Module): The PyTorch model it was exported from.
        input_shape (Sequence[int]): ``(C, *spatial)``.
        batch_sizes (Sequence[int]): Batch sizes to run (random normal inputs).
        tolerance (float): Allowed max abs difference, relative to
            ``max(1, max |PyTorch output|)``.
        seed (int): Seed of the random inputs.
        progress (callable, optional): Called with a short description after
            each batch size is checked.

    Returns:
        tuple: ``{batch: max abs diff}`` and ``{batch: max |PyTorch output|}``.

    Raises:
        ExportVerificationError: When the model is not valid ONNX, its batch
            dimension is fixed, onnxruntime fails, or the outputs differ in
            number, shape or finiteness, or beyond the tolerance.
    """
    onnx, onnxruntime = require_export_dependencies()
    try:
        onnx.checker.check_model(onnx.load_model_from_string(onnx_model))
    except onnx.checker.ValidationError as err:
        raise ExportVerificationError(f'the exported model is not valid ONNX: {err}') from err
    shape = _check_shape(input_shape)
    session = onnxruntime.InferenceSession(onnx_model, providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    if not isinstance(batch_dim, str):
        raise ExportVerificationError(f'the exported batch dimension is fixed at {batch_dim}, '
                                      'not dynamic (a layer branches on the batch size?)')
    generator = torch.Generator().manual_seed(seed)
    diffs, scales = {}, {}
    for batch in batch_sizes:
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x)  # the normal (not the export) forward
        expected = (expected, ) if isinstance(expected, torch.Tensor) else tuple(expected)
        try:
            got = session.run(None, {input_name: x.numpy()})
        except Exception as err:  # onnxruntime raises its own (pybind) exception types
            raise ExportVerificationError(f'onnxruntime failed at batch {batch}: {err}') from err
        if len(got) != len(expected):
            raise ExportVerificationError(f'batch {batch}: onnxruntime gave {len(got)} outputs, '
                                          f'PyTorch {len(expected)}')
        diff = scale = 0.0
        for i, (ours, theirs) in enumerate(zip(got, expected)):
            if tuple(ours.shape) != tuple(theirs.shape):
                raise ExportVerificationError(
                    f'batch {batch}, output {i}: onnxruntime shape {tuple(ours.shape)}, '
                    f'PyTorch {tuple(theirs.shape)}')
            output_diff = float((torch.from_numpy(ours) - theirs).abs().max())
            if not math.isfinite(output_diff):
                raise ExportVerificationError(f'batch {batch}, output {i}: not finite (NaN or '
                                              'inf in onnxruntime or PyTorch output)')
            diff = max(diff, output_diff)
            scale = max(scale, float(theirs.abs().max()))
        diffs[batch], scales[batch] = diff, scale
        if diff > tolerance * max(1.0, scale):
            raise ExportVerificationError(
                f'batch {batch}: onnxruntime and PyTorch differ by up to {diff:.3g} (outputs up '
                f'to {scale:.3g}), above the tolerance {tolerance:g} × max(1, {scale:.3g})')
        if progress is not None:
            progress(f'batch {batch}: onnxruntime agrees with PyTorch (max abs diff {diff:.3g})')
    return diffs, scales


def export_and_verify(model: nn.Module, out: str, input_shape: Sequence[int],
                      opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                      batch_sizes: Sequence[int] = CHECK_BATCHES, optimize: bool = False,
                      progress: Optional[Callable[[str], None]] = None) -> ExportReport:
    """Export ``model``, check it with onnxruntime, then write it atomically to ``out``.

    Nothing is written when the export or the check fails.

    Args:
        model (nn.Module): In eval mode; takes one tensor ``[B, *input_shape]``.
        out (str): The ``.onnx`` file to write.
        input_shape (Sequence[int]): ``(C, *spatial)`` without the batch.
        opset (int): ONNX opset (>= 18). Defaults to :data:`DEFAULT_OPSET`.
        tolerance (float): See :func:`verify_onnx`. Defaults to
            :data:`DEFAULT_TOLERANCE`.
        batch_sizes (Sequence[int]): Batch sizes of the check; all differ
            from the traced batch size (2). Defaults to (1, 3).
        optimize (bool): Run onnxscript's graph optimiser. Defaults to False.
        progress (callable, optional): Called with a short description after
            each stage: the export, each checked batch size (see
            :func:`verify_onnx`) and the writing; ``2 + len(batch_sizes)`` calls.

    Returns:
        ExportReport: The file, opset, output names, export time and the
        differences measured.
    """
    if not str(out).endswith('.onnx'):
        raise ValueError(f'the output file must end in .onnx, got {out!r}')
    if not tolerance > 0:
        raise ValueError(f'tolerance must be > 0, got {tolerance!r}')
    if TRACE_BATCH in batch_sizes or not batch_sizes:
        raise ValueError(f'check batch sizes must be non-empty and differ from the traced '
                         f'batch {TRACE_BATCH}, got {tuple(batch_sizes)}')
    start = time.perf_counter()
    onnx_model, output_names = export_onnx(model, input_shape, opset, optimize)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(f'exported in {seconds:.1f} s ({len(onnx_model) / 2**20:.1f} MiB)')
    diffs, scales = verify_onnx(onnx_model, model, input_shape, batch_sizes, tolerance,
                                progress=progress)
    write_atomically(out, lambda f: f.write(onnx_model))
    if progress is not None:
        progress(f'written to {out}')
    return ExportReport(str(out), opset, output_names, seconds, diffs, scales)
