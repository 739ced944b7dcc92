"""ODConv, CondConv, DY-Conv and KW* in the KW backbones: the paper's parameter
counts, training steps, copies, checkpoints, errors and tools/train.py."""
import copy
import os.path as osp
import subprocess
import sys

import pytest
import torch

from kw_mm.checkpoint import REPO_ROOT, CheckpointMismatchError
from kw_mm.layers.dynamic import CondConv2d, DYConv2d, ODConv2d
from kw_mm.models.backbones import KWMobileNetV2, KWResNet

# The paper's parameter counts of every config of these methods are checked where each
# config is built: tests/test_configs.py (PAPER_PARAMS).


SMALL = {  # width-reduced backbones of every method (stem / base 16 channels, MobileNetV2 x0.25);
    # 48x48 inputs leave 2x2 maps at stride 32 (BatchNorm trains at batch 1)
    'odconv-resnet18': lambda: KWResNet(18, dynamic_cfg=dict(type='ODConv'), stem_channels=16,
                                        base_channels=16),
    'condconv-resnet50-with-cp': lambda: KWResNet(50, dynamic_cfg=dict(type='CondConv'),
                                                  stem_channels=16, base_channels=8,
                                                  with_cp=True),
    'dyconv-resnet18': lambda: KWResNet(18, kw_cfg=None, dynamic_cfg=dict(type='DYConv'),
                                        stem_channels=16, base_channels=16),
    'odconv-caf-mobilenet': lambda: KWMobileNetV2(0.25, dynamic_cfg=dict(
        type='ODConv', attention_fn='caf')),
    'kwstar-mobilenet': lambda: KWMobileNetV2(0.25, kw_cfg=dict(budget=4, omni_attention=True)),
}


@pytest.mark.parametrize('name', sorted(SMALL))
def test_forward_backward_batch_1_and_2_copy_and_reload(name):
    torch.manual_seed(0)
    model = SMALL[name]()
    layers = [m for m in model.modules() if isinstance(m, (ODConv2d, CondConv2d, DYConv2d))]
    assert layers or name.startswith('kwstar')
    for batch in (1, 2):
        model.train()
        out = model(torch.randn(batch, 3, 48, 48))[-1]
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad()
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)[-1]
        ema = copy.deepcopy(model)  # what EMAHook does
        torch.testing.assert_close(ema(x)[-1], expected)
        fresh = SMALL[name]()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh.eval()(x)[-1], expected)


def test_odconv_resnet_layout_follows_odconv():
    with torch.device('meta'):
        model = KWResNet(50, dynamic_cfg=dict(type='ODConv'))
    dynamic = sorted(n for n, m in model.named_modules() if isinstance(m, ODConv2d))
    assert len(dynamic) == 16 * 3  # every bottleneck convolution
    assert isinstance(model.conv1, torch.nn.Conv2d)
    assert isinstance(model.layer1[0].downsample[0], torch.nn.Conv2d)
    assert model.dynamic_cfg == dict(type='ODConv') and model.kw_cfg is None
    assert not hasattr(model, 'warehouses')


def test_kw_checkpoint_is_refused_by_an_odconv_model_and_back():
    small = dict(stem_channels=16, base_channels=16)
    kw = KWResNet(18, kw_cfg=dict(budget=1), **small)
    od = KWResNet(18, dynamic_cfg=dict(type='ODConv'), **small)
    with pytest.raises(CheckpointMismatchError) as err:
        od.load_state_dict(kw.state_dict(), strict=False)
    message = str(err.value)
    assert 'it holds a KW backbone with 4 warehouse(s)' in message
    assert 'this KWResNet is an ODConv backbone (dynamic_cfg: 16 dynamic layer(s) of 4 kernels' \
        in message
    with pytest.raises(CheckpointMismatchError, match='it holds an ODConv backbone'):
        kw.load_state_dict(od.state_dict(), strict=False)
    plain = KWResNet(18, kw_cfg=None, **small)
    with pytest.raises(CheckpointMismatchError, match='it holds a plain backbone'):
        od.load_state_dict(plain.state_dict(), strict=False)


@pytest.mark.parametrize('make, message', [
    (lambda: KWResNet(18, kw_cfg=dict(budget=2), dynamic_cfg=dict(type='ODConv')),
     r"KWResNet: kw_cfg and dynamic_cfg are mutually exclusive .* got kw_cfg=\{'budget': 2\} "
     r"and dynamic_cfg=\{'type': 'ODConv'\}; set kw_cfg=None"),
    (lambda: KWMobileNetV2(dynamic_cfg=dict(type='ODConv'), kw_layout='compact'),
     "kw_layout='compact' is a KW layout; with dynamic_cfg it must be None"),
    (lambda: KWMobileNetV2(dynamic_cfg=dict(type='DYConv', temperature=0)),
     'dynamic_cfg.temperature must be a finite number >= 1'),
    (lambda: KWResNet(18, dynamic_cfg='ODConv'), 'dynamic_cfg must be a dict or None, got str'),
])
def test_bad_backbone_arguments_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        with torch.device('meta'):
            make()


METHODS = {  # method → (backbone, hooks) of a tiny tools/train.py run
    'odconv': (dict(type='KWResNet', depth=18, kw_cfg=None, dynamic_cfg=dict(type='ODConv')),
               [dict(type='DynamicConvTemperatureHook', epochs=1)]),
    'condconv': (dict(type='KWResNet', depth=18, kw_cfg=None,
                      dynamic_cfg=dict(type='CondConv', kernel_num=2)), []),
    'dyconv-caf': (dict(type='KWResNet', depth=18, kw_cfg=None,
                        dynamic_cfg=dict(type='DYConv', attention_fn='caf')),
                   [dict(type='DynamicConvTemperatureHook', epochs=1),
                    dict(type='KWTemperatureHook', epochs=1)]),
    'kwstar': (dict(type='KWResNet', depth=18, kw_cfg=dict(budget=2, omni_attention=True)),
               [dict(type='KWTemperatureHook', epochs=1)]),
}


def tiny_classification_config(root, backbone, hooks):
    """A self-contained mmpretrain config (short, so the runner's config dumps
    stay cheap): the demo shapes, one epoch of batch 2, validation."""
    head = dict(type='LinearClsHead', num_classes=3, in_channels=128, topk=(1, ),
                loss=dict(type='CrossEntropyLoss'))
    if backbone.get('dynamic_cfg', {}).get('type') == 'CondConv':
        head.update(type='CondConvLinearClsHead', kernel_num=2)
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    loader = dict(batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
                  dataset=dict(type='CustomDataset', data_root=root, data_prefix='train',
                               classes=('circle', 'square', 'triangle'), pipeline=pipeline))
    val_loader = dict(loader, dataset=dict(loader['dataset'], data_prefix='val'))
    return dict(
        default_scope='mmpretrain', custom_imports=dict(imports=['kw_mm']),
        model=dict(type='ImageClassifier', neck=dict(type='GlobalAveragePooling'), head=head,
                   backbone=dict(backbone, stem_channels=16, base_channels=16),
                   data_preprocessor=dict(num_classes=3, mean=[128] * 3, std=[64] * 3)),
        train_dataloader=loader, val_dataloader=val_loader,
        val_evaluator=dict(type='Accuracy', topk=(1, )),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=1, val_interval=1), val_cfg=dict(),
        custom_hooks=hooks, default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                                                interval=1)))


def test_tools_train_runs_one_epoch_of_each_method(tmp_path):
    """tools/train.py's main() once per method, in one fresh interpreter (the
    imports, most of a run's time, paid once)."""
    from kw_mm.demo.shapes import make_shapes_classification
    root = make_shapes_classification(str(tmp_path / 'shapes'), num_train=2, num_val=2, size=32)
    runs = []
    for name, (backbone, hooks) in METHODS.items():
        path = tmp_path / f'{name}.py'
        path.write_text(''.join(f'{key} = {value!r}\n' for key, value in
                                tiny_classification_config(root, backbone, hooks).items()))
        runs.append([str(path), '--work-dir', str(tmp_path / name)])
    code = ('import runpy, sys\n'
            f'main = runpy.run_path({osp.join(REPO_ROOT, "tools", "train.py")!r})["main"]\n'
            f'for argv in {runs!r}:\n'
            '    main(argv)\n'
            '    print("finished", argv[0], flush=True)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in METHODS:
        assert f'finished {tmp_path / name}.py' in result.stdout, name
        assert (tmp_path / name / 'epoch_1.pth').exists(), name
    assert result.stdout.count('accuracy/top1') >= len(METHODS)
