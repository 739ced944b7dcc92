"""Per-sample 2-d convolutions as sums of products over kernel positions ("taps").

:func:`conv2d_taps` convolves each sample with its own kernel, given as KW
mixtures, and :func:`conv2d_taps_backward` gives its gradients. The input is
laid out once by :class:`_TapsInput` (zero-padded, split into phases for
stride > 1, or read unpadded with lane masks where the layer keeps the map's
size) so that every kernel position reads one contiguous stretch of it, and
``kw_conv_taps`` reads the mixtures where they are: no reordered copy of the
kernels and no per-sample calls.
"""
import ctypes
import functools
from typing import Optional, Sequence, Tuple

import torch

from . import library, tuning
from .bindings import _offsets


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
    lib = library._require()
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
                              unpadded=tuning.UNPADDED_TAPS, kernels=kernels)
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
        # kernel position s reads phase (ky·dh mod sh, kx·dw mod sw) from
        # offsets[s] − phase·slot
        taps = [(s, o) for s in range(kh * kw)
                if ((s // kw) * dh % sh) * sw + (s % kw) * dw % sw == phase
                for o in range(g_out)]
        if not taps:
            continue
        a_off = _offsets([((s * g_out + o) * g_in + c) * cell for c in range(g_in)
                          for s, o in taps])
        b_off = _offsets([reach - (source.offsets[s] - phase * slot)
                          + o * cell_out * g_ext.stride(1) for s, o in taps])
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
                              dilation, unpadded=tuning.UNPADDED_TAPS and need_x, kernels=kernels,
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
    if cols <= tuning.NATIVE_KERNEL_GRAD_MAX_COLS:
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


def _grad_on_grid(grad: torch.Tensor, source: _TapsInput) -> torch.Tensor:
    """``grad [B, C, out_h, out_w]`` laid on the taps grid ``[B, C, out_h · grid_w]``,
    zero in the junk columns past ``out_w``."""
    batch, channels = grad.shape[:2]
    if source.grid_w == source.out_w:
        return grad.contiguous().view(batch, channels, source.cols)
    g_grid = grad.new_zeros(batch, channels, source.cols)
    g_grid.view(batch, channels, source.out_h, source.grid_w)[..., :source.out_w] = grad
    return g_grid
