"""tools/gpu_check.sh stops with a clear message where CUDA is not usable
(the script itself runs the CUDA tests on a GPU machine)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from kw_mm.checkpoint import REPO_ROOT

SCRIPT = osp.join(REPO_ROOT, 'tools', 'gpu_check.sh')


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available: the script would run')
def test_fails_clearly_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(['bash', SCRIPT, str(tmp_path / 'logs')], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 1
    assert 'torch.cuda.is_available() is False' in result.stderr
    assert 'gpu_check: CUDA is not available; nothing was run.' in result.stderr
    assert 'nvidia-smi' in result.stdout  # its output, or that it is not installed
    assert not (tmp_path / 'logs').exists()  # nothing started


def test_script_is_strict_bash():
    with open(SCRIPT) as f:
        text = f.read()
    assert text.startswith('#!/usr/bin/env bash')
    assert 'set -euo pipefail' in text
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0
