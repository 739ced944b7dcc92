"""A checkpoint of another KW variant is refused on every loading path.

mmengine loads ``load_from``, resume and ``init_cfg`` checkpoints with
``strict=False`` and only logs mismatched tensors, which would leave the KW
convolutions at random values. The KW backbones check what is loaded into
them (``KWBaseBackbone._load_from_state_dict``), whatever the path:

| checkpoint | model | loading path | expected message |
|---|---|---|---|
| KW 1/4x | KW 1x | load_state_dict, load_checkpoint, load_from, resume, init_cfg | holds ... the released kw1d4x_resnet18 ..., but this KWResNet is ... the released kw1x_resnet18 |
| KW 2x | KW 1x | resume | ... kw2x_resnet18 ... kw1x_resnet18 |
| plain (kw_cfg=None) | KW 1x | init_cfg, load_from | holds a plain backbone ..., but this KWResNet is a KW backbone |
| KW 1x | plain | init_cfg, load_checkpoint | holds a KW backbone ..., but this KWResNet is a plain backbone |
| KW 1x, keys under 'backbone.' | KW 1x | init_cfg without prefix | ... carry the prefix 'backbone.' ... |
| converted released 1/4x | demo config at 1x | tools/test.py, tools/train.py --resume | error: checkpoint PATH: ... kw1d4x_resnet18 ... kw1x_resnet18 |

A checkpoint of the model's own variant loads exactly on every path (same
outputs as the model it was saved from).
"""
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

import kw_mm  # noqa: F401  (registers the KW modules)
from kw_mm.apis import build_from_config
from kw_mm.checkpoint import REPO_ROOT, CheckpointMismatchError, convert_file

VARIANTS = {'plain': None, 'kw1d4x': dict(budget=0.25), 'kw1x': dict(budget=1.0),
            'kw2x': dict(budget=2.0)}


def classifier_cfg(variant, init_cfg=None):
    backbone = dict(type='KWResNet', depth=18, kw_cfg=VARIANTS[variant], out_indices=(3, ))
    if init_cfg is not None:
        backbone['init_cfg'] = init_cfg
    return dict(type='ImageClassifier', backbone=backbone,
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead', num_classes=3, in_channels=512))


def build(cfg):
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(cfg)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """``saved(variant)``: (path of an mmengine-style checkpoint of a classifier
    of that variant, the classifier)."""
    folder = tmp_path_factory.mktemp('variants')
    cache = {}

    def get(variant):
        if variant not in cache:
            torch.manual_seed(len(cache))
            model = build(classifier_cfg(variant))
            model.init_weights()
            for name, buffer in model.named_buffers():  # non-default running stats
                if name.endswith('running_mean'):
                    buffer.normal_()
            path = folder / f'{variant}.pth'
            torch.save(dict(meta=dict(epoch=1, iter=3), state_dict=model.state_dict()), path)
            cache[variant] = (str(path), model.eval())
        return cache[variant]
    return get


def runner_for(cfg, work_dir, **kwargs):
    from mmengine.runner import Runner
    return Runner(model=cfg, work_dir=str(work_dir), default_scope='mmpretrain',
                  log_level='WARNING', **kwargs)


def load(path, variant, how, tmp_path):
    """Load checkpoint ``path`` into a fresh classifier of ``variant`` the way
    ``how`` names; returns the classifier."""
    if how == 'load_state_dict':  # torch's loader, non-strict
        model = build(classifier_cfg(variant))
        model.load_state_dict(torch.load(path, weights_only=True)['state_dict'], strict=False)
        return model
    if how == 'load_checkpoint':  # mmengine's, as mmpretrain's get_model(pretrained=...)
        from mmengine.runner import load_checkpoint
        model = build(classifier_cfg(variant))
        load_checkpoint(model, path, map_location='cpu', strict=False)
        return model
    if how in ('load_from', 'resume'):  # tools/test.py (load_from) and tools/train.py --resume
        runner = runner_for(classifier_cfg(variant), tmp_path / how, load_from=path,
                            resume=how == 'resume')
        if how == 'resume':
            runner.resume(path)  # what load_or_resume calls; needs no train loop to load
        else:
            runner.load_or_resume()
        return runner.model
    if how in ('init_cfg', 'init_cfg without prefix'):
        init = dict(type='Pretrained', checkpoint=path)
        if how == 'init_cfg':
            init['prefix'] = 'backbone.'
        model = build(classifier_cfg(variant, init_cfg=init))
        model.init_weights()
        return model
    raise ValueError(how)


FOUND_1D4X = (r'holds a KW backbone with 4 warehouse\(s\) \(\d+ cells of 32x32x1x1, .*\) '
              r'\(the released kw1d4x_resnet18')
IS_1X = (r'but this KWResNet is a KW backbone with 4 warehouse\(s\) '
         r'\(\d+ cells of 64x64x1x1, .*\) \(the released kw1x_resnet18')
REFUSALS = [
    # (checkpoint variant, model variant, loading path, expected message)
    *[('kw1d4x', 'kw1x', how, FOUND_1D4X + '.*' + IS_1X)
      for how in ('load_state_dict', 'load_checkpoint', 'load_from', 'resume', 'init_cfg')],
    ('kw1d4x', 'kw1x', 'load_checkpoint',
     r'warehouses\.0\.cells: found \[\d+, 32, 32, 1, 1\], expected \[\d+, 64, 64, 1, 1\]'),
    ('kw2x', 'kw1x', 'resume', r'the released kw2x_resnet18.*but this KWResNet .*kw1x_resnet18'),
    ('plain', 'kw1x', 'init_cfg',
     r"init_cfg checkpoint '.*plain\.pth' \(prefix 'backbone\.'\): .*holds a plain backbone "
     r'\(no KW tensors.*but this KWResNet is a KW backbone'),
    ('plain', 'kw1x', 'load_from', r'holds a plain backbone .*but this KWResNet is a KW backbone'),
    ('kw1x', 'plain', 'init_cfg', r'holds a KW backbone .*but this KWResNet is a plain backbone'),
    ('kw1x', 'plain', 'load_checkpoint',
     r'unexpected warehouses\.0\.cells \[\d+, 64, 64, 1, 1\]'),
    ('kw1x', 'kw1x', 'init_cfg without prefix',
     r"Its keys carry the prefix 'backbone\.'; load it with .*prefix='backbone\.'"),
]


@pytest.mark.parametrize('found,expected,how,message', REFUSALS,
                         ids=[f'{c[0]}-into-{c[1]}-by-{c[2]}' for c in REFUSALS])
def test_checkpoint_of_another_variant_is_refused(found, expected, how, message, saved,
                                                  tmp_path):
    path, _ = saved(found)
    with pytest.raises(CheckpointMismatchError, match=message):
        load(path, expected, how, tmp_path)


#: resume of a matching checkpoint goes on to the train loop; tools/train.py --resume
#: is tested with a KW model in tests/test_engine/test_hooks.py (resume and EMA)
MATCHES = [('kw1x', how) for how in ('load_state_dict', 'load_checkpoint', 'load_from',
                                     'init_cfg')]
MATCHES += [('plain', 'init_cfg'), ('kw1d4x', 'load_from')]


@pytest.mark.parametrize('variant,how', MATCHES, ids=[f'{v}-by-{h}' for v, h in MATCHES])
def test_checkpoint_of_the_same_variant_loads_exactly(variant, how, saved, tmp_path):
    path, source = saved(variant)
    model = load(path, variant, how, tmp_path).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if how == 'init_cfg':  # the backbone alone is initialised from the checkpoint
            assert torch.equal(model.backbone(x)[-1], source.backbone(x)[-1])
        else:
            assert torch.equal(model(x, mode='tensor'), source(x, mode='tensor'))


def authors_checkpoint(config):
    """A released ImageNet checkpoint in the authors' layout (random values):
    the inverse of the converter's renaming, applied to the config's model."""
    model = build_from_config(osp.join(REPO_ROOT, config))
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith('.attention.temperature'):
            continue  # the authors' τ is a plain attribute
        match = re.fullmatch(r'backbone\.warehouses\.(\d+)\.cells', key)
        if match:
            state[f'warehouse_manager.weights.{match[1]}'] = value
        elif key.startswith('backbone.'):
            state[key[len('backbone.'):]] = value
        elif key.startswith('head.fc.'):
            state['fc.' + key[len('head.fc.'):]] = value
    return dict(model=state)


def test_tools_refuse_a_converted_checkpoint_of_another_budget(tmp_path):
    """The reported case: the released ResNet18 1/4x, converted, passed to a
    1x config through tools/test.py (and tools/train.py --resume) exited 0
    with chance accuracy; now both stop with one error naming both variants."""
    from kw_mm.demo.shapes import make_shapes_classification
    src, ckpt = tmp_path / 'kw1d4x_authors.pth', tmp_path / 'kw1d4x_converted.pth'
    torch.save(authors_checkpoint('configs/kw_resnet/kw1d4x-resnet18_8xb32_in1k.py'), src)
    assert convert_file(str(src), str(ckpt)).name == 'kw1d4x_resnet18'
    root = make_shapes_classification(str(tmp_path / 'shapes'), num_train=3, num_val=3)
    options = ['--cfg-options', 'model.backbone.depth=18', 'model.head.in_channels=512',
               f'train_dataloader.dataset.data_root={root}',
               f'val_dataloader.dataset.data_root={root}',
               f'test_dataloader.dataset.data_root={root}', 'train_dataloader.batch_size=3',
               'val_dataloader.batch_size=3', 'test_dataloader.batch_size=3']
    config = osp.join(REPO_ROOT, 'configs', 'demo', 'kw1x-resnet50_shapes-cls.py')
    for tool, args in (('test.py', [config, str(ckpt)]),
                       ('train.py', [config, '--resume', str(ckpt)])):
        result = subprocess.run(
            [sys.executable, osp.join(REPO_ROOT, 'tools', tool), *args, '--work-dir',
             str(tmp_path / 'work'), *options], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 1, (tool, result.stderr[-3000:])
        error = result.stderr[result.stderr.index('error: '):]
        assert error.startswith(f'error: checkpoint {ckpt}: '), (tool, error)
        assert re.search(FOUND_1D4X + '.*' + IS_1X, error), (tool, error)
        assert 'Traceback' not in result.stderr, (tool, result.stderr[-3000:])
