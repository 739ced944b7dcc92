"""Reading and writing checkpoint files: safe loading and atomic writes.

**Safe loading of mmengine checkpoints.** torch.load defaults to
``weights_only=True`` since torch 2.6, and mmengine 0.10.7 does not override
it; its checkpoints (resume, ``load_from``, ``tools/test.py``) also hold the
message hub's ``HistoryBuffer`` objects, which contain numpy arrays and refer
to the buffer's statistics functions (``HistoryBuffer.min`` etc., pickled as
``getattr(HistoryBuffer, 'min')``). Instead of switching the protection off,
kw_mm allow-lists exactly the classes such checkpoints contain, and maps the
pickled ``getattr`` to a function that only resolves those statistics
functions.

**Atomic writes.** :func:`write_atomically` writes to a temporary file in the
destination's folder, fsyncs it and renames it into place, so a crash (or a
full disk) mid-write never leaves a truncated file under the final name.
Temporary files carry the writer's process id; one left behind by a killed
process is removed by the next write to the same destination.
:class:`AtomicLocalBackend` is mmengine's local file backend with atomic
writes; ``tools/train.py`` selects it for checkpoints
(``backend='kw_atomic_local'``).

**Reading a checkpoint file you were handed** (:func:`read_checkpoint_file`)
turns every way a file can be unreadable (missing, empty, truncated, not a
PyTorch file, holding objects that safe loading refuses) into one
:class:`CheckpointFileError` that names the file and the problem.
"""
from __future__ import annotations

import errno
import os
import os.path as osp
import pickle
import re
import time
import zipfile
from typing import BinaryIO, Callable, Iterable, List, Union

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend

PathLike = Union[str, os.PathLike]


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read or written; the message names the
    file and the problem in one line."""


# --------------------------------------------------------------------------- safe loading


def mmengine_checkpoint_globals() -> List[object]:
    """The non-tensor classes that an mmengine training checkpoint holds."""
    from mmengine.logging.history_buffer import HistoryBuffer
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32,
                                                  np.bool_)]
    return [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def history_buffer_getattr(owner, name: str):
    """``getattr`` restricted to ``HistoryBuffer``'s registered statistics.

    Anything else raises, so a crafted checkpoint cannot reach other
    attributes through this entry.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is HistoryBuffer and isinstance(name, str) and (
            name in HistoryBuffer._statistics_methods or name in ('min', 'max', 'current',
                                                                  'mean')):
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f'kw_mm refuses getattr({owner!r}, {name!r}) while loading a checkpoint with '
        'weights_only=True: only HistoryBuffer statistics are allowed')


def allow_mmengine_checkpoints() -> None:
    """Register :func:`mmengine_checkpoint_globals` with ``torch.serialization``."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    add(mmengine_checkpoint_globals())
    add([(history_buffer_getattr, '__builtin__.getattr'),
         (history_buffer_getattr, 'builtins.getattr')])


allow_mmengine_checkpoints()

#: how every ``torch.save`` file starts: a zip archive (torch >= 1.6) or a
#: pickle of protocol 2 (the legacy format)
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'\x80\x02'


def read_checkpoint_file(path: PathLike, extra_safe_globals: Iterable[object] = (),
                         role: str = 'checkpoint') -> object:
    """Load a checkpoint file safely (``weights_only=True``) or explain why not.

    Args:
        path (str | PathLike): The file.
        extra_safe_globals (Iterable): Classes allowed besides mmengine's
            (for example ``argparse.Namespace`` for training checkpoints that
            store their command-line options).
        role (str): What the file is, for the messages ('checkpoint',
            'source checkpoint').

    Returns:
        The file's contents (usually a dict).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointFileError: ``path`` is a directory, unreadable, empty,
            truncated, not a PyTorch file, or holds objects that safe loading
            refuses.
    """
    path = os.fspath(path)
    if not osp.exists(path):
        raise FileNotFoundError(f'{role} not found: {path}')
    if osp.isdir(path):
        raise CheckpointFileError(f'{role} {path} is a directory, not a checkpoint file')
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointFileError(f'cannot read {role} {path}: {_reason(err)}') from None
    size = osp.getsize(path)
    if size == 0:
        raise CheckpointFileError(f'{role} {path} is empty (0 bytes), not a PyTorch checkpoint')
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointFileError(
                f'{role} {path} is truncated or corrupt: its zip archive is incomplete '
                f'({size} bytes); copy or download it again')
    elif not head.startswith(_LEGACY_MAGIC):
        raise CheckpointFileError(
            f'{role} {path} is not a PyTorch checkpoint: it starts with bytes {head!r}, '
            'not those of a file written by torch.save')
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        text = ' '.join(str(err).split())
        if 'Unsupported global' in text or 'refuses' in text:
            found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
            what = f'an object of type {found.group(1)}' if found else 'an object'
            raise CheckpointFileError(
                f'{role} {path} holds {what} that safe loading (weights_only=True) refuses; '
                'save just its state dict (torch.save(ckpt["model"], path), or '
                'ckpt["state_dict"]) and use that') from None
        raise CheckpointFileError(
            f'{role} {path} is truncated or corrupt: {_first_line(err)}') from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile,
            UnicodeDecodeError) as err:
        raise CheckpointFileError(
            f'{role} {path} is truncated or corrupt: {_first_line(err)}') from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reason(err: OSError) -> str:
    return err.strerror or _first_line(err)


# --------------------------------------------------------------------------- atomic writes


def _temp_pattern(filepath: str) -> 're.Pattern[str]':
    """Temporary names of ``filepath``: ``.<name>.<pid>.<random>.tmp``, and the
    ``.<name>.<random>.tmp`` of earlier kw_mm versions (no pid)."""
    return re.compile(r'^\.' + re.escape(osp.basename(filepath)) +
                      r'\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp$')


#: a temporary file without a writer's pid (earlier kw_mm versions) is stale
#: once it has not been written to for this long
STALE_TEMP_AGE_S = 3600.0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(filepath: PathLike) -> List[str]:
    """Remove temporary files that a killed writer of ``filepath`` left behind.

    A temporary file is stale when the process named in it no longer runs
    (or, without a pid, when it is older than :data:`STALE_TEMP_AGE_S`).
    Files of live writers are left alone. Returns the removed paths.
    """
    filepath = os.fspath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    pattern = _temp_pattern(filepath)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        path = osp.join(folder, name)
        try:
            stale = (not _pid_alive(int(match.group(1))) if match.group(1) else
                     time.time() - osp.getmtime(path) > STALE_TEMP_AGE_S)
            if stale:
                os.remove(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def write_atomically(filepath: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``filepath``, fsync it,
    then rename it into place; on any failure the temporary file is removed
    and ``filepath`` is left as it was. Stale temporary files of earlier,
    killed writes to ``filepath`` are removed first."""
    filepath = os.fspath(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    sweep_stale_temps(filepath)
    tmp = osp.join(folder, f'.{osp.basename(filepath)}.{os.getpid()}.'
                   f'{os.urandom(6).hex()}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def check_writable_destination(dst: PathLike, protect: Iterable[PathLike] = (),
                               role: str = 'output') -> str:
    """Refuse, before any work, an output path that cannot be written.

    Args:
        dst (str | PathLike): Where the file will be written.
        protect (Iterable): Paths that must not be overwritten (a conversion's
            source).
        role (str): What ``dst`` is, for the messages.

    Returns:
        str: ``dst`` as a string.

    Raises:
        CheckpointFileError: ``dst`` is a directory, one of ``protect``, lies
            under a file, or its folder is not writable.
    """
    dst = os.fspath(dst)
    for path in map(os.fspath, protect):
        if osp.realpath(dst) == osp.realpath(path) or (
                osp.exists(dst) and osp.exists(path) and osp.samefile(dst, path)):
            raise CheckpointFileError(
                f'{role} {dst} is the source file {path}; refusing to overwrite it: '
                'give a different output path')
    if osp.isdir(dst):
        raise CheckpointFileError(f'{role} {dst} is a directory; give a file name')
    folder = osp.dirname(osp.abspath(dst))
    existing = folder
    while not osp.exists(existing):
        existing = osp.dirname(existing)
    if not osp.isdir(existing):
        raise CheckpointFileError(
            f'cannot write {role} {dst}: {existing} is a file, not a directory')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointFileError(
            f'cannot write {role} {dst}: no write permission in {existing}')
    return dst


def write_checkpoint_file(dst: PathLike, obj: object, role: str = 'output') -> None:
    """``torch.save(obj)`` to ``dst`` atomically; any failure raises
    :class:`CheckpointFileError` naming ``dst`` and leaves no partial file."""
    dst = os.fspath(dst)
    try:
        write_atomically(dst, lambda f: torch.save(obj, f))
    except OSError as err:
        reason = _reason(err)
        if err.errno == errno.ENOSPC:
            reason = 'no space left on the device'
        raise CheckpointFileError(f'cannot write {role} {dst}: {reason}') from None


class AtomicLocalBackend(LocalBackend):
    """:class:`mmengine.fileio.LocalBackend` with atomic ``put`` / ``put_text``."""

    def put(self, obj: bytes, filepath: PathLike) -> None:
        write_atomically(filepath, lambda f: f.write(obj))

    def put_text(self, obj: str, filepath: PathLike, encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


register_backend('kw_atomic_local', AtomicLocalBackend, force=True)

__all__ = [
    'CheckpointFileError', 'mmengine_checkpoint_globals', 'history_buffer_getattr',
    'allow_mmengine_checkpoints', 'read_checkpoint_file', 'sweep_stale_temps',
    'write_atomically', 'check_writable_destination', 'write_checkpoint_file',
    'AtomicLocalBackend', 'STALE_TEMP_AGE_S'
]
