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


# A stand-in interpreter: `-m venv DIR` makes DIR/bin/python (itself), pip does
# nothing but list FAKE_WHEEL as pip's cache (or fail like a disabled cache).
FAKE_PYTHON = '''#!/usr/bin/env bash
if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [[ $1 == -m && $2 == pip && $3 == cache ]]; then
  [[ -n ${FAKE_CACHE_ERROR:-} ]] && { echo "ERROR: cache is disabled" >&2; exit 1; }
  [[ -n ${FAKE_WHEEL:-} ]] && echo "$FAKE_WHEEL"
  exit 0
fi
if [[ $1 == -c && $2 == *version_info* ]]; then echo cp311; fi
exit 0
'''
WHEELS = '/home/u/.cache/pip/wheels/3f/a1/'


@pytest.mark.parametrize('wheel, error, cached', [
    (WHEELS + 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl', '', True),
    (WHEELS + 'mmcv-2.1.0-cp310-cp310-linux_x86_64.whl', '', False),  # another Python's
    ('', '', False),
    (WHEELS + 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl', '1', False),  # cache disabled
], ids=['cached', 'other-python', 'nothing-cached', 'cache-disabled'])
def test_mmcv_message_says_whether_pip_builds_it(tmp_path, wheel, error, cached):
    (tmp_path / 'tools').mkdir()
    shutil.copy(os.path.join(REPO_ROOT, 'tools', 'setup_venv.sh'), tmp_path / 'tools')
    python = tmp_path / 'fake-python'
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = dict(os.environ, KW_MM_SETUP_NEED_GB='0', PYTHON=str(python), FAKE_WHEEL=wheel,
               FAKE_CACHE_ERROR=error)
    result = subprocess.run(['bash', str(tmp_path / 'tools' / 'setup_venv.sh')],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    from_cache = "installing mmcv 2.1.0 from pip's cache" in result.stdout
    built = 'building mmcv 2.1.0 with its ops from source (10-15 min on 2 cores' in result.stdout
    assert (from_cache, built) == (cached, not cached), result.stdout
    assert '~15 min' not in result.stdout
    assert (tmp_path / '.venv' / '.kw_mm_ready').exists()
