"""tools/export_onnx.py and kw_mm.export: KW models export to ONNX with a dynamic
batch size and onnxruntime agrees with PyTorch at batch sizes other than the traced one."""
import os.path as osp
import sys

import pytest
import torch
from torch import nn

pytest.importorskip('onnx')
pytest.importorskip('onnxscript')
onnxruntime = pytest.importorskip('onnxruntime')

from tool_scripts import load_script  # noqa: E402

from kw_mm import KWConv1d, KWConv3d, KWLinear, set_temperature  # noqa: E402
from kw_mm.checkpoint import REPO_ROOT  # noqa: E402
from kw_mm.export import (  # noqa: E402
    BackboneForExport,
    ExportDependencyError,
    ExportVerificationError,
    build_exportable,
    export_and_verify,
    require_export_dependencies,
)
from kw_mm.models.backbones import KWConvNeXt, KWMobileNetV2, KWResNet  # noqa: E402

TOOL = osp.join(REPO_ROOT, 'tools', 'export_onnx.py')
CLS_CONFIG = osp.join(REPO_ROOT, 'configs', 'kw_resnet', 'kw1x-resnet18_8xb32_in1k.py')
DET_CONFIG = osp.join(REPO_ROOT, 'configs', 'mask_rcnn_kw_r50.py')
# one stage of 16 channels and 5 classes: the real classifier path, exported in seconds
TINY_RESNET = {'model.backbone.num_stages': 1, 'model.backbone.out_indices': [0],
               'model.backbone.stem_channels': 16, 'model.backbone.base_channels': 16,
               'model.head.in_channels': 16, 'model.head.num_classes': 5}
TINY_RESNET_ARGS = ['model.backbone.num_stages=1', 'model.backbone.out_indices=[0]',
                    'model.backbone.stem_channels=16', 'model.backbone.base_channels=16',
                    'model.head.in_channels=16', 'model.head.num_classes=5']


def load_tool():
    return load_script(TOOL)


def calibrate_batch_norm(model, shape, tau=0.5):
    """Random-weight models collapse to ~0 in eval mode (running var 1 everywhere);
    set BatchNorm statistics from one random batch so outputs are O(1), and τ < 1
    so the kernels depend on the input."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    set_temperature(model, tau)
    return model.eval()


def run_onnx(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session, [torch.from_numpy(o) for o in session.run(None, {'input': x.numpy()})]


def test_tool_exports_a_checkpointed_classifier_with_a_dynamic_batch(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_exportable(CLS_CONFIG, cfg_options=TINY_RESNET)
    calibrate_batch_norm(model, (3, 32, 32))
    checkpoint = tmp_path / 'tiny.pth'
    torch.save({'state_dict': model.classifier.state_dict()}, checkpoint)
    out = tmp_path / 'tiny.onnx'
    assert load_tool().main([CLS_CONFIG, '--checkpoint', str(checkpoint), '--out', str(out),
                             '--shape', '3', '32', '32', '--cfg-options', *TINY_RESNET_ARGS]) == 0
    printed = capsys.readouterr().out
    assert 'batch 1: max abs diff' in printed and 'batch 3' in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temp left
    # the written file is this checkpoint's classifier, at batch sizes the tool did not check
    for batch in (4, 1):
        x = torch.randn(batch, 3, 32, 32)
        session, (scores, ) = run_onnx(out, x)
        with torch.no_grad():
            expected = model(x)
        assert scores.shape == (batch, 5)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension


class MobileNetV2Prefix(nn.Module):
    """The stem and first two (or ``blocks - 1``) inverted residuals of a KWMobileNetV2
    (depth-wise KW convolutions at stride 1 and 2, point-wise KW), with its warehouses."""

    def __init__(self, backbone, blocks=3):
        super().__init__()
        self.warehouses = backbone.warehouses
        self.features = backbone.features[:blocks]

    def forward(self, x):
        return self.features(x)


def tiny_mobilenet_v2():
    return MobileNetV2Prefix(KWMobileNetV2(0.5, kw_cfg=dict(budget=1)))


def tiny_convnext():  # LayerNorm attention, 7×7 depth-wise and point-wise KW convolutions
    return BackboneForExport(KWConvNeXt(arch=dict(depths=[1], channels=[16]),
                                        kw_cfg=dict(budget=1)))


@pytest.mark.parametrize('build', [tiny_mobilenet_v2, tiny_convnext])
def test_backbone_exports_with_a_dynamic_batch(build, tmp_path):
    torch.manual_seed(0)
    model = calibrate_batch_norm(build(), (3, 32, 32))
    out = tmp_path / 'backbone.onnx'
    report = export_and_verify(model, str(out), (3, 32, 32))
    assert out.is_file() and sorted(report.max_abs_diff) == [1, 3]
    for batch in (1, 3):
        assert report.max_abs_reference[batch] > 0.1
        assert report.max_abs_diff[batch] <= 1e-4 * report.max_abs_reference[batch]


class LayerZoo(nn.Module):
    """KWConv3d (BatchNorm attention), KWConv1d and KWLinear (LayerNorm attention)."""

    def __init__(self):
        super().__init__()
        self.conv3d = KWConv3d(4, 8, 3, stride=(1, 2, 2), padding=1, budget=1)
        self.conv1d = KWConv1d(8, 8, 3, padding=2, dilation=2, groups=2, norm='LN', budget=1)
        self.linear = KWLinear(8, 6, norm='LN', budget=1)

    def forward(self, x):
        x = self.conv1d(self.conv3d(x).flatten(2))
        return self.linear(x.transpose(1, 2))  # [B, L, 8] tokens -> [B, L, 6]


def test_1d_3d_and_linear_layers_export_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = LayerZoo().eval()
    set_temperature(model, 0.5)
    report = export_and_verify(model, str(tmp_path / 'layers.onnx'), (4, 3, 6, 6),
                               tolerance=1e-5)
    assert max(report.max_abs_diff.values()) <= 1e-5
    assert min(report.max_abs_reference.values()) > 0.1


class ExportsSomethingElse(nn.Module):
    def __init__(self, change):
        super().__init__()
        self.change = change

    def forward(self, x):
        return self.change(x) if torch.onnx.is_in_onnx_export() else x


@pytest.mark.parametrize('change,message', [(lambda x: x + 1, 'differ by up to 1 '),
                                            (lambda x: x / 0, 'not finite')])
def test_a_mismatch_fails_and_writes_nothing(change, message, tmp_path):
    out = tmp_path / 'wrong.onnx'
    with pytest.raises(ExportVerificationError, match=message):
        export_and_verify(ExportsSomethingElse(change).eval(), str(out), (2, 4))
    assert list(tmp_path.iterdir()) == []


class BranchesOnTheBatchSize(nn.Module):  # what KW convolutions do outside export_mode
    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x


def test_a_fixed_batch_dimension_is_refused(tmp_path):
    with pytest.raises(ExportVerificationError, match='batch dimension is fixed at 2'):
        export_and_verify(BranchesOnTheBatchSize().eval(), str(tmp_path / 'fixed.onnx'), (2, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('args,message', [
    (['missing.py', '--out', 'x.onnx'], 'config not found: missing.py'),
    ([CLS_CONFIG, '--checkpoint', 'missing.pth', '--out', 'x.onnx'],
     'checkpoint not found: missing.pth'),
    ([CLS_CONFIG, '--out', 'x.pt'], 'must end in .onnx'),
    ([CLS_CONFIG, '--out', 'x.onnx', '--shape', '3', '0'], 'input shape must be'),
    ([CLS_CONFIG, '--out', 'x.onnx', '--opset', '11'], 'opset must be an int >= 18'),
    ([CLS_CONFIG, '--out', 'x.onnx', '--temperature', '2'], 'temperature must be in [0, 1]'),
    ([DET_CONFIG, '--out', 'x.onnx'], 'export its backbone with --backbone-only'),
])
def test_tool_refuses_bad_input(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_tool().main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(1)}}, checkpoint)
    out = tmp_path / 'x.onnx'
    assert load_tool().main([CLS_CONFIG, '--checkpoint', str(checkpoint), '--out', str(out),
                             '--cfg-options', *TINY_RESNET_ARGS]) == 1
    err = capsys.readouterr().err
    assert 'does not fit this KWResNet' in err and 'conv1.weight' in err
    assert not out.exists()


def test_missing_onnxruntime_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails
    with pytest.raises(ExportDependencyError, match=r'onnxruntime.*kw_mm\[export\]'):
        require_export_dependencies()
    assert load_tool().main([CLS_CONFIG, '--out', str(tmp_path / 'x.onnx')]) == 1
    assert 'requirements/export.txt' in capsys.readouterr().err


def graph_summary(path):
    """Op types of the main graph, of Scan bodies (with the local functions they
    call) and the largest Transpose rank."""
    import onnx
    model = onnx.load(str(path))
    functions = {f.name: f for f in model.functions}
    top = [n.op_type for n in model.graph.node]
    body, ranks = [], []

    def walk(nodes):
        for node in nodes:
            if node.op_type == 'Transpose':
                ranks.append(len(next(a.ints for a in node.attribute if a.name == 'perm')))
            if node.name and node.op_type in functions:
                walk(functions[node.op_type].node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    body.extend(n.op_type for n in attr.g.node)
                    walk(attr.g.node)
    walk(model.graph.node)
    for f in functions.values():
        body.extend(n.op_type for n in f.node if n.op_type == 'Conv')
    return top, body, max(ranks, default=0)


class ResNet18AndMobileNetV2(nn.Module):
    """Two KW backbones on one input, exported as one graph (one export for both):
    ResNet18's first two stages with 16 base channels (8 3×3 KW convolutions at stride 1
    and 2, with one and two output cell groups, and the KW 1×1 downsample, a MatMul) and
    MobileNetV2 ×0.5's stem and two blocks (the KW stem, depth-wise KW convolutions at
    stride 1 and 2, point-wise ones with one, two and six input cell groups)."""

    def __init__(self):
        super().__init__()
        self.resnet = KWResNet(18, num_stages=2, out_indices=(1, ), stem_channels=16,
                               base_channels=16, kw_cfg=dict(budget=1))
        self.mobilenet = MobileNetV2Prefix(KWMobileNetV2(0.5, kw_cfg=dict(budget=1)))

    def forward(self, x):
        return self.resnet(x)[0], self.mobilenet(x)


def test_the_onnx_graph_has_a_dynamic_batch_and_per_sample_convs(tmp_path):
    from kw_mm.layers.kw_conv import _KWConvNd
    torch.manual_seed(0)
    model = calibrate_batch_norm(ResNet18AndMobileNetV2(), (3, 32, 32), tau=0.0)
    kw_convs = [m for m in model.modules() if isinstance(m, _KWConvNd)]
    assert len(kw_convs) == 9 + 6
    assert sum(m.groups > 1 for m in kw_convs) == 2  # the depth-wise ones
    out = tmp_path / 'model.onnx'
    report = export_and_verify(model, str(out), (3, 32, 32))
    for batch in (1, 3):  # checked by export_and_verify, its report says by how much
        assert report.max_abs_reference[batch] > 0.1
        assert report.max_abs_diff[batch] <= 1e-4 * report.max_abs_reference[batch]
    top, body, transpose_rank = graph_summary(out)
    # one Scan of per-sample Convs per KW layer that is not 1×1 (8 + 3); no im2col
    # convolution (the one Conv left is ResNet's plain stem), no 6-d reorder
    assert top.count('Scan') == 11 and 'Conv' in body
    assert top.count('Conv') == 1
    assert transpose_rank <= 5
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    assert isinstance(session.get_inputs()[0].shape[0], str)


def test_tool_shows_its_stages_in_a_progress_bar(capsys):
    progress = load_tool().StageProgress(3)
    assert capsys.readouterr().out == ''  # nothing before the first stage is done
    for stage in ('built', 'exported', 'written'):
        progress(stage)
    lines = [line.split('\r')[-1] for line in capsys.readouterr().out.split('\n')[:-1]]
    assert [line.split('] ')[1].split(',')[0] for line in lines] == ['1/3', '2/3', '3/3']
    assert [line.split('  ')[-1] for line in lines] == ['built', 'exported', 'written']
