"""The converter's bad inputs: each gives one line naming the file and the
problem (exit status 2 from tools/convert_official_kw.py, CheckpointFileError
from the API), leaves the source untouched and leaves no temporary file.

| case | SRC / DST | expected message |
|---|---|---|
| empty source | 0-byte SRC | checkpoint SRC ... is empty (0 bytes), not a PyTorch checkpoint |
| truncated source (zip) | first half of a torch.save file | ... is truncated or corrupt: its zip archive is incomplete |
| truncated source (legacy) | first half of a legacy-format file | ... is truncated or corrupt: ... |
| random bytes | 4 KiB of noise | ... is not a PyTorch checkpoint: it starts with bytes ... |
| unsafe object | a checkpoint holding a custom class | ... holds an object of type ...Unsafe that safe loading (weights_only=True) refuses |
| source is a folder | SRC a directory | ... is a directory, not a checkpoint file |
| output is a folder | DST a directory | output DST ... is a directory; give a file name |
| output under a file | DST = FILE/out.pth | cannot write output DST ...: ... is a file, not a directory |
| output is the source | DST == SRC (same path, or a hard link) | output DST ... is the source file ...; refusing to overwrite it |
| read-only folder | DST in a chmod 555 folder (skipped as root) | cannot write output DST ...: no write permission in ... |
| missing source (exit 1) | SRC absent | checkpoint SRC not found: ... |

Write failures after the checks (a full disk, a read-only file system:
what root meets instead of permissions) and killed conversions are tested
below the table.
"""
import errno
import hashlib
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from tool_scripts import load_script

from kw_mm.apis import build_from_config
from kw_mm.checkpoint import (
    REPO_ROOT,
    CheckpointFileError,
    convert_file,
    sweep_stale_temps,
    write_atomically,
)

TOOL = osp.join(REPO_ROOT, 'tools', 'convert_official_kw.py')


class Unsafe:
    """An object that torch's safe loading refuses."""


def load_tool():
    return load_script(TOOL)


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """The bytes of a released ResNet18 1/4x checkpoint in the authors' layout
    (random values): the converter's renaming inverted on the config's model."""
    model = build_from_config(
        osp.join(REPO_ROOT, 'configs', 'kw_resnet', 'kw1d4x-resnet18_8xb32_in1k.py'))
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith('.attention.temperature'):
            continue
        match = re.fullmatch(r'backbone\.warehouses\.(\d+)\.cells', key)
        if match:
            state[f'warehouse_manager.weights.{match[1]}'] = value
        elif key.startswith('backbone.'):
            state[key[len('backbone.'):]] = value
        else:
            state['fc.' + key[len('head.fc.'):]] = value
    path = tmp_path_factory.mktemp('released') / 'kw1d4x_resnet18.pth'
    torch.save(dict(model=state), path)
    legacy = path.with_name('legacy.pth')
    torch.save(dict(model=state), legacy, _use_new_zipfile_serialization=False)
    return dict(zip=path.read_bytes(), legacy=legacy.read_bytes(), state=state)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def noise():
    data = bytes(torch.randint(0, 256, (4096, ), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8).tolist())
    assert not data.startswith((b'PK', b'\x80'))
    return data


def unsafe_checkpoint(released):
    import io
    buffer = io.BytesIO()
    torch.save(dict(model=released['state'], extra=Unsafe()), buffer)
    return buffer.getvalue()


def hard_link(tmp, released):
    src = write(tmp / 'src.pth', released['zip'])
    os.link(src, tmp / 'link.pth')
    return src, tmp / 'link.pth'


#: (case, make(tmp, released) -> (SRC, DST), exit status, message)
CASES = [
    ('empty source', lambda t, r: (write(t / 'empty.pth', b''), t / 'out.pth'), 2,
     r'checkpoint SRC \S+empty\.pth is empty \(0 bytes\), not a PyTorch checkpoint'),
    ('truncated source (zip)',
     lambda t, r: (write(t / 'cut.pth', r['zip'][:len(r['zip']) // 2]), t / 'out.pth'), 2,
     r'checkpoint SRC \S+cut\.pth is truncated or corrupt: its zip archive is incomplete'),
    ('truncated source (legacy)',
     lambda t, r: (write(t / 'cut.pth', r['legacy'][:len(r['legacy']) // 2]), t / 'out.pth'),
     2, r'checkpoint SRC \S+cut\.pth is truncated or corrupt: '),
    ('random bytes', lambda t, r: (write(t / 'noise.pth', noise()), t / 'out.pth'), 2,
     r'checkpoint SRC \S+noise\.pth is not a PyTorch checkpoint: it starts with bytes'),
    ('unsafe object',
     lambda t, r: (write(t / 'unsafe.pth', unsafe_checkpoint(r)), t / 'out.pth'), 2,
     r'checkpoint SRC \S+unsafe\.pth holds an object of type \S*Unsafe that safe loading '
     r'\(weights_only=True\) refuses'),
    ('source is a folder', lambda t, r: ((t / 'folder.pth').mkdir() or t / 'folder.pth',
                                         t / 'out.pth'), 2,
     r'checkpoint SRC \S+folder\.pth is a directory, not a checkpoint file'),
    ('output is a folder',
     lambda t, r: (write(t / 'src.pth', r['zip']), (t / 'out').mkdir() or t / 'out'), 2,
     r'output DST \S+out is a directory; give a file name'),
    ('output under a file',
     lambda t, r: (write(t / 'src.pth', r['zip']), write(t / 'file', b'x') / 'out.pth'), 2,
     r'cannot write output DST \S+file/out\.pth: \S+file is a file, not a directory'),
    ('output is the source',
     lambda t, r: (write(t / 'src.pth', r['zip']), t / 'src.pth'), 2,
     r'output DST \S+src\.pth is the source file \S+src\.pth; refusing to overwrite it'),
    ('output is a hard link to the source', hard_link, 2,
     r'output DST \S+link\.pth is the source file \S+src\.pth; refusing to overwrite it'),
    ('read-only folder',
     lambda t, r: (write(t / 'src.pth', r['zip']), t / 'readonly' / 'out.pth'), 2,
     r'cannot write output DST \S+readonly/out\.pth: no write permission in \S+readonly'),
    ('missing source', lambda t, r: (t / 'absent.pth', t / 'out.pth'), 1,
     r'checkpoint SRC not found: \S+absent\.pth'),
]


def snapshot(folder):
    """Every file under ``folder`` (hidden ones included) → its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob('*') if p.is_file()}


@pytest.mark.parametrize('case,make,status,message', CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, make, status, message, released,
                                                      tmp_path, capsys):
    src, dst = make(tmp_path, released)
    if case == 'read-only folder':
        if os.geteuid() == 0:
            pytest.skip('running as root, which may write into a chmod 555 folder; the same '
                        'refusal for a file in the way is the "output under a file" case')
        (tmp_path / 'readonly').mkdir()
        os.chmod(tmp_path / 'readonly', 0o555)
    before = snapshot(tmp_path)
    try:
        assert load_tool().main([str(src), str(dst)]) == status
    finally:
        if case == 'read-only folder':
            os.chmod(tmp_path / 'readonly', 0o755)
    out, err = capsys.readouterr()
    assert out == ''
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert re.fullmatch('error: ' + message + r'.*\n', err), err
    assert snapshot(tmp_path) == before  # nothing written, renamed or left behind


def test_exit_status_and_single_line_from_the_command_line(tmp_path):
    src = write(tmp_path / 'empty.pth', b'')
    result = subprocess.run([sys.executable, TOOL, str(src), str(tmp_path / 'out.pth')],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f'error: checkpoint SRC {src} is empty (0 bytes), not a PyTorch ' \
                            'checkpoint\n'
    assert sorted(os.listdir(tmp_path)) == ['empty.pth']


@pytest.mark.parametrize('failure,message', [
    (OSError(errno.ENOSPC, 'No space left on device'), 'no space left on the device'),
    (OSError(errno.EROFS, 'Read-only file system'), 'Read-only file system'),
])
def test_failed_write_keeps_the_old_output_and_no_temp(failure, message, released, tmp_path,
                                                       monkeypatch):
    """A write that fails after the checks (a full disk; a read-only file
    system, which refuses root too) raises naming DST, keeps the old DST and
    removes its temporary file."""
    src = write(tmp_path / 'src.pth', released['zip'])
    dst = write(tmp_path / 'out.pth', b'previous conversion')

    def fail(fd):
        raise failure
    monkeypatch.setattr(os, 'fsync', fail)
    with pytest.raises(CheckpointFileError,
                       match=f'cannot write output DST {re.escape(str(dst))}: {message}$'):
        convert_file(str(src), str(dst))
    assert dst.read_bytes() == b'previous conversion'
    assert sorted(os.listdir(tmp_path)) == ['out.pth', 'src.pth']


def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def test_temp_files_of_killed_conversions_are_swept(released, tmp_path):
    """A conversion killed mid-write (SIGKILL runs no clean-up) leaves its
    hidden temporary file; the next conversion to that DST removes it, and
    that of one of an earlier kw_mm (no pid) once it is an hour old, but never
    the temporary file of a writer that is still running."""
    src = write(tmp_path / 'src.pth', released['zip'])
    dst = tmp_path / 'out.pth'
    killed = write(tmp_path / f'.out.pth.{dead_pid()}.0a1b2c3d4e5f.tmp', b'x' * 1000)
    old = write(tmp_path / '.out.pth.k3j_9xyz.tmp', b'x' * 1000)
    os.utime(old, (0, 0))
    recent = write(tmp_path / '.out.pth.q7w_2abc.tmp', b'x')
    running = write(tmp_path / f'.out.pth.{os.getppid()}.ffffffffffff.tmp', b'x')
    other = write(tmp_path / f'.other.pth.{dead_pid()}.0a1b2c3d4e5f.tmp', b'x')
    assert load_tool().main([str(src), str(dst)]) == 0
    assert not killed.exists() and not old.exists()
    assert recent.exists() and running.exists() and other.exists()  # not stale / not DST's
    assert torch.load(dst, weights_only=True)['meta']['released_model'] == 'kw1d4x_resnet18'
    assert sweep_stale_temps(tmp_path / 'other.pth') == [str(other)]


def test_interrupted_write_removes_its_temp(tmp_path):
    """SIGTERM (turned into SystemExit by the tool) or Ctrl-C mid-write: the
    temporary file goes, the old DST stays."""
    dst = write(tmp_path / 'out.pth', b'old')
    for interrupt in (SystemExit(143), KeyboardInterrupt()):
        def half_then_interrupted(f):
            f.write(b'partial')
            raise interrupt
        with pytest.raises(type(interrupt)):
            write_atomically(dst, half_then_interrupted)
        assert dst.read_bytes() == b'old'
        assert os.listdir(tmp_path) == ['out.pth']
