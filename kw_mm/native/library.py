"""Building, caching and loading the kernel library, and whether it can be used.

``kw_kernels.c`` is compiled with the system C compiler (``$CC``, else ``cc``)
into a cache folder (``$KW_MM_CACHE_DIR``, else ``~/.cache/kw_mm``) the first
time a KW layer runs on CPU, keyed by the sources, the compiler command and
the CPU's feature flags. The library appears atomically and a checksum file
beside it is written after it, so concurrent processes are safe and a cached
file that was truncated or replaced is rebuilt (with a warning naming it)
instead of being loaded. Any failure to build or load warns once and leaves
kw_mm on torch's products.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import tuning
from .bindings import bind

#: the C sources compiled (together, into one library)
SOURCES = (Path(__file__).with_name('kw_kernels.c'),)
FLAGS = ('-O3', '-march=native', '-fopenmp', '-shared', '-fPIC')

_lock = threading.Lock()
_loaded: Optional[Tuple[Optional[ctypes.CDLL], str]] = None


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    env = os.environ.get('KW_MM_CACHE_DIR')
    if env:
        return Path(env)
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'kw_mm'


def _cpu_flags() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksum_path(library: Path) -> Path:
    """The checksum file written beside ``library`` once it is complete."""
    return library.with_name(library.name + '.sha256')


def _problem(target: Path) -> Optional[str]:
    """Why the cached ``target`` cannot be trusted, or None if it can."""
    marker = checksum_path(target)
    try:
        expected = marker.read_text().strip()
    except OSError:
        return f'its checksum file {marker.name} is missing'
    try:
        if _digest(target) != expected:
            return f'it does not match its checksum in {marker.name} (truncated or replaced?)'
    except OSError as err:
        return f'it cannot be read: {err}'
    return None


def _write_atomically(folder: Path, path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}-', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, mode)  # mkstemp made it private; the cache may be shared
        os.replace(tmp, path)  # atomic: other processes see no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(folder: Optional[Path] = None) -> Path:
    """Compile the kernels (unless a verified copy is cached) and return the library's path.

    A cached library is used only if it matches the checksum file written
    after it was built; otherwise it is rebuilt, with a warning naming it.

    Raises:
        RuntimeError: the compiler is missing or failed (its output included).
    """
    folder = Path(folder) if folder is not None else cache_dir()
    cc = os.environ.get('CC', 'cc')
    command = (*shlex.split(cc), *FLAGS)
    key = hashlib.sha256(b''.join(source.read_bytes() for source in SOURCES)
                         + ' '.join(command).encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = folder / f'kw_kernels-{key}.so'
    problem = _problem(target) if target.exists() else None
    if target.exists() and problem is None:
        return target
    try:
        _compile(cc, command, folder, target)
    except RuntimeError as err:
        if problem is None:
            raise
        raise RuntimeError(f'{err}\n(the cached {target} was not used because {problem})'
                           ) from err
    if problem is not None:
        warnings.warn(f'kw_mm: the cached native kernel library {target} was not used because '
                      f'{problem}; it has been rebuilt', RuntimeWarning, stacklevel=2)
    return target


def _compile(cc: str, command: Tuple[str, ...], folder: Path, target: Path) -> None:
    """Compile :data:`SOURCES` into ``target``, then write its checksum file."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.kw_kernels-', suffix='.so', dir=folder)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([*command, *map(str, SOURCES), '-o', tmp],
                                  capture_output=True, text=True, errors='replace', timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f'could not run the C compiler {cc!r} (set CC): {err}') from err
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(command)} failed with exit status {proc.returncode}:\n'
                               + (proc.stderr or proc.stdout)[-2000:])
        digest = _digest(Path(tmp))
        os.chmod(tmp, 0o755)  # mkstemp made it private; the cache may be shared
        os.replace(tmp, target)  # atomic: other processes see no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # written last: a library without it (a killed copy) is rebuilt, never loaded
    _write_atomically(folder, checksum_path(target), (digest + '\n').encode(), 0o644)


def _open(path: Path) -> ctypes.CDLL:
    """Load the library at ``path`` and declare its signatures (raises if it is not ours)."""
    return bind(ctypes.CDLL(str(path)))


def _state() -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library or None, why), loaded once per process."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def _library() -> Optional[ctypes.CDLL]:
    return _state()[0]


def _load() -> Tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get('KW_MM_NATIVE', '1') == '0':
        return None, 'off (KW_MM_NATIVE=0)'
    path = None
    try:
        path = build()
        lib = _open(path)
        usable_cpu = lib.kw_gemm_available()
    except Exception as err:  # noqa: BLE001 - whatever fails, torch's products still work
        where = f' ({path})' if path is not None else ''
        warnings.warn(f'kw_mm: the native KW assembly kernels are unavailable{where}, using '
                      f'torch.matmul (slower on CPU; KW_MM_NATIVE=0 silences this): {err}',
                      RuntimeWarning, stacklevel=3)
        return None, f'unavailable: {err}'
    if not usable_cpu:
        return None, 'not used: this CPU has no AVX-512F'
    return lib, f'on ({path})'


def status() -> str:
    """Whether the native kernels are in use, and if not, why."""
    return _state()[1]


def available() -> bool:
    """Whether the kernels are built, loaded and usable on this CPU."""
    return _library() is not None


def usable(a: torch.Tensor, b: torch.Tensor, macs: int) -> bool:
    """Whether ``a @ b``-like products of these tensors take the native kernels."""
    return (a.device.type == 'cpu' and b.device.type == 'cpu'
            and a.dtype == torch.float32 and b.dtype == torch.float32
            and macs >= tuning.MIN_MACS
            and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()  # vmap, grad, jacrev, ...
            and not _forward_ad_active()
            and _library() is not None)


def _forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors
    may flow in: the native functions have no forward-mode derivative)."""
    return getattr(torch.autograd.forward_ad, '_current_level', -1) >= 0


def _require() -> ctypes.CDLL:
    """The loaded library; raises where the kernels are not in use."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f'the native kernels are not in use: {status()}')
    return lib
