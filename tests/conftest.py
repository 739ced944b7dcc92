import os.path as osp

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHARED = osp.join(osp.dirname(REPO), 'shared')
REFERENCE = osp.join(SHARED, 'reference')


@pytest.fixture(scope='session')
def reference_dir():
    if not osp.isdir(REFERENCE):
        pytest.skip(f'reference data not found at {REFERENCE}')
    return REFERENCE
