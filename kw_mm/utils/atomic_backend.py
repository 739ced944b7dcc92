"""An mmengine file backend whose writes never leave a truncated file.

mmengine's checkpoint hook serialises a checkpoint to memory and hands the
bytes to a file backend; the local backend writes them straight to the final
name, so a crash (or a full disk) mid-write leaves a truncated ``epoch_N.pth``
that a later ``--resume`` picks up. ``AtomicLocalBackend`` writes to a
temporary file in the same folder, fsyncs it and renames it into place.
``tools/train.py`` selects it for checkpoints (``backend='kw_atomic_local'``).
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
from typing import BinaryIO, Callable, Union

from mmengine.fileio import LocalBackend, register_backend


def write_atomically(filepath: Union[str, os.PathLike], write: Callable[[BinaryIO], None]
                     ) -> None:
    """Call ``write(f)`` on a temporary file beside ``filepath``, fsync it,
    then rename it into place; on any failure the temporary file is removed
    and ``filepath`` is left as it was."""
    filepath = str(filepath)
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(filepath) + '.', suffix='.tmp',
                               dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            # mkstemp makes the file private (0600); give it the permissions
            # an ordinary open() would (0666 minus the umask)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicLocalBackend(LocalBackend):
    """:class:`mmengine.fileio.LocalBackend` with atomic ``put`` / ``put_text``."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        write_atomically(filepath, lambda f: f.write(obj))

    def put_text(self, obj: str, filepath: Union[str, os.PathLike],
                 encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


register_backend('kw_atomic_local', AtomicLocalBackend, force=True)
