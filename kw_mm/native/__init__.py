"""Native CPU kernels for KW kernel assembly, compiled on first use.

A KW layer assembles its kernels with matrix products whose inner dimension
is short (the warehouse's ``n`` cells, or the ``B·m`` mixtures in the cell
gradient) and whose outer one is a cell's numel (262,144 in ResNet50's last
stage). MKL runs those at a third of its usual speed on this project's
reference CPU; ``kw_gemm.c`` has kernels written for exactly these shapes
(AVX-512, float32, OpenMP over torch's own thread count). The same
register-tiled product, batched, runs the 1×1 KW convolutions (each sample's
kernel times its input, :func:`bmm`): faster there than MKL's batched
product and than oneDNN's 1×1 convolution on that CPU.

The C file is compiled with the system C compiler (``$CC``, else ``cc``)
into a cache folder (``$KW_MM_CACHE_DIR``, else ``~/.cache/kw_mm``) the first
time a KW layer runs on CPU, keyed by the source, the compiler command and
the CPU's feature flags; the file appears atomically, so concurrent processes
are safe. Where it cannot be used (no compiler, no AVX-512F, not float32,
products under :data:`MIN_MACS`, autocast, tracing, export, functorch
transforms or forward-mode AD) kw_mm computes the same products with ``torch.matmul`` /
``torch.bmm``; :func:`status` says which and why, and a failed compile
warns once. ``KW_MM_NATIVE=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

SOURCE = Path(__file__).with_name('kw_gemm.c')
FLAGS = ('-O3', '-march=native', '-fopenmp', '-shared', '-fPIC')

#: Products with fewer multiply-adds (M·K·N) than this use torch.matmul: there
#: the call overheads are as large as what the kernels save.
MIN_MACS = 1 << 21

#: ``kw_gemm_nt`` keeps per-thread partial sums of 16 floats per output element;
#: larger products use torch.matmul rather than allocate more than this.
NT_WORKSPACE_BYTES = 64 << 20

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


def build(folder: Optional[Path] = None) -> Path:
    """Compile ``kw_gemm.c`` (if not cached yet) and return the library's path.

    Raises:
        RuntimeError: the compiler is missing or failed (its output included).
    """
    folder = Path(folder) if folder is not None else cache_dir()
    cc = os.environ.get('CC', 'cc')
    command = (*shlex.split(cc), *FLAGS)
    key = hashlib.sha256(SOURCE.read_bytes() + ' '.join(command).encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    target = folder / f'kw_gemm-{key}.so'
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.kw_gemm-', suffix='.so', dir=folder)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([*command, str(SOURCE), '-o', tmp], capture_output=True,
                                  text=True, errors='replace', timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RuntimeError(f'could not run the C compiler {cc!r} (set CC): {err}') from err
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(command)} failed with exit status {proc.returncode}:\n'
                               + (proc.stderr or proc.stdout)[-2000:])
        os.chmod(tmp, 0o755)  # mkstemp made it private; the cache may be shared
        os.replace(tmp, target)  # atomic: other processes see no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kw_gemm_available.restype = ctypes.c_int
    lib.kw_gemm_available.argtypes = []
    lib.kw_gemm_nn.restype = None  # a None result reads as "not failed"
    lib.kw_gemm_nn.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ctypes.c_int]
    lib.kw_gemm_nn_batched.restype = None
    lib.kw_gemm_nn_batched.argtypes = [i64, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64,
                                       ptr, i64, i64, ctypes.c_int]
    lib.kw_conv_taps.restype = ctypes.c_int
    lib.kw_conv_taps.argtypes = [i64, i64, i64, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr,
                                 i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.kw_fused_taps.restype = ctypes.c_int
    lib.kw_fused_taps.argtypes = [i64, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, i64,
                                  ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    lib.kw_gemm_nt.restype = ctypes.c_int
    lib.kw_fused_kernel_grad.restype = ctypes.c_int
    lib.kw_fused_kernel_grad.argtypes = [i64, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64,
                                         ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr,
                                         i64, ctypes.c_int]
    lib.kw_gemm_nt.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ctypes.c_int]
    return lib


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
    try:
        path = build()
        lib = _open(path)
    except (RuntimeError, OSError) as err:
        warnings.warn(f'kw_mm: the native KW assembly kernels are unavailable, using '
                      f'torch.matmul (slower on CPU; KW_MM_NATIVE=0 silences this): {err}',
                      RuntimeWarning, stacklevel=3)
        return None, f'unavailable: {err}'
    if not lib.kw_gemm_available():
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
            and macs >= MIN_MACS
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


def _nt_fits(rows: int, cols: int) -> bool:
    padded = -(-rows // 4) * 4 * (-(-cols // 6) * 6)  # the kernel's 4 × 6 register tiles
    return padded * 16 * 4 * torch.get_num_threads() <= NT_WORKSPACE_BYTES


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix with unit column stride (a copy only if needed)."""
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def _batch_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [S, R, C]`` as matrices with unit column stride (a copy only if needed)."""
    if t.stride(2) == 1 and t.stride(1) >= t.shape[2]:
        return t
    return t.contiguous()


def _product(kernel: str, x: torch.Tensor, y: torch.Tensor, cols: int) -> torch.Tensor:
    """Run ``kw_gemm_<kernel>(rows, cols, inner, x, ldx, y, ldy, out, ldout, threads)``."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f'the native kernels are not in use: {status()}')
    x, y = _rows(x), _rows(y)
    out = torch.empty(x.shape[0], cols, dtype=torch.float32)
    if out.numel() == 0 or x.shape[1] == 0:
        return out.zero_()
    failed = getattr(lib, 'kw_gemm_' + kernel)(
        x.shape[0], cols, x.shape[1], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
        out.data_ptr(), out.stride(0), torch.get_num_threads())
    if failed:
        raise MemoryError(f'kw_gemm_{kernel}: could not allocate its per-thread workspace')
    return out


def _check(name: str, x: torch.Tensor, y: torch.Tensor, x_dim: int, y_dim: int) -> None:
    for label, t in (('first', x), ('second', y)):
        if t.dim() != 2 or t.dtype != torch.float32 or t.device.type != 'cpu':
            raise ValueError(f'{name}: the {label} operand must be a float32 CPU matrix, got '
                             f'{t.dtype} {t.device.type} of shape {tuple(t.shape)}')
    if x.shape[x_dim] != y.shape[y_dim]:
        raise ValueError(f'{name}: inner dimensions differ, shapes {tuple(x.shape)} and '
                         f'{tuple(y.shape)}')


def gemm_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for float32 CPU matrices ``a [M, K]``, ``b [K, N]`` (no autograd)."""
    _check('gemm_nn', a, b, 1, 0)
    return _product('nn', a, b, b.shape[1])


def gemm_nn_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` for float32 CPU tensors ``a [S, M, K]``, ``b [S, K, N]`` (no autograd).

    ``a`` may be a transposed view: each matrix needs a unit stride along
    either dimension, ``b`` along its rows.
    """
    for label, t in (('first', a), ('second', b)):
        if t.dim() != 3 or t.dtype != torch.float32 or t.device.type != 'cpu':
            raise ValueError(f'gemm_nn_batched: the {label} operand must be a 3-D float32 CPU '
                             f'tensor, got {t.dtype} {t.device.type} of shape {tuple(t.shape)}')
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f'gemm_nn_batched: shapes {tuple(a.shape)} and {tuple(b.shape)} do not '
                         f'multiply as batches of matrices')
    lib = _library()
    if lib is None:
        raise RuntimeError(f'the native kernels are not in use: {status()}')
    if not (a.stride(2) == 1 or a.stride(1) == 1):  # rows or columns of A may be strided
        a = a.contiguous()
    b = _batch_rows(b)
    batch, rows, inner = a.shape
    out = torch.empty(batch, rows, b.shape[2], dtype=torch.float32)
    if out.numel() == 0 or inner == 0:
        return out.zero_()
    lib.kw_gemm_nn_batched(batch, rows, b.shape[2], inner,
                           a.data_ptr(), a.stride(0), a.stride(1), a.stride(2),
                           b.data_ptr(), b.stride(0), b.stride(1),
                           out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    return out


#: :func:`conv2d_taps` re-reads a sample's whole kernel for every 64 output
#: columns: it pays where that re-reading stays under this many bytes per sample
#: (the small feature maps of classification; on the reference CPU it was
#: 1.1–1.8x faster than oneDNN there, which reorders every sample's kernel)
#: and loses on detection-size maps, which keep oneDNN.
TAPS_KERNEL_TRAFFIC = 32 << 20

#: a strided layer's input is first split into its phases (a copy), and the
#: fused forward re-reads a sample's phases for every strip of output
#: channels: it pays up to this many column tiles (14×14 outputs; on the
#: reference CPU, interleaved at batch 8, ResNet18's 128 → 256 layer 8.5 vs
#: 10.3 ms and ResNet50's 256-channel one 15.2 vs 20.2 ms in inference, the
#: same within ±2% in training; at 28×28 outputs ResNet50's 128-channel layer
#: took 19.8 vs 14.1 ms)
STRIDED_TAPS_MAX_TILES = 4


def conv2d_taps_pays(kernel_numel: int, out_h: int, out_w: int, stride: Tuple[int, int]) -> bool:
    """Whether :func:`conv2d_taps` is expected to beat per-sample oneDNN convolutions."""
    tiles = -(-out_h * (out_w + 2) // 64)
    if stride != (1, 1):
        return tiles <= STRIDED_TAPS_MAX_TILES
    return tiles * kernel_numel * 4 <= TAPS_KERNEL_TRAFFIC


def conv2d_output_size(size: Sequence[int], kernel_size: Tuple[int, int],
                       stride: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int]) -> Tuple[int, int]:
    """Output height and width of a 2-d convolution with symmetric zero padding."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation))


@functools.lru_cache(maxsize=64)
def _shift_masks(height: int, width: int, kernel_size: Tuple[int, int],
                 padding: Tuple[int, int], dilation: Tuple[int, int],
                 groups: int, sign: int) -> ctypes.Array:
    """``kw_conv_taps``' lane masks of a stride-1, size-keeping convolution
    on the unpadded image: bit ``l`` of entry ``u·taps + t`` says whether
    position ``16·u + l`` of the ``height × width`` output, shifted by
    ``sign`` times the shift of the kernel position of tap ``t = (s, g)``
    (``groups`` taps per position), lies inside the image (else it reads zero
    padding). The forward reads ``x`` at ``+shift``, the input's gradient
    reads the output's gradient at ``−shift``."""
    (kh, kw), (ph, pw), (dh, dw) = kernel_size, padding, dilation
    vectors = -(-height * width // 16)
    q = torch.arange(vectors * 16)
    row, col = q // width, q % width
    lanes = torch.arange(16)
    masks = []
    for ky in range(kh):
        for kx in range(kw):
            r, c = row + sign * (ky * dh - ph), col + sign * (kx * dw - pw)
            # (positions past the end: kw_conv_taps' own tail mask)
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            masks.append((inside.view(vectors, 16).long() << lanes).sum(1))
    table = torch.stack(masks, 1).repeat_interleave(groups, dim=1)
    return (ctypes.c_uint16 * table.numel())(*table.flatten().tolist())


#: whether the forward taps products (and the input's gradient) of stride-1
#: layers that keep the map's size read the input unpadded, with lane masks
#: (:class:`_TapsInput`); False lays every input on the padded grid (tests
#: compare both; on the reference CPU the unpadded layout made a 3×3 layer
#: 0.87x the time at 56×56 and 28×28 maps, 0.91x at 14×14)
UNPADDED_TAPS = True


class _TapsInput:
    """The input of a per-sample 2-d convolution laid out for ``kw_conv_taps``:
    zero-padded once and, for stride ``s > 1``, split into its ``s × s`` phases
    (sub-images), so every kernel position reads one contiguous stretch of one
    of them (``offsets``); the output comes out over whole grid rows
    (``grid_w`` columns each), the columns past ``out_w`` to be dropped.

    With ``unpadded`` a stride-1 convolution that keeps the input's size reads
    the input as it is: ``offsets`` are the kernel positions' shifts and
    :meth:`masks` (see :func:`_shift_masks`) zero what falls outside the image,
    so there is no padded copy and no column to drop."""

    def __init__(self, name: str, x: torch.Tensor, kernel_size: Tuple[int, int],
                 stride: Tuple[int, int], padding: Tuple[int, int],
                 dilation: Tuple[int, int], unpadded: bool = False) -> None:
        if x.dim() != 4:
            raise ValueError(f'{name}: x must be [B, C, H, W], got shape {tuple(x.shape)}')
        if x.dtype != torch.float32 or x.device.type != 'cpu':
            raise ValueError(f'{name}: x must be float32 on CPU, got {x.dtype} on {x.device}')
        for label, pair, least in (('kernel_size', kernel_size, 1), ('stride', stride, 1),
                                   ('dilation', dilation, 1), ('padding', padding, 0)):
            if min(pair) < least:
                raise ValueError(f'{name}: {label} must be at least {least}, got {pair}')
        batch, channels, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
        padded_h, padded_w = height + 2 * ph, width + 2 * pw
        self.out_h, self.out_w = conv2d_output_size((height, width), kernel_size, stride,
                                                    padding, dilation)
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(f'{name}: input {tuple(x.shape)} padded by {padding} is smaller '
                             f'than kernel_size={kernel_size} at dilation={dilation}')
        self._shifts: Optional[tuple] = None
        padded = (ph, pw) != (0, 0)  # at stride 1 without padding, keeping the size is 1×1
        if (sh, sw) == (1, 1) and (self.out_h, self.out_w) == (height, width) \
                and (unpadded or not padded):  # the input as it is
            self.phases = x.contiguous().view(batch, channels, 1, height * width)
            self.offsets = _offsets([(ky * dh - ph) * width + kx * dw - pw
                                     for ky in range(kh) for kx in range(kw)])
            if padded:
                self._shifts = (height, width, kernel_size, padding, dilation)
            self.grid_w, self.cols = width, height * width
            self.phase_h, self.slot, self.phase_cols = height, height * width, height * width
            return
        phase_h, phase_w = -(-padded_h // sh), -(-padded_w // sw)
        reach_w = dw * (kw - 1) // sw  # the last kernel column reads this far past a grid row
        slot = phase_h * phase_w + reach_w
        phases = x.new_zeros(batch, channels, sh * sw, slot)
        if sh == sw == 1:
            grid = phases[:, :, 0, :padded_h * padded_w].view(batch, channels, padded_h,
                                                              padded_w)
            grid[:, :, ph:ph + height, pw:pw + width] = x
        else:
            padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
            for py in range(sh):
                for px in range(sw):
                    part = padded[:, :, py::sh, px::sw]
                    grid = phases[:, :, py * sw + px, :phase_h * phase_w]
                    grid.view(batch, channels, phase_h, phase_w)[
                        :, :, :part.shape[2], :part.shape[3]] = part
        offsets = [(((ky * dh) % sh) * sw + (kx * dw) % sw) * slot
                   + (ky * dh // sh) * phase_w + kx * dw // sw
                   for ky in range(kh) for kx in range(kw)]
        self.phases = phases
        self.offsets = (ctypes.c_int64 * len(offsets))(*offsets)
        self.grid_w = phase_w
        self.cols = self.out_h * phase_w
        # each phase: phase_h rows of phase_w columns (phase_cols), in a slot of its own
        self.phase_h, self.slot, self.phase_cols = phase_h, slot, phase_h * phase_w

    @property
    def unpadded(self) -> bool:
        return self._shifts is not None

    def masks(self, groups: int, sign: int = 1) -> Optional[ctypes.Array]:
        """The lane masks of the unpadded layout for taps of ``groups`` channel
        groups per kernel position (:func:`_shift_masks`); None for a padded grid."""
        return None if self._shifts is None else _shift_masks(*self._shifts, groups, sign)

    def output(self, batch: int, channels: int) -> torch.Tensor:
        return torch.empty(batch, channels, self.cols, dtype=torch.float32)

    def crop(self, out: torch.Tensor) -> torch.Tensor:
        return out.view(out.shape[0], -1, self.out_h, self.grid_w)[..., :self.out_w].contiguous()


def _taps_setup(name: str, x: torch.Tensor, kernel_size: Tuple[int, int],
                stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int],
                unpadded: bool = False, **operands: torch.Tensor
                ) -> Tuple[ctypes.CDLL, _TapsInput]:
    """The library and the laid-out input of a taps convolution; checks ``operands``."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f'the native kernels are not in use: {status()}')
    for label, t in operands.items():
        if t.dtype != torch.float32 or t.device.type != 'cpu':
            raise ValueError(f'{name}: {label} must be float32 on CPU, got {t.dtype} '
                             f'on {t.device}')
    return lib, _TapsInput(name, x, kernel_size, stride, padding, dilation, unpadded)


def _check_taps_kernels(name: str, kernels: torch.Tensor, x: torch.Tensor,
                        kernel_size: Tuple[int, int], cell_groups: Tuple[int, int],
                        contiguous: bool = False) -> Tuple[int, int]:
    """Raise unless ``kernels`` is ``[B, kh·kw·G_out·G_in, cell_out, cell_in]``
    for ``x [B, G_in·cell_in, H, W]`` (and contiguous, where ``contiguous``);
    return ``(G_out, G_in)``."""
    if (len(cell_groups) != 2 or not all(isinstance(g, int) and g >= 1 for g in cell_groups)):
        raise ValueError(f'{name}: cell_groups must be two positive ints, got {cell_groups!r}')
    g_out, g_in = cell_groups
    if (kernels.dim() != 4 or kernels.shape[0] != x.shape[0]
            or kernels.shape[1] != kernel_size[0] * kernel_size[1] * g_out * g_in
            or kernels.shape[3] * g_in != x.shape[1]
            or (contiguous and not kernels.is_contiguous())):
        required = ' (contiguous)' if contiguous else ''
        raise ValueError(f'{name}: kernels of shape {tuple(kernels.shape)}{required} do not fit '
                         f'input {tuple(x.shape)}, kernel size {kernel_size} and cell_groups '
                         f'{cell_groups}')
    return g_out, g_in


def _offsets(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _run_taps(lib: ctypes.CDLL, name: str, *args) -> None:
    if lib.kw_conv_taps(*args, torch.get_num_threads()):
        raise MemoryError(f'{name}: kw_conv_taps could not allocate its table of taps')


def conv2d_taps(x: torch.Tensor, kernels: torch.Tensor, kernel_size: Tuple[int, int],
                stride: Tuple[int, int], padding: Tuple[int, int],
                dilation: Tuple[int, int], cell_groups: Tuple[int, int] = (1, 1)
                ) -> torch.Tensor:
    """Each sample's 2-d convolution with its own kernel, given as KW mixtures:
    ``kernels [B, kh·kw·G_out·G_in, cell_out, cell_in]``, ``x [B, G_in·cell_in, H, W]``,
    mixture ``i = (s·G_out + o)·G_in + c`` the block of kernel position ``s``,
    output group ``o`` and input group ``c`` (KW's kernel partition; with the
    default ``cell_groups=(1, 1)``, ``[B, kh·kw, out, in]``); zero padding, one
    group; ``G_out·cell_out`` output channels.

    No autograd. With the input laid out by :class:`_TapsInput`, the
    convolution is the matrix product kernel of ``kw_gemm_nn`` summed over
    kernel positions and input groups (``kw_conv_taps``), reading the mixtures
    where they are: no reordered copy of the kernels.
    """
    lib, source = _taps_setup('conv2d_taps', x, kernel_size, stride, padding, dilation,
                              unpadded=UNPADDED_TAPS, kernels=kernels)
    g_out, g_in = _check_taps_kernels('conv2d_taps', kernels, x, kernel_size, cell_groups)
    kernels = kernels.contiguous()
    batch, positions = x.shape[0], kernel_size[0] * kernel_size[1]
    cell_out, cell_in = kernels.shape[2:]
    cell = cell_out * cell_in
    phases = source.phases
    ldb = phases.stride(1)
    taps = [(s, c) for s in range(positions) for c in range(g_in)]
    a_off = _offsets([((s * g_out + o) * g_in + c) * cell for o in range(g_out) for s, c in taps])
    b_off = _offsets([source.offsets[s] + c * cell_in * ldb for s, c in taps])
    out = source.output(batch, g_out * cell_out)
    _run_taps(lib, 'conv2d_taps', batch, g_out, cell_out, source.cols, cell_in, len(taps),
              kernels.data_ptr(), kernels.stride(0), cell_in, 1, a_off, phases.data_ptr(),
              phases.stride(0), ldb, b_off, source.masks(g_in), out.data_ptr(), out.stride(0),
              cell_out * out.stride(1), out.stride(1))
    return source.crop(out)


#: the backward of a stride-1 :func:`conv2d_taps` runs natively for outputs of
#: at most this many grid columns (rows × padded width) per sample: 7×7 to
#: 28×28 maps, where per-sample oneDNN backward calls cost most (on the
#: reference CPU 32 vs 52 ms for a 3×3 layer at 512 channels, 7×7, batch 8;
#: 1024 rather than 256 columns: interleaved ResNet18 steps 0.921 vs 0.957 s,
#: ResNet50 with recompute 2.708 vs 2.795 s and 2.681 vs 2.690 s); larger maps
#: keep oneDNN (4096 columns measured slower)
TAPS_BACKWARD_MAX_COLS = 1024

def _stride1_input_grad(lib: ctypes.CDLL, kernels: torch.Tensor, g: torch.Tensor,
                        first: int, offsets: Sequence[int], cols: int,
                        cell_groups: Tuple[int, int],
                        masks: Optional[ctypes.Array]) -> torch.Tensor:
    """The input's gradient ``[B, in, cols]`` of a stride-1 :func:`conv2d_taps`:
    input position ``j`` gathers the output's gradient ``g [B, out, ·]`` at
    ``first + j − offsets[s]`` through every mixture transposed (``masks``: the
    unpadded layout's, of the negated shifts; None on the padded grid)."""
    g_out, g_in = cell_groups
    cell_out, cell_in = kernels.shape[2:]
    cell = cell_out * cell_in
    taps = [(s, o) for s in range(len(offsets)) for o in range(g_out)]
    a_off = _offsets([((s * g_out + o) * g_in + c) * cell for c in range(g_in)
                      for s, o in taps])
    b_off = _offsets([first - offsets[s] + o * cell_out * g.stride(1) for s, o in taps])
    grad_x = torch.empty(g.shape[0], g_in * cell_in, cols, dtype=torch.float32)
    _run_taps(lib, 'conv2d_taps_backward', g.shape[0], g_in, cell_in, cols, cell_out,
              len(taps), kernels.data_ptr(), kernels.stride(0), 1, cell_in, a_off,
              g.data_ptr(), g.stride(0), g.stride(1), b_off, masks, grad_x.data_ptr(),
              grad_x.stride(0), cell_in * cols, cols)
    return grad_x


def _strided_input_grad(lib: ctypes.CDLL, source: _TapsInput, x: torch.Tensor,
                        kernels: torch.Tensor, g_ext: torch.Tensor, reach: int,
                        cell_groups: Tuple[int, int], kernel_size: Tuple[int, int],
                        stride: Tuple[int, int], padding: Tuple[int, int],
                        dilation: Tuple[int, int]) -> torch.Tensor:
    """The input's gradient of a strided :func:`conv2d_taps`: for each of the
    input's ``sh × sw`` phases, the kernel positions that read it correlate the
    output's gradient (``g_ext``: on the output grid, ``reach`` zero columns in)
    with their mixtures transposed; the phases' gradients are then put back in
    place in the padded input, and the padding cropped."""
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    g_out, g_in = cell_groups
    cell_out, cell_in = kernels.shape[2:]
    cell = cell_out * cell_in
    slot, cols = source.slot, source.phase_cols
    grad_phases = torch.zeros(batch, channels, sh * sw, cols, dtype=torch.float32)
    for phase in range(sh * sw):
        # kernel position s reads phase (ky·dh mod sh, kx·dw mod sw) from offsets[s] − phase·slot
        taps = [(s, o) for s in range(kh * kw)
                if ((s // kw) * dh % sh) * sw + (s % kw) * dw % sw == phase
                for o in range(g_out)]
        if not taps:
            continue
        a_off = _offsets([((s * g_out + o) * g_in + c) * cell for c in range(g_in)
                          for s, o in taps])
        b_off = _offsets([reach - (source.offsets[s] - phase * slot) + o * cell_out * g_ext.stride(1)
                          for s, o in taps])
        out = grad_phases[:, :, phase]
        _run_taps(lib, 'conv2d_taps_backward', batch, g_in, cell_in, cols, cell_out, len(taps),
                  kernels.data_ptr(), kernels.stride(0), 1, cell_in, a_off,
                  g_ext.data_ptr(), g_ext.stride(0), g_ext.stride(1), b_off, None,
                  out.data_ptr(), grad_phases.stride(0), cell_in * grad_phases.stride(1),
                  grad_phases.stride(1))
    padded = grad_phases.new_zeros(batch, channels, height + 2 * ph, width + 2 * pw)
    grid = grad_phases.view(batch, channels, sh * sw, source.phase_h, source.grid_w)
    for py in range(sh):
        for px in range(sw):
            part = padded[:, :, py::sh, px::sw]
            part.copy_(grid[:, :, py * sw + px, :part.shape[2], :part.shape[3]])
    return padded[:, :, ph:ph + height, pw:pw + width].contiguous()


#: :func:`conv2d_taps_backward` computes the kernels' gradient with the native
#: product (inner dimension: the grid's columns) for up to this many columns,
#: with torch's batched product above (faster there on the reference CPU)
NATIVE_KERNEL_GRAD_MAX_COLS = 256


#: the same for strided layers (their input's gradient per phase of the input): 14×14 and
#: 7×7 outputs gained (ResNet50's 256- and 512-channel 3×3 layers, forward and backward at
#: batch 8, 72.6 vs 76.4 ms and 95.3 vs 106.5 ms; ResNet18's 128 → 256 and 256 → 512, 28.9 vs
#: 30.8 and 42.7 vs 46.3 ms), 28×28 lost (ResNet50's 128 channels 60.6 vs 53.1 ms)
TAPS_BACKWARD_STRIDED_MAX_COLS = 256


def conv2d_taps_backward_pays(out_h: int, grid_w: int, strided: bool = False) -> bool:
    """Whether :func:`conv2d_taps_backward` is expected to beat per-sample oneDNN."""
    return out_h * grid_w <= (TAPS_BACKWARD_STRIDED_MAX_COLS if strided
                              else TAPS_BACKWARD_MAX_COLS)


def conv2d_taps_backward(x: torch.Tensor, kernels: torch.Tensor, grad: torch.Tensor,
                         kernel_size: Tuple[int, int], padding: Tuple[int, int],
                         dilation: Tuple[int, int], need_x: bool = True,
                         need_kernels: bool = True, kernels_grad: Optional[torch.Tensor] = None,
                         cell_groups: Tuple[int, int] = (1, 1), *,
                         stride: Tuple[int, int] = (1, 1)
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`conv2d_taps` for ``x`` and ``kernels`` (None where
    not needed), given the output's gradient ``grad [B, out, H', W']``.

    No autograd. The input's gradient is the output's gradient, laid on the
    same padded grid (as it is where the layer keeps the map's size at stride
    1: the unpadded layout of :class:`_TapsInput`, with masks), correlated with
    every mixture transposed in place
    (``kw_conv_taps`` reading ``kernels`` column-major), one input group at a
    time (for stride > 1, one phase of the input at a time, with the kernel
    positions that read it, then scattered back); each mixture's gradient is
    one batched product ``grad (its output group) @ (its input group, shifted
    to its kernel position)ᵀ``, written into ``kernels_grad`` (contiguous
    float32, shaped as ``kernels``; a new tensor if None; it may be
    ``kernels`` itself, which is read first).
    """
    lib, source = _taps_setup('conv2d_taps_backward', x, kernel_size, stride, padding,
                              dilation, unpadded=UNPADDED_TAPS and need_x, kernels=kernels,
                              grad=grad)
    g_out, g_in = _check_taps_kernels('conv2d_taps_backward', kernels, x, kernel_size,
                                      cell_groups, contiguous=True)
    batch, channels, height, width = x.shape
    positions = kernel_size[0] * kernel_size[1]
    cell_out, cell_in = kernels.shape[2:]
    out_channels = g_out * cell_out
    if tuple(grad.shape) != (batch, out_channels, source.out_h, source.out_w):
        raise ValueError(f'conv2d_taps_backward: grad of shape {tuple(grad.shape)} does not '
                         f'fit the output {(batch, out_channels, source.out_h, source.out_w)}')
    grad_x = None
    if source.unpadded:  # need_x: the output's gradient as it is
        grad_x = _stride1_input_grad(
            lib, kernels, grad.contiguous().view(batch, out_channels, source.cols), 0,
            source.offsets, source.cols, (g_out, g_in), source.masks(g_out, -1)
        ).view(batch, channels, height, width)
        if not need_kernels:
            return grad_x, None
        source = _TapsInput('conv2d_taps_backward', x, kernel_size, stride, padding, dilation)
    grid_w, cols, offsets = source.grid_w, source.cols, list(source.offsets)
    reach, first = max(offsets), padding[0] * grid_w  # grid index of the input's first row
    if grid_w == source.out_w and reach == 0:  # 1×1, no padding: the gradient as it is
        g_ext = grad.contiguous().view(batch, out_channels, cols)
    else:  # the output's gradient on the grid (zero in the junk columns), `reach` columns in
        g_ext = grad.new_zeros(batch, out_channels,
                               max(first + height * grid_w + reach, reach + cols,
                                   reach + source.phase_cols))
        g_ext[:, :, reach:reach + cols].view(batch, out_channels, source.out_h,
                                             grid_w)[..., :source.out_w] = grad
    g_grid = g_ext[:, :, reach:reach + cols]
    need_x = need_x and grad_x is None  # not yet computed on the unpadded layout
    if need_x and tuple(stride) != (1, 1):
        grad_x = _strided_input_grad(lib, source, x, kernels, g_ext, reach, cell_groups,
                                     kernel_size, stride, padding, dilation)
    elif need_x:  # input grid position p = first + j, the gradient `reach` columns in
        grad_x = _stride1_input_grad(lib, kernels, g_ext, first + reach, offsets,
                                     height * grid_w, (g_out, g_in), None
                                     ).view(batch, channels, height, grid_w)
        if grid_w != width:
            grad_x = grad_x[..., padding[1]:padding[1] + width].contiguous()
    if not need_kernels:
        return grad_x, None
    if kernels_grad is None:
        kernels_grad = torch.empty_like(kernels)
    elif (kernels_grad.shape != kernels.shape or kernels_grad.dtype != torch.float32
          or kernels_grad.device.type != 'cpu' or not kernels_grad.is_contiguous()):
        raise ValueError(f'conv2d_taps_backward: kernels_grad must be a contiguous float32 CPU '
                         f'tensor of the kernels\' shape {tuple(kernels.shape)}, got '
                         f'{kernels_grad.dtype} {kernels_grad.device.type} of shape '
                         f'{tuple(kernels_grad.shape)}')
    phases = source.phases
    if cols <= NATIVE_KERNEL_GRAD_MAX_COLS:
        # the input grid transposed, so each block's (position, input group) is a
        # matrix [cols, cell_in] with unit column stride, as the native product reads it
        grid_t = phases.view(batch, channels, -1).transpose(1, 2).contiguous()
        for s in range(positions):
            for o in range(g_out):
                for c in range(g_in):
                    block = kernels_grad[:, (s * g_out + o) * g_in + c]
                    lib.kw_gemm_nn_batched(
                        batch, cell_out, cell_in, cols,
                        g_grid.data_ptr() + o * cell_out * g_grid.stride(1) * 4,
                        g_grid.stride(0), g_grid.stride(1), 1,
                        grid_t.data_ptr() + (offsets[s] * channels + c * cell_in) * 4,
                        grid_t.stride(0), grid_t.stride(1),
                        block.data_ptr(), block.stride(0), block.stride(1),
                        torch.get_num_threads())
        return grad_x, kernels_grad
    for s, offset in enumerate(offsets):
        shifted = phases.as_strided((batch, cols, channels), (phases.stride(0), 1,
                                                              phases.stride(1)),
                                    phases.storage_offset() + offset)
        for o in range(g_out):
            rows = g_grid[:, o * cell_out:(o + 1) * cell_out]
            for c in range(g_in):
                kernels_grad[:, (s * g_out + o) * g_in + c].copy_(
                    torch.bmm(rows, shifted[:, :, c * cell_in:(c + 1) * cell_in]))
    return grad_x, kernels_grad


#: 1×1 layers run fused (:func:`fused_conv2d_taps`) where their positions per
#: sample are at most this many times the warehouse's cells: where assembly
#: is a large share of the layer's arithmetic, so that not writing and
#: re-reading the kernels pays (ResNet50's last two stages at 224², on the
#: reference CPU; not its earlier stages, nor detection-size maps)
FUSED_POINTWISE_POSITIONS_PER_CELL = 1.5


def fused_pointwise_pays(cells: int, positions: int) -> bool:
    """Whether a 1×1 KW layer should run as :func:`fused_conv2d_taps` (inference,
    or training with ``recompute_kernels``)."""
    return positions <= FUSED_POINTWISE_POSITIONS_PER_CELL * cells


def _fused_layout(name: str, channels: int, kernel_size: Tuple[int, int],
                  cell_groups: Tuple[int, int]) -> Tuple[int, int, int, int, ctypes.Array]:
    """``(G_out, G_in, mixtures, cell_in, mix)`` of a fused taps product:
    ``mix[o·taps + t]`` is the mixture of output group ``o`` for tap
    ``t = (s, c)`` (kernel position, input group), as ``kw_fused_taps`` and
    ``kw_fused_kernel_grad`` read it. Raises for bad ``cell_groups``."""
    g_out, g_in = cell_groups
    if g_out < 1 or g_in < 1:
        raise ValueError(f'{name}: cell_groups must be two positive ints, got {cell_groups}')
    positions = kernel_size[0] * kernel_size[1]
    mix = _offsets([(s * g_out + o) * g_in + c for o in range(g_out) for s in range(positions)
                    for c in range(g_in)])
    return g_out, g_in, positions * g_out * g_in, channels // g_in, mix


def fused_conv2d_taps(x: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor,
                      kernel_size: Tuple[int, int], stride: Tuple[int, int],
                      padding: Tuple[int, int], dilation: Tuple[int, int],
                      cell_groups: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """:func:`conv2d_taps` of the kernels ``alpha @ cells`` without building them.

    ``alpha [B, m, n]``, ``cells [n, cell_out·cell_in]`` (every mixture mixes
    the same cells) or ``[m, n, cell_out·cell_in]`` (mixture ``i`` mixes
    ``cells[i]``: a layer's inference basis, :mod:`kw_mm.layers.basis`); with
    ``cell_groups = (G_out, G_in)`` the layer's ``out = G_out·cell_out`` and
    ``in = G_in·cell_in`` channels are split into groups, and mixture
    ``i = (s·G_out + o)·G_in + c`` (``m = kh·kw·G_out·G_in`` of them) is the
    block of kernel position ``s``, output group ``o`` and input group ``c``
    (the layout of KW's kernel partition).

    No autograd (inference; training through
    :class:`kw_mm.layers.per_sample.FusedKernelConv`). ``kw_fused_taps``
    assembles each strip of 8 rows of every sample's mixtures into a
    per-thread buffer and convolves with it at once, so the per-sample kernels
    (B × the layer's parameters) are neither written to memory nor read back.
    """
    lib, source = _taps_setup('fused_conv2d_taps', x, kernel_size, stride, padding, dilation,
                              unpadded=UNPADDED_TAPS, alpha=alpha, cells=cells)
    batch, channels = x.shape[:2]
    positions = kernel_size[0] * kernel_size[1]
    g_out, g_in, mixtures, cell_in, mix = _fused_layout('fused_conv2d_taps', channels,
                                                        kernel_size, cell_groups)
    own = cells.dim() == 3
    if (alpha.dim() != 3 or alpha.shape[:2] != (batch, mixtures) or cells.dim() not in (2, 3)
            or (own and cells.shape[0] != mixtures)
            or cells.shape[-2] != alpha.shape[2] or channels % g_in
            or cells.shape[-1] % cell_in):
        raise ValueError(f'fused_conv2d_taps: alpha {tuple(alpha.shape)} and cells '
                         f'{tuple(cells.shape)} do not fit input {tuple(x.shape)}, kernel '
                         f'size {kernel_size} and cell_groups {cell_groups}')
    cell_out = cells.shape[-1] // cell_in
    taps = positions * g_in
    alpha = alpha.reshape(batch * mixtures, -1).contiguous()
    cells = cells.contiguous() if own else _rows(cells)
    phases = source.phases
    ldb = phases.stride(1)
    b_off = _offsets([source.offsets[s] + c * cell_in * ldb for s in range(positions)
                      for c in range(g_in)])
    out = source.output(batch, g_out * cell_out)
    failed = lib.kw_fused_taps(
        batch, cell_out, source.cols, cell_in, taps, g_out, cells.shape[-2],
        alpha.data_ptr(), alpha.stride(0), cells.data_ptr(), cells.stride(-2),
        cells.stride(0) if own else 0, phases.data_ptr(),
        phases.stride(0), ldb, b_off, source.masks(g_in), mix, out.data_ptr(), out.stride(0),
        out.stride(1),
        torch.get_num_threads())
    if failed:
        raise MemoryError('kw_fused_taps: could not allocate its per-thread buffers')
    return source.crop(out)


def fused_kernel_grads(x: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor,
                       cells: torch.Tensor, kernel_size: Tuple[int, int],
                       stride: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int],
                       cell_groups: Tuple[int, int] = (1, 1), need_alpha: bool = True,
                       need_cells: bool = True
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`fused_conv2d_taps` for ``alpha`` and ``cells`` (None
    where not needed), given the output's gradient ``grad``.

    No autograd. Each mixture's gradient ``D[b, i]`` (the gradient of the
    kernels :func:`conv2d_taps_backward` would return) is computed strip by
    strip inside ``kw_fused_kernel_grad`` and used there for both
    ``grad_alpha[b, i, j] = Σ D[b, i] ⊙ cells[j]`` and
    ``grad_cells[j] = Σ_(b, i) alpha[b, i, j] · D[b, i]``: the ``B × m``
    mixture gradients are never stored.
    """
    lib, source = _taps_setup('fused_kernel_grads', x, kernel_size, stride, padding, dilation,
                              alpha=alpha, cells=cells, grad=grad)
    batch, channels = x.shape[:2]
    positions = kernel_size[0] * kernel_size[1]
    g_out, g_in, mixtures, cell_in, mix = _fused_layout('fused_kernel_grads', channels,
                                                        kernel_size, cell_groups)
    if (alpha.dim() != 3 or alpha.shape[:2] != (batch, mixtures)
            or cells.dim() != 2 or cells.shape[0] != alpha.shape[2] or channels % g_in
            or cells.shape[1] % cell_in):
        raise ValueError(f'fused_kernel_grads: alpha {tuple(alpha.shape)} and cells '
                         f'{tuple(cells.shape)} do not fit input {tuple(x.shape)}, kernel '
                         f'size {kernel_size} and cell_groups {cell_groups}')
    cell_out = cells.shape[1] // cell_in
    if tuple(grad.shape) != (batch, g_out * cell_out, source.out_h, source.out_w):
        raise ValueError(f'fused_kernel_grads: grad of shape {tuple(grad.shape)} does not fit '
                         f'the output {(batch, g_out * cell_out, source.out_h, source.out_w)}')
    if not (need_alpha or need_cells):
        return None, None
    ncells = cells.shape[0]
    grad_alpha = torch.empty(batch * mixtures, ncells) if need_alpha else None
    grad_cells = torch.empty(ncells, cells.shape[1]) if need_cells else None
    g_grid = _grad_on_grid(grad, source)
    # the input's grid (its phases, for stride > 1) transposed: grid position q of
    # tap (s, c) reads row offsets[s] + q
    grid_t = source.phases.view(batch, channels, -1).transpose(1, 2).contiguous()
    taps = positions * g_in
    x_off = _offsets([source.offsets[s] * channels + c * cell_in for s in range(positions)
                      for c in range(g_in)])
    alpha = alpha.reshape(batch * mixtures, -1).contiguous()
    cells = _rows(cells)
    failed = lib.kw_fused_kernel_grad(
        batch, cell_out, source.cols, cell_in, taps, g_out, ncells, alpha.data_ptr(),
        alpha.stride(0), cells.data_ptr(), cells.stride(0), g_grid.data_ptr(),
        g_grid.stride(0), g_grid.stride(1), grid_t.data_ptr(), grid_t.stride(0),
        grid_t.stride(1), x_off, mix,
        grad_alpha.data_ptr() if need_alpha else None, ncells,
        grad_cells.data_ptr() if need_cells else None, cells.shape[1], torch.get_num_threads())
    if failed:
        raise MemoryError('kw_fused_kernel_grad: could not allocate its per-thread buffers')
    if grad_alpha is not None:
        grad_alpha = grad_alpha.view(batch, mixtures, ncells)
    return grad_alpha, grad_cells


def _grad_on_grid(grad: torch.Tensor, source: _TapsInput) -> torch.Tensor:
    """``grad [B, C, out_h, out_w]`` laid on the taps grid ``[B, C, out_h · grid_w]``,
    zero in the junk columns past ``out_w``."""
    batch, channels = grad.shape[:2]
    if source.grid_w == source.out_w:
        return grad.contiguous().view(batch, channels, source.cols)
    g_grid = grad.new_zeros(batch, channels, source.cols)
    g_grid.view(batch, channels, source.out_h, source.grid_w)[..., :source.out_w] = grad
    return g_grid


def gemm_nt(g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``g @ e.T`` for float32 CPU matrices ``g [M, D]``, ``e [P, D]`` (no autograd)."""
    _check('gemm_nt', g, e, 1, 1)
    return _product('nt', g, e, e.shape[0])


class _NativeProduct(torch.autograd.Function):
    """A native ``a @ b``; subclasses give the product and the backward. Each
    operand is saved only if the other one's gradient needs it (as torch's
    products do), so a kernel multiplying an input without gradient is not kept.
    Not used under forward-mode AD (see :func:`usable`)."""

    @staticmethod
    def _save(ctx, a: torch.Tensor, b: torch.Tensor) -> None:
        need_a, need_b = ctx.needs_input_grad[:2]
        ctx.save_for_backward(a if need_b else None, b if need_a else None)


class SmallKMatmul(_NativeProduct):
    """``a @ b`` (``a [M, K]`` short, ``b [K, N]`` long) with native forward and backward.

    A backward that builds a graph (``create_graph=True``) uses torch's
    products, so higher derivatives work.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _NativeProduct._save(ctx, a, b)
        return gemm_nn(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # differentiating the backward itself
            return (grad @ b.t() if need_a else None), (a.t() @ grad if need_b else None)
        return small_k_grads(a, b, grad, need_a, need_b)


def small_k_grads(a: Optional[torch.Tensor], b: Optional[torch.Tensor], grad: torch.Tensor,
                  need_a: bool, need_b: bool
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``a @ b`` (``a [M, K]``, ``b [K, N]``, float32 CPU) given the
    output's: ``grad @ bᵀ`` and ``aᵀ @ grad`` with the native kernels, None
    where not needed (no autograd)."""
    grad_a = None
    if need_a:
        grad_a = gemm_nt(grad, b) if _nt_fits(grad.shape[0], b.shape[0]) else grad @ b.t()
    grad_b = gemm_nn(a.t().contiguous(), grad) if need_b else None
    return grad_a, grad_b


#: In :class:`BatchedMatmul`'s backward, ``aᵀ @ grad`` (``[K, N]``, inner
#: dimension ``M``) takes the native kernel with ``aᵀ`` read in place for
#: ``N ≥`` this, and as ``(gradᵀ @ a)ᵀ`` for ``N ≤`` :data:`SWAP_MAX_COLS`.
#: In between, and for ``grad @ bᵀ`` (inner dimension ``N``), MKL was faster
#: on the reference CPU (tools/benchmark.py; an AVX-512 AMD EPYC).
TRANSPOSED_MIN_COLS = 2048
SWAP_MAX_COLS = 256


def _grad_of_b(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``aᵀ @ grad`` for ``a [S, M, K]``, ``grad [S, M, N]``."""
    cols = grad.shape[2]
    if torch.is_grad_enabled() or not usable(a, grad, a.numel() * cols):
        return torch.bmm(a.transpose(1, 2), grad)
    if cols >= TRANSPOSED_MIN_COLS:
        return gemm_nn_batched(a.transpose(1, 2), grad)
    if cols <= SWAP_MAX_COLS:  # the transposed operand is the short one: strides stay small
        return gemm_nn_batched(grad.transpose(1, 2), a).transpose(1, 2)
    return torch.bmm(a.transpose(1, 2), grad)


class BatchedMatmul(_NativeProduct):
    """``torch.bmm(a, b)`` with the native kernel in forward and (by shape) for ``b``'s gradient.

    ``a``'s gradient (``grad @ bᵀ``, inner dimension ``N``) stays with torch.
    A backward that builds a graph uses torch's products throughout.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _NativeProduct._save(ctx, a, b)
        return gemm_nn_batched(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if need_a else None
        grad_b = _grad_of_b(a, grad) if need_b else None
        return grad_a, grad_b


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``: native where :func:`usable`, else torch's."""
    if (a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]
            or not usable(a, b, a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])):
        return torch.bmm(a, b)  # raises its own error for bad shapes
    return BatchedMatmul.apply(a, b)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [..., K]`` and a matrix ``b [K, N]``: native where
    :func:`usable`, else ``torch.matmul``."""
    lead, k = a.shape[:-1], a.shape[-1]
    rows = a.numel() // max(k, 1)
    if (a.dim() < 2 or b.dim() != 2 or k != b.shape[0]  # torch.matmul raises its own error
            or not usable(a, b, rows * k * b.shape[1])):
        return torch.matmul(a, b)
    return SmallKMatmul.apply(a.reshape(rows, k), b).view(*lead, b.shape[1])
