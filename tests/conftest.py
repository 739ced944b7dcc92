import os.path as osp

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: the released models' layouts and the golden outputs of the authors' code
#: (tests/data/README.md); shipped with the tests, so the fidelity tests always run
REFERENCE = osp.join(REPO, 'tests', 'data')


@pytest.fixture(scope='session')
def reference_dir():
    for sub in ('golden', 'released_state_dicts'):
        if not osp.isdir(osp.join(REFERENCE, sub)):
            raise FileNotFoundError(f'tests/data/{sub} is missing: the fidelity tests need the '
                                    f'reference data shipped in tests/data (incomplete checkout?)')
    return REFERENCE


def read_released_tsv(path):
    """A released model's ``.tsv``: (header with 'params', key → shape)."""
    shapes, header = {}, {}
    with open(path) as f:
        for line in f:
            line = line.rstrip('\n')
            if line.startswith('# params:'):
                header['params'] = int(line.split(':')[1])
            elif line and not line.startswith('#'):
                key, shape = line.split('\t')
                shapes[key] = () if shape == 'scalar' else tuple(int(s) for s in shape.split('x'))
    return header, shapes


@pytest.fixture(scope='session')
def released_tsv(reference_dir):
    """``released_tsv(name)`` reads ``released_state_dicts/<name>.tsv``."""
    return lambda name: read_released_tsv(
        osp.join(reference_dir, 'released_state_dicts', f'{name}.tsv'))


def assert_first_output_unchanged_by_a_step(model, x):
    """Train the second output for one SGD step; the first must not move
    (what frozen_stages promises for the stages before it)."""
    model.eval()
    before = model(x)[0].detach().clone()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x)[1].square().mean().backward()
    opt.step()
    model.eval()
    torch.testing.assert_close(model(x)[0], before)


@pytest.fixture
def frozen_output_check():
    return assert_first_output_unchanged_by_a_step


@pytest.fixture(params=['torch', 'native'])
def assembly(request, monkeypatch):
    """Run a test twice: assembly products on ``torch.matmul`` and on kw_mm's
    C kernels (``kw_mm.native``, at every size)."""
    from kw_mm import native
    if request.param == 'native':
        if not native.available():
            pytest.skip(f'native kernels: {native.status()}')
        monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    else:
        monkeypatch.setattr(native.tuning, 'MIN_MACS', float('inf'))
    return request.param


class ZooFiles:
    """Files that the model-zoo and README tests share, each made once on first use in one
    temporary folder: random-weight checkpoints of kw_mm's configs, saved the way mmengine
    saves them, and a small image."""

    #: file name → (scope, config name); the names the README's snippets use
    CHECKPOINTS = {
        'kw1x_resnet18_mm.pth': ('mmpretrain', 'kw1x-resnet18_8xb32_in1k'),
        'kw1x_resnet50_mm.pth': ('mmpretrain', 'kw1x-resnet50_32xb128-adv-300e_in1k'),
        'mask_rcnn_kw1x_mobilenetv2_mm.pth': (
            'mmdet', 'mask-rcnn_kw1x-mobilenet-v2_fpn_paper-ms-crop-1x_coco'),
    }
    IMAGE = 'demo.jpg'

    def __init__(self, root):
        self.root = root

    def path(self, name):
        """The file ``name`` (one of CHECKPOINTS or IMAGE), made if it is not there yet."""
        path = self.root / name
        if path.exists():
            return path
        if name == self.IMAGE:
            import numpy as np
            from PIL import Image
            # thin, so that mmdet's test scale (1333, 800) makes it 42 x 1333, not 800 x 800
            pixels = np.random.default_rng(0).integers(0, 256, (24, 768, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            return path
        scope, config = self.CHECKPOINTS[name]
        from kw_mm.apis import build_from_config
        from kw_mm.utils.config_paths import find_config
        torch.manual_seed(len(name))
        model = build_from_config(find_config(config))
        meta = {}
        if scope == 'mmdet':
            from mmdet.datasets import CocoDataset
            meta['dataset_meta'] = {'classes': CocoDataset.METAINFO['classes']}
        torch.save({'meta': meta, 'state_dict': model.state_dict()}, path)
        return path


@pytest.fixture(scope='session')
def zoo_files(tmp_path_factory):
    return ZooFiles(tmp_path_factory.mktemp('zoo_files'))


@pytest.fixture
def fresh_default_scope(monkeypatch):
    """No mmengine default scope, as in a new process (mmpretrain's inferencers build their
    pipelines in the current scope); the previous scopes are back afterwards."""
    from collections import OrderedDict

    from mmengine.registry import DefaultScope
    monkeypatch.setattr(DefaultScope, '_instance_dict', OrderedDict())
