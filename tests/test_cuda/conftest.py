"""The ``cuda`` marker: tests that need a CUDA GPU, skipped (with the reason
shown by ``pytest -rs``) where ``torch.cuda.is_available()`` is False.

Run them with ``pytest tests/test_cuda -m cuda -rs`` or ``bash tools/gpu_check.sh``.
"""
import pytest
import torch

SKIP_REASON = ('needs a CUDA GPU: torch.cuda.is_available() is False '
               f'(torch {torch.__version__}, CUDA build: {torch.version.cuda})')


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one)')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)


@pytest.fixture
def deterministic_cuda():
    """cuDNN's deterministic algorithms for the test (restored after): the
    comparisons of gradients need run-to-run identical arithmetic."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
