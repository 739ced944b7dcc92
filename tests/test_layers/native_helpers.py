"""Helpers shared by the tests of kw_mm.native (test_native*.py)."""
import contextlib

import pytest
import torch

from kw_mm import native

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f'native kernels: {native.status()}')


@contextlib.contextmanager
def num_threads(threads):
    """torch's thread count set to ``threads`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_sample_conv64(x, kernels, kernel_size, stride, padding, dilation, cell_groups=(1, 1)):
    """conv2d_taps in float64: the mixtures [B, kh·kw·G_out·G_in, cell_out, cell_in]
    reordered into each sample's kernel, one sample at a time."""
    batch, _, cell_out, cell_in = kernels.shape
    g_out, g_in = cell_groups
    weight = kernels.double().view(batch, *kernel_size, g_out, g_in, cell_out, cell_in)
    weight = weight.permute(0, 3, 5, 4, 6, 1, 2).reshape(batch, g_out * cell_out, g_in * cell_in,
                                                         *kernel_size)
    return torch.cat([torch.nn.functional.conv2d(x[b:b + 1].double(), weight[b], None, stride,
                                                 padding, dilation) for b in range(batch)])
