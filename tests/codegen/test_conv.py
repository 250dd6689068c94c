"""Sparse conv kernels (implicit-im2col NHWC, 1x1 NCHW) against torch F.conv2d.

Builds are few and small: every case below reuses one of ~8 kernels
(kind, block, bias, activation, residual), cached on disk after the first run.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.codegen.conv import bsr_conv1x1_nchw, bsr_conv_nhwc, csr_conv_direct_nchw
from sparsecc.errors import InputDtypeError, InputShapeError, UnsupportedOpError
from sparsecc.runtime.conv import SparseConv2d
from sparsecc.sparsify.patterns import as_matrix, from_matrix


def block_weight(c_out, c_in, k, block, density, seed=0):
    """Random W (C_out, C_in, k, k) whose (C_out, k·k·C_in) matrix keeps a ``density`` fraction of blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g)
    mat = as_matrix(w)
    br, bc = block
    keep = (torch.rand(c_out // br, mat.shape[1] // bc, generator=g) < density)
    keep = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return from_matrix(mat * keep, w.shape)


def reference(x, w, b, stride, padding, act, r=None):
    y = F.conv2d(x, w, b, stride, padding)
    if r is not None:
        y = y + r
    if act == "relu":
        y = torch.relu(y)
    elif act == "relu6":
        y = F.hardtanh(y, 0.0, 6.0)
    return y


# (block, act, bias, C_out, C_in, k, stride, padding, N, H, W, density)
NHWC_CASES = [
    ((16, 1), "relu", True, 32, 5, 3, 1, 1, 2, 9, 7, 0.3),    # C_in not a multiple of anything, odd H/W, batch 2
    ((16, 1), "relu", True, 32, 8, 3, 2, 1, 1, 11, 10, 0.3),  # stride 2
    ((16, 1), "relu", True, 48, 3, 7, 2, 3, 1, 13, 9, 0.4),   # 7x7 stem-like
    ((16, 1), "relu", True, 32, 16, 1, 2, 0, 1, 7, 7, 0.3),   # 1x1 stride 2 (downsample)
    ((8, 1), None, False, 24, 6, 3, 2, 1, 3, 5, 6, 0.5),      # C_out not a multiple of 16
    ((1, 1), "relu6", True, 7, 3, 3, 1, 1, 1, 6, 5, 0.4),     # CSR, C_out odd
    ((1, 4), "relu", True, 16, 8, 3, 1, 1, 1, 5, 5, 0.4),     # row blocks along channels
    ((4, 4), None, False, 8, 4, 3, 1, 2, 1, 4, 4, 0.5),       # padding 2 > needed, 4x4 blocks
    ((16, 1), "relu", True, 32, 5, 3, 1, 1, 1, 3, 3, 0.0),    # density 0: act(bias)
    ((16, 1), "relu", True, 32, 5, 3, 1, 1, 1, 3, 3, 1.0),    # density 1
    ((16, 1), "relu", True, 32, 4, 3, 1, 0, 1, 3, 3, 0.3),    # one output pixel (M < m_tile)
]


@pytest.mark.parametrize("block,act,bias,c_out,c_in,k,s,p,n,h,w,density", NHWC_CASES)
def test_nhwc_kernel_matches_torch(block, act, bias, c_out, c_in, k, s, p, n, h, w, density):
    wt = block_weight(c_out, c_in, k, block, density)
    b = torch.randn(c_out) if bias else None
    mod = SparseConv2d(wt, b, s, p, act, block)
    x = torch.randn(n, c_in, h, w)
    ref = reference(x, wt, b, s, p, act)
    y = mod(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # channels_last input (the zero-copy path when unpadded) gives the same numbers
    torch.testing.assert_close(mod(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-4, rtol=1e-4)


def test_nhwc_all_zero_block_rows_and_columns():
    wt = block_weight(48, 8, 3, (16, 1), 0.5, seed=3)
    wt[16:32] = 0  # an empty block row (no stored block: indptr[i] == indptr[i + 1])
    wt[:, 2] = 0  # an input channel never read
    b = torch.randn(48)
    mod = SparseConv2d(wt, b, 1, 1, "relu", (16, 1))
    x = torch.randn(2, 8, 6, 7)
    y = mod(x)
    torch.testing.assert_close(y, reference(x, wt, b, 1, 1, "relu"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:, 16:32], torch.relu(b[16:32]).view(1, -1, 1, 1).expand(2, 16, 6, 7))


def test_nhwc_residual_epilogue():
    wt = block_weight(32, 16, 3, (16, 1), 0.3)
    b = torch.randn(32)
    mod = SparseConv2d(wt, b, 1, 1, "relu", (16, 1), residual=True)
    x, r = torch.randn(1, 16, 7, 7), torch.randn(1, 32, 7, 7)  # 49 pixels: padded to the tile, r copied
    torch.testing.assert_close(mod(x, r), reference(x, wt, b, 1, 1, "relu", r), atol=1e-4, rtol=1e-4)
    x, r = torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mod(x, r), reference(x, wt, b, 1, 1, "relu", r), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputShapeError, match="residual"):
        mod(x)


@pytest.mark.parametrize("block,act,bias,n,h,w,density", [
    ((16, 1), "relu", True, 2, 5, 7, 0.3),   # HW = 35: padded to the pixel tile
    ((1, 1), None, False, 1, 4, 8, 0.3),     # CSR, HW = 32
    ((16, 1), "relu", True, 1, 3, 3, 0.0),   # density 0
    ((16, 1), "relu", True, 1, 4, 4, 1.0),   # density 1
])
def test_nchw_1x1_kernel_matches_torch(block, act, bias, n, h, w, density):
    c_out = 32 if block == (16, 1) else 5
    wt = block_weight(c_out, 12, 1, block, density)
    b = torch.randn(c_out) if bias else None
    mod = SparseConv2d(wt, b, 1, 0, act, block, layout="nchw")
    x = torch.randn(n, 12, h, w)
    y = mod(x)
    assert y.is_contiguous() or y.shape[2] * y.shape[3] % 16
    torch.testing.assert_close(y, reference(x, wt, b, 1, 0, act), atol=1e-4, rtol=1e-4)


# (act, bias, residual, C_out, C_in, k, padding, N, H, W, density)
DIRECT_CASES = [
    ("relu", True, False, 7, 5, 3, 1, 2, 9, 7, 0.3),     # odd sizes, batch 2
    (None, True, True, 16, 8, 3, 1, 1, 14, 14, 0.3),     # residual epilogue (ResNet's conv2)
    ("relu6", False, False, 5, 3, 1, 0, 1, 6, 5, 0.5),   # 1x1
    (None, False, True, 6, 4, 5, 2, 3, 11, 10, 0.2),     # 5x5, padding 2, residual without bias
    ("relu", True, False, 8, 8, 3, 0, 1, 3, 3, 0.3),     # one output pixel
    ("relu", True, False, 4, 3, 3, 1, 1, 4, 4, 0.0),     # density 0: act(bias)
    ("relu", True, False, 4, 3, 3, 1, 1, 4, 4, 1.0),     # density 1
    (None, True, False, 3, 2, 3, 3, 1, 2, 2, 0.5),       # padding larger than the input
]
# strided: (act, bias, residual, C_out, C_in, k, stride, padding, N, H, W, density)
DIRECT_STRIDED_CASES = [
    ("relu", True, False, 8, 3, 7, 2, 3, 1, 17, 14, 0.4),   # 7x7 stem-like, odd H
    ("relu", True, True, 8, 5, 3, 2, 1, 2, 9, 10, 0.3),     # 3x3 stride 2 with the residual join
    (None, True, False, 8, 6, 1, 2, 0, 1, 7, 7, 0.5),       # 1x1 shortcut: one phase read
    (None, False, False, 4, 3, 3, 3, 1, 1, 11, 8, 0.5),     # stride 3
    ("relu6", True, False, 4, 3, 3, (2, 1), (1, 0), 1, 8, 6, 0.5),  # different strides and paddings per axis
]


@pytest.mark.parametrize("act,bias,residual,c_out,c_in,k,s,p,n,h,w,density",
                         [(a, b, r, co, ci, k, 1, p, n, h, w, d) for a, b, r, co, ci, k, p, n, h, w, d in DIRECT_CASES]
                         + DIRECT_STRIDED_CASES)
def test_direct_kernel_matches_torch(act, bias, residual, c_out, c_in, k, s, p, n, h, w, density):
    wt = block_weight(c_out, c_in, k, (1, 1), density)
    wt[0] = 0  # an empty output channel
    wt[:, -1] = 0  # an empty input channel
    b = torch.randn(c_out) if bias else None
    mod = SparseConv2d(wt, b, s, p, act, (1, 1), layout="direct", residual=residual)
    assert mod.format == "xcsr" and mod.kernel_name.startswith("conv_direct_csr")
    x = torch.randn(n, c_in, h, w)
    ref0 = F.conv2d(x, wt, b, s, p)
    r = torch.randn_like(ref0) if residual else None
    y = mod(x, r) if residual else mod(x)
    torch.testing.assert_close(y, reference(x, wt, b, s, p, act, r), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mod.dense_weight(), wt, atol=0, rtol=0)
    xcl = x.contiguous(memory_format=torch.channels_last)  # any input strides
    torch.testing.assert_close(mod(xcl, r) if residual else mod(xcl), y, atol=0, rtol=0)


@settings(max_examples=12, deadline=None)
@given(c_out=st.integers(1, 9), c_in=st.integers(1, 9), k=st.sampled_from([1, 3, 5]), s=st.integers(1, 3),
       p=st.integers(0, 2), n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 40),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_direct_kernel_property(c_out, c_in, k, s, p, n, h, w, density, seed):
    # the bias+relu direct kernel of the cases above: no new build
    if h + 2 * p < k or w + 2 * p < k:
        return
    wt = block_weight(c_out, c_in, k, (1, 1), density, seed)
    b = torch.randn(c_out)
    x = torch.randn(n, c_in, h, w)
    mod = SparseConv2d(wt, b, s, p, "relu", (1, 1), layout="direct")
    torch.testing.assert_close(mod(x), reference(x, wt, b, s, p, "relu"), atol=1e-4, rtol=1e-4)


@settings(max_examples=12, deadline=None)
@given(c_out_blocks=st.integers(1, 3), c_in=st.integers(1, 9), k=st.sampled_from([1, 3]), s=st.integers(1, 2),
       p=st.integers(0, 1), n=st.integers(1, 2), h=st.integers(3, 9), w=st.integers(3, 9),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_nhwc_kernel_property(c_out_blocks, c_in, k, s, p, n, h, w, density, seed):
    # reuses the 16x1 bias+relu kernel of the cases above: no new build
    wt = block_weight(16 * c_out_blocks, c_in, k, (16, 1), density, seed)
    b = torch.randn(16 * c_out_blocks)
    x = torch.randn(n, c_in, h, w)
    mod = SparseConv2d(wt, b, s, p, "relu", (16, 1))
    torch.testing.assert_close(mod(x), reference(x, wt, b, s, p, "relu"), atol=1e-4, rtol=1e-4)


def test_errors_name_the_layer():
    wt = block_weight(16, 6, 3, (1, 1), 0.5)
    with pytest.raises(UnsupportedOpError, match="C_in % 4"):
        SparseConv2d(wt, None, 1, 1, None, (1, 4), name="layer9")
    with pytest.raises(UnsupportedOpError, match="1x1 stride-1"):
        SparseConv2d(wt, None, 1, 1, None, (16, 1), layout="nchw")
    with pytest.raises(UnsupportedOpError, match="gelu"):
        SparseConv2d(wt, None, 1, 1, "gelu", (16, 1))
    with pytest.raises(UnsupportedOpError, match="CSR"):
        SparseConv2d(wt, None, 1, 1, None, (16, 1), layout="direct")
    mod = SparseConv2d(wt, None, 1, 1, None, (16, 1), name="layer9")
    with pytest.raises(InputShapeError, match="layer9.*6"):
        mod(torch.randn(1, 5, 4, 4))
    with pytest.raises(InputDtypeError, match="float32"):
        mod(torch.randn(1, 6, 4, 4, dtype=torch.float64))


def test_templates_have_the_linear_block_structure():
    f = bsr_conv_nhwc((16, 1), bias=True, activation="relu", residual=True)
    assert len(f.params) == 8
    text = f.script()
    for name in ('"row"', '"init"', '"compute"', '"epilogue"'):
        assert name in text
    assert "PB[vmo * 8 + vmi] + OFF[PTR[vio] + vk]" in text  # implicit im2col: base + offset
    assert len(bsr_conv1x1_nchw((4, 1), bias=False).params) == 5
    direct = csr_conv_direct_nchw(residual=True, hw_tile=32)
    assert len(direct.params) == 7 and len(csr_conv_direct_nchw().params) == 6  # bias always (zeros without)
    assert "OFF[PTR[vco] + vk] + vqo * 32 + vqi" in direct.script()  # offset + pixel: contiguous along the tile
    with pytest.raises(UnsupportedOpError):
        bsr_conv1x1_nchw((1, 4))
