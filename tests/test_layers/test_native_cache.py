"""kw_mm.native's library cache: a cached file that is damaged or is not the
library is rebuilt, or the kernels fall back to torch with a warning naming
the file; never a crash. Loading runs in a subprocess, so that a library that
crashes the process on loading (a truncated file: SIGBUS) cannot take pytest
with it."""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kw_mm import native

REPO = Path(__file__).resolve().parents[2]

# prints the status, then 'ok' once the C kernels gave the right product (or torch's did)
LOAD = '''
import warnings
warnings.simplefilter('always')
import torch
from kw_mm import native
print('STATUS', native.status())
a, b = torch.randn(6, 5), torch.randn(5, 300)
native.tuning.MIN_MACS = 0
assert torch.allclose(native.matmul(a, b), a @ b, atol=1e-5)
print('ok')
'''

needs_compiler = pytest.mark.skipif(not native.available(),
                                    reason=f'native kernels: {native.status()}')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """A library built once for this module's tests (copied into each test's cache)."""
    folder = tmp_path_factory.mktemp('built')
    return native.build(folder)


def cached_copy(built: Path, folder: Path) -> Path:
    """``built`` and its checksum file copied into the cache ``folder``; the library's path."""
    folder.mkdir()
    for path in (built, native.checksum_path(built)):
        shutil.copy2(path, folder / path.name)
    return folder / built.name


def load(cache: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, 'KW_MM_CACHE_DIR': str(cache),
               'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
               **env}
    environ.pop('KW_MM_NATIVE', None)
    return subprocess.run([sys.executable, '-c', LOAD], env=environ, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


@needs_compiler
def test_truncated_library_is_rebuilt(built, tmp_path):
    path = cached_copy(built, tmp_path / 'cache')
    with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)  # as after a full disk or a killed copy
    proc = load(path.parent)
    assert proc.returncode == 0, f'the process died ({proc.returncode}): {proc.stderr[-2000:]}'
    assert f'STATUS on ({path})' in proc.stdout and 'ok' in proc.stdout
    assert f'{path} was not used because it does not match its checksum' in proc.stderr
    assert proc.stderr.count('Warning: kw_mm:') == 1
    assert native.checksum_path(path).read_text().strip() == native.library._digest(path)


@needs_compiler
def test_another_library_under_the_cached_name_is_rebuilt_or_refused(built, tmp_path):
    other = Path(torch._C.__file__)  # a valid shared object that is not kw_mm's
    # its checksum stale: rebuilt
    path = cached_copy(built, tmp_path / 'stale')
    shutil.copyfile(other, path)
    proc = load(path.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'STATUS on ({path})' in proc.stdout and 'ok' in proc.stdout
    assert f'{path} was not used because it does not match its checksum' in proc.stderr
    assert proc.stderr.count('Warning: kw_mm:') == 1  # one warning
    # its checksum matching too: loaded, found not to be the library, torch's products
    path = cached_copy(built, tmp_path / 'matching')
    shutil.copyfile(other, path)
    native.checksum_path(path).write_text(native.library._digest(path) + '\n')
    proc = load(path.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'STATUS unavailable' in proc.stdout and 'ok' in proc.stdout
    assert str(path) in proc.stderr and 'lacks kw_gemm_available' in proc.stderr
    assert proc.stderr.count('Warning: kw_mm:') == 1


@needs_compiler
def test_library_without_its_checksum_file_is_rebuilt(built, tmp_path):
    path = cached_copy(built, tmp_path / 'cache')
    native.checksum_path(path).unlink()  # a copy killed before the checksum was written
    before = path.stat().st_ino
    with pytest.warns(RuntimeWarning, match=re.escape(f'{path} was not used because its checksum')):
        assert native.build(path.parent) == path
    assert path.stat().st_ino != before  # a new file
    assert native.checksum_path(path).read_text().strip() == native.library._digest(path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert native.build(path.parent) == path  # now trusted: no warning, not rebuilt
