"""tools/setup_venv.sh refuses to start an install that the disk cannot hold."""
import os
import shutil
import subprocess

import pytest

from kw_mm.checkpoint import REPO_ROOT


def run_setup(tmp_path, need_gb):
    # A copy of the script in an empty project folder: the checks run before
    # anything is created, so no environment is built here.
    (tmp_path / 'tools').mkdir()
    shutil.copy(os.path.join(REPO_ROOT, 'tools', 'setup_venv.sh'), tmp_path / 'tools')
    # PYTHON names no interpreter, so a check that let the script through
    # fails at once instead of starting a download.
    env = dict(os.environ, KW_MM_SETUP_NEED_GB=need_gb, TMPDIR=str(tmp_path),
               PYTHON=str(tmp_path / 'no-python'))
    return subprocess.run(['bash', str(tmp_path / 'tools' / 'setup_venv.sh')],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(shutil.which('df') is None, reason='needs df')
def test_too_little_disk_space_stops_before_creating_the_venv(tmp_path):
    result = run_setup(tmp_path, '1000000')  # a petabyte
    assert result.returncode == 2, result.stderr
    assert 'not enough disk space' in result.stderr
    assert 'about 1000000 GB needed' in result.stderr
    assert not (tmp_path / '.venv').exists()


def test_bad_space_setting_is_named(tmp_path):
    result = run_setup(tmp_path, '9GB')
    assert result.returncode == 2
    assert "KW_MM_SETUP_NEED_GB must be a whole number of GB, got '9GB'" in result.stderr
    assert not (tmp_path / '.venv').exists()
