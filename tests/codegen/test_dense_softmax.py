"""The export's dense-rest kernels against torch: the packed dense linear, the dense 1x1 conv and the row softmax.

Shapes cover the register tile's cases (M a multiple of 6, of 4 only, below 4, padded), N not a multiple of
the panel width, and the IEEE cases of the fused epilogues and of the softmax (NaN, ±inf, masked rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.codegen.dense import im2col_nchw, pack_weight, padded_n, zero_pad_nchw
from sparsecc.codegen.softmax import softmax_rows
from sparsecc.errors import KernelBuildError, UnsupportedOpError
from sparsecc.targets import x86

_ACT = {None: lambda y: y, "relu": torch.relu, "gelu": torch.nn.functional.gelu}


def _run_dense(x, w, b, activation, params):
    m, k = x.shape
    n = w.shape[0]
    mp = -(-m // params.mr) * params.mr
    sch = x86.schedule_dense(mp, n, k, bias=b is not None, activation=activation, params=params)
    lib = x86.build(sch)
    npad = padded_n(n, params.nb)
    xp = np.zeros((mp, k), np.float32)
    xp[:m] = x.numpy()
    args = [tvm.runtime.tensor(xp), tvm.runtime.tensor(pack_weight(w.numpy(), params.nb))]
    if b is not None:
        bp = np.zeros(npad, np.float32)
        bp[:n] = b.numpy()
        args.append(tvm.runtime.tensor(bp))
    y = tvm.runtime.tensor(np.zeros((mp, npad), np.float32))
    lib(*args, y)
    return torch.from_numpy(y.numpy()[:m, :n])


def _host_params(m, k):
    return x86.dense_params(m, k, *x86.host_vector_file())


@pytest.mark.parametrize("m,n,k", [(12, 32, 16), (128, 384, 384), (8, 48, 40), (3, 16, 8), (1, 20, 7),
                                   (10, 33, 13)])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_dense_linear_matches_torch(m, n, k, activation):
    torch.manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    y = _run_dense(x, w, b, activation, _host_params(m, k))
    torch.testing.assert_close(y, _ACT[activation](torch.nn.functional.linear(x, w, b)), rtol=1e-4, atol=1e-4)


def test_dense_linear_without_bias_and_with_the_other_isas_tiles():
    torch.manual_seed(0)
    x, w = torch.randn(24, 64), torch.randn(40, 64)
    for lanes, regs in ((8, 16), (16, 32), (4, 32)):  # AVX2, AVX-512's (run with AVX2 vectors here), NEON's
        p = x86.dense_params(24, 64, lanes, regs)
        torch.testing.assert_close(_run_dense(x, w, None, None, p), x @ w.T, rtol=1e-4, atol=1e-4)


def test_dense_params_rule():
    avx2 = x86.dense_params(128, 384, 8, 16)
    assert (avx2.mr, avx2.nb, avx2.k_unroll) == (4, 16, 4)  # 128 is not a multiple of 6
    assert x86.dense_params(96, 384, 8, 16).mr == 6
    assert x86.dense_params(2, 7, 8, 16).mr == 2 and x86.dense_params(2, 7, 8, 16).k_unroll == 1
    assert x86.dense_params(10, 8, 8, 16).mr == 6  # neither 6 nor 4 divides 10: padded to 12
    avx512 = x86.dense_params(96, 64, 16, 32)
    assert avx512.nb == 32 and avx512.mr * avx512.nb * 4 <= 1024  # the register tile stays on the stack
    with pytest.raises(KernelBuildError, match="not a multiple of the row tile"):
        x86.schedule_dense(10, 16, 8, bias=False, params=x86.DenseParams(mr=4))


def test_dense_epilogue_keeps_nan_and_inf():
    x = torch.zeros(6, 8)
    x[0, 0], x[1, 0], x[2, 0] = float("nan"), float("inf"), float("-inf")
    w = torch.ones(16, 8)
    for act in (None, "relu", "gelu"):
        y = _run_dense(x, w, torch.zeros(16), act, _host_params(6, 8))
        ref = _ACT[act](torch.nn.functional.linear(x, w, torch.zeros(16)))
        torch.testing.assert_close(y, ref, equal_nan=True)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 40), k=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_dense_linear_property(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(_run_dense(x, w, b, None, _host_params(m, k)), torch.nn.functional.linear(x, w, b),
                               rtol=1e-4, atol=1e-4)


def test_pack_weight_layout():
    w = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    p = pack_weight(w, 4)
    assert p.shape == (2, 3, 4)
    assert p[1, 2, 0] == w[4, 2] and (p[1, :, 1:] == 0).all()


def _run_conv1x1(x, w, b, activation, params):
    """The 1x1 conv kernel with the export's padding: C_out to the row tile, pixels to the panel width."""
    n, c_in, h, wd = x.shape
    c_out, hw = w.shape[0], h * wd
    cop, hwp = -(-c_out // params.mr) * params.mr, padded_n(hw, params.nb)
    lib = x86.build(x86.schedule_dense_conv1x1(n, cop, c_in, hwp, bias=b is not None, activation=activation,
                                               params=params))
    xp = np.zeros((n, c_in, hwp), np.float32)
    xp[:, :, :hw] = x.reshape(n, c_in, hw).numpy()
    wp = np.zeros((cop, c_in), np.float32)
    wp[:c_out] = w.reshape(c_out, c_in).numpy()
    args = [tvm.runtime.tensor(xp), tvm.runtime.tensor(wp)]
    if b is not None:
        bp = np.zeros(cop, np.float32)
        bp[:c_out] = b.numpy()
        args.append(tvm.runtime.tensor(bp))
    y = tvm.runtime.tensor(np.zeros((n, cop, hwp), np.float32))
    lib(*args, y)
    return torch.from_numpy(y.numpy()[:, :c_out, :hw].reshape(n, c_out, h, wd))


@pytest.mark.parametrize("n,c_out,c_in,h,w", [(1, 48, 288, 14, 14), (2, 20, 8, 7, 7), (1, 3, 5, 1, 1),
                                             (3, 10, 13, 4, 6), (1, 96, 24, 8, 8)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_conv1x1_matches_torch(n, c_out, c_in, h, w, activation):
    torch.manual_seed(n + c_out * 7 + c_in * 13 + h)
    x, wt, b = torch.randn(n, c_in, h, w), torch.randn(c_out, c_in, 1, 1), torch.randn(c_out)
    y = _run_conv1x1(x, wt, b, activation, _host_params(c_out, c_in))
    torch.testing.assert_close(y, _ACT[activation](torch.nn.functional.conv2d(x, wt, b)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,c_in,c_out,h,w,k,stride,padding", [(1, 3, 16, 15, 15, 7, (2, 2), (3, 3)),
                                                            (2, 8, 12, 9, 7, 3, (1, 1), (1, 1)),
                                                            (1, 6, 10, 8, 8, 1, (2, 2), (0, 0)),
                                                            (1, 4, 8, 5, 6, 3, (2, 1), (0, 1))])
def test_im2col_then_the_nchw_gemm_is_torchs_conv(n, c_in, c_out, h, w, k, stride, padding):
    torch.manual_seed(c_in * 7 + h + k)
    x, wt, b = torch.randn(n, c_in, h, w), torch.randn(c_out, c_in, k, k), torch.randn(c_out)
    ref = torch.relu(torch.nn.functional.conv2d(x, wt, b, stride, padding))
    oh, ow = ref.shape[2:]
    p = _host_params(c_out, c_in * k * k)
    cols = padded_n(oh * ow, p.nb)
    lib = x86.build(tvm.IRModule({"main": im2col_nchw(n, c_in, h, w, (k, k), stride, padding, cols)}))
    xc = tvm.runtime.tensor(np.zeros((n, c_in * k * k, cols), np.float32))
    lib(tvm.runtime.tensor(x.numpy()), xc)
    xn = xc.numpy()
    assert (xn[:, :, oh * ow:] == 0).all()  # the padded columns
    # the GEMM on the columns: the same kernel as a 1x1 conv over a (C_in * k * k, cols) "image"
    y = _run_conv1x1(torch.from_numpy(xn).reshape(n, c_in * k * k, 1, cols), wt.reshape(c_out, -1, 1, 1), b,
                     "relu", p)
    torch.testing.assert_close(y.reshape(n, c_out, cols)[:, :, :oh * ow].reshape(ref.shape), ref, rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(UnsupportedOpError, match="im2col"):
        im2col_nchw(n, c_in, h, w, (k, k), stride, padding, oh * ow - 1)


def test_dense_conv1x1_without_bias_keeps_nan_and_inf():
    x = torch.randn(2, 8, 3, 5)
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[1, 3, 2, 4] = float("nan"), float("inf"), float("-inf")
    wt = torch.randn(12, 8, 1, 1)
    for act in (None, "relu"):
        y = _run_conv1x1(x, wt, None, act, _host_params(12, 8))
        torch.testing.assert_close(y, _ACT[act](torch.nn.functional.conv2d(x, wt)), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)
    with pytest.raises(UnsupportedOpError, match="multiple of the panel width"):
        x86.schedule_dense_conv1x1(1, 12, 8, 15, bias=False, params=_host_params(12, 8))
    with pytest.raises(KernelBuildError, match="not a multiple of the row tile"):
        x86.schedule_dense_conv1x1(1, 10, 8, 16, bias=False, params=x86.DenseParams(mr=4))


def _run_depthwise(x, w, b, stride, padding, activation):
    """The depthwise kernel with the export's glue: the scheduled zero pad, then the output row padded to tiles."""
    n, c, h, wd = x.shape
    (kh, kw), (ph, pw) = w.shape[2:], padding
    oh, ow = (h + 2 * ph - kh) // stride + 1, (wd + 2 * pw - kw) // stride + 1
    lanes = x86.host_vector_file()[0]
    owp, _ = x86.depthwise_tile(ow, lanes)
    bottom, right = max((oh - 1) * stride + kh - h - ph, 0), max((owp - 1) * stride + kw - wd - pw, 0)
    hp, wp = h + ph + bottom, wd + pw + right
    pad = x86.build(tvm.IRModule({"main": zero_pad_nchw(n, c, h, wd, (ph, bottom, pw, right))}))
    xp = tvm.runtime.tensor(np.zeros((n, c, hp, wp), np.float32))
    pad(tvm.runtime.tensor(x.numpy()), xp)
    lib = x86.build(x86.schedule_depthwise(n, c, hp, wp, (kh, kw), stride, (oh, owp), bias=b is not None,
                                           activation=activation, lanes=lanes))
    args = [xp, tvm.runtime.tensor(w.reshape(c, kh, kw).numpy())] + ([tvm.runtime.tensor(b.numpy())] if b is not None
                                                                      else [])
    y = tvm.runtime.tensor(np.zeros((n, c, oh, owp), np.float32))
    lib(*args, y)
    return torch.from_numpy(y.numpy()[..., :ow])


_CONV_ACT = {None: lambda y: y, "relu": torch.relu, "relu6": lambda y: torch.nn.functional.hardtanh(y, 0.0, 6.0)}


@pytest.mark.parametrize("n,c,h,w,k,stride,padding", [(1, 16, 28, 28, 3, 1, (1, 1)), (1, 24, 29, 17, 3, 2, (1, 1)),
                                                      (2, 5, 7, 7, 3, 2, (1, 1)), (1, 3, 9, 12, 5, 1, (2, 2)),
                                                      (1, 8, 6, 5, 3, 1, (0, 0)), (1, 4, 1, 1, 3, 1, (1, 1))])
@pytest.mark.parametrize("activation", [None, "relu6"])
def test_depthwise_conv_matches_torch(n, c, h, w, k, stride, padding, activation):
    torch.manual_seed(c * 31 + h + k)
    x, wt, b = torch.randn(n, c, h, w), torch.randn(c, 1, k, k), torch.randn(c)
    ref = _CONV_ACT[activation](torch.nn.functional.conv2d(x, wt, b, stride, padding, groups=c))
    torch.testing.assert_close(_run_depthwise(x, wt, b, stride, padding, activation), ref, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_keeps_nan_and_inf_and_refuses_bad_geometry():
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 2, 2], x[0, 1, 5, 5], x[0, 2, 0, 0] = float("nan"), float("inf"), float("-inf")
    wt = torch.randn(3, 1, 3, 3)
    for act in (None, "relu", "relu6"):
        ref = _CONV_ACT[act](torch.nn.functional.conv2d(x, wt, None, 1, 1, groups=3))
        torch.testing.assert_close(_run_depthwise(x, wt, None, 1, (1, 1), act), ref, equal_nan=True)
    with pytest.raises(UnsupportedOpError, match="cannot give"):
        x86.schedule_depthwise(1, 3, 4, 4, (3, 3), 1, (4, 8), bias=False, lanes=8)
    with pytest.raises(KernelBuildError, match="whole number"):
        x86.schedule_depthwise(1, 3, 12, 12, (3, 3), 1, (10, 10), bias=False, lanes=8)
    with pytest.raises(UnsupportedOpError, match="zero pad"):
        zero_pad_nchw(1, 3, 4, 4, (1, -1, 0, 0))


def _run_softmax(x: np.ndarray, lanes: int) -> np.ndarray:
    lib = x86.build(tvm.IRModule({"main": softmax_rows(*x.shape, lanes).with_attr("global_symbol", "main")}))
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    return y.numpy()


@pytest.mark.parametrize("rows,length,lanes", [(1536, 128, 8), (3, 16, 16), (5, 8, 8), (7, 12, 4)])
def test_softmax_matches_torch(rows, length, lanes):
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, length)) * 8).astype(np.float32)
    np.testing.assert_allclose(_run_softmax(x, lanes), torch.softmax(torch.from_numpy(x), -1).numpy(),
                               rtol=2e-6, atol=1e-7)


def test_softmax_ieee_cases_follow_torch():
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    x[0, :5] = -np.inf      # masked scores: exactly 0
    x[1, 3] = np.nan        # NaN row
    x[2, 9] = np.inf        # NaN row
    x[3, :] = -np.inf       # fully masked: NaN, as torch
    x[4, 2] = -1e30
    x[5, 1] = 88.0          # above exp's float32 range before the max is subtracted
    y, ref = _run_softmax(x, 8), torch.softmax(torch.from_numpy(x), -1).numpy()
    assert (np.isnan(y) == np.isnan(ref)).all()
    assert (y[0, :5] == 0).all()
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=2e-6, atol=1e-7)


def test_softmax_refuses_a_ragged_row():
    with pytest.raises(UnsupportedOpError, match="multiple of 8"):
        softmax_rows(4, 12, 8)
