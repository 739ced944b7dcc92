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
