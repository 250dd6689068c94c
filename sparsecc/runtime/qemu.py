"""Sparse linear kernels cross-built for aarch64 and run under qemu-aarch64 (tests and benchmarks of the ARM target).

The packing and the tiled transpose of X are those of the host modules
(:class:`~sparsecc.runtime.nm.NMLinear` built with NEON tiles, never run on the host here).
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecc.runtime.nm import NMLinear
from sparsecc.targets import x86
from sparsecc.targets.arm import (arm_params, arm_target, build_linear_kernel, build_nm_kernel, build_xcsr_kernel,
                                  nm_params)
from sparsecc.targets.qemu import run_under_qemu

__all__ = ["run_linear_under_qemu", "run_nm_linear_under_qemu", "run_xcsr_linear_under_qemu"]


def run_linear_under_qemu(matrix, x, bias=None, activation=None, *, device: str = "arm", static_k: bool = False,
                          repeat: int = 1):
    """``act(x @ W.T + b)`` computed by the cross-built aarch64 kernel under qemu (for tests and benchmarks).

    Parameters
    ----------
    matrix : BlockSparseMatrix
        W: (N, K) in BSR/CSR.
    x : torch.Tensor
        (M, K) float32.
    bias : torch.Tensor, optional
        (N,).
    static_k : bool
        Build for the static K of ``matrix`` (one build per K) instead of a symbolic K.

    Returns
    -------
    y : torch.Tensor
        (M, N).
    time_ms : float or None
        Median emulated time of one call (``repeat > 1``).
    """
    n, k = matrix.shape
    br, bc = matrix.block
    m = x.shape[0]
    regime = x86.regime_for(m)
    mt = arm_params((br, bc), regime).m_tile
    mp = -(-max(m, 1) // mt) * mt
    xp = torch.zeros(mp, k)
    xp[:m] = x
    data, indices = matrix.data.detach().float().contiguous(), matrix.indices.int()
    if data.shape[0] == 0:  # nnzb == 0: as SparseLinear, pass one unread block
        data, indices = torch.zeros(1, br, bc), torch.zeros(1, dtype=torch.int32)
    args = [xp, data, indices, matrix.indptr.int()]
    if bias is not None:
        args.append(bias.detach().float().reshape(n // br, br))
    args.append(np.zeros((mp, n // br, br), np.float32))
    lib = build_linear_kernel((br, bc), regime, bias=bias is not None, activation=activation, device=device,
                              k=k if static_k else None)
    outs, t = run_under_qemu(lib, args, repeat=repeat)
    return torch.from_numpy(outs[-1].reshape(mp, n)[:m].copy()), t




def run_nm_linear_under_qemu(matrix, x, bias=None, activation=None, *, device: str = "arm", repeat: int = 1):
    """``act(x @ W.T + b)`` for an N:M ``matrix`` (NMSparseMatrix, W: (N, K)) by the aarch64 kernel under qemu.

    Packing and the tiled transpose of X are those of :class:`sparsecc.runtime.nm.NMLinear` (built with NEON
    tiles, never run on the host here).

    Returns
    -------
    y : torch.Tensor
        (M, N).
    time_ms : float or None
    """
    params = {r: nm_params(r, device) for r in ("gemv", "gemm")}
    mod = NMLinear(matrix, bias, activation, target=arm_target(device), params=params)
    n_out, k = mod.shape
    rows = x.shape[0]
    regime = x86.regime_for(rows)
    p = mod.params[regime]
    xt = mod.transpose_x(x.reshape(rows, k).contiguous(), p.m_tile)
    mp = xt.shape[0] * p.m_tile
    if p.index == "offset":
        xt = xt.reshape(xt.shape[0], -1)
    meta = getattr(mod, mod.meta_names[regime])
    y4 = torch.zeros(xt.shape[0], p.m_tile, mod.n_padded // mod.r_tile, mod.r_tile)
    args = [xt, mod.values, meta] + ([mod.bias] if mod.bias is not None else []) + [y4]
    lib = build_nm_kernel(mod.n, mod.m, mod.groups, regime, bias=mod.bias is not None, activation=activation,
                          device=device, params=p)
    outs, t = run_under_qemu(lib, args, repeat=repeat)
    y = torch.from_numpy(outs[-1].reshape(mp, mod.n_padded)[:rows, :n_out].copy())
    return y, t


def run_xcsr_linear_under_qemu(matrix, x, bias=None, activation=None, *, device: str = "arm", repeat: int = 1):
    """``act(x @ W.T + b)`` for an unstructured ``matrix`` (RowSparseMatrix, W: (N, K)) by the aarch64 xcsr kernel
    under qemu, with the packing of :class:`sparsecc.runtime.xcsr.XCSRLinear` (the X^T panels below 8 rows
    of X are X itself).

    Returns
    -------
    y : torch.Tensor
        (M, N).
    time_ms : float or None
    """
    from sparsecc.runtime.xcsr import XCSRLinear, pack_xt, params_for

    mod = XCSRLinear(matrix, bias, activation, target=arm_target(device))
    n_out, k = mod.shape
    x2 = x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    p = params_for(mod.params, rows)
    regime = "gemv" if p.m_tile == 1 else "gemm"
    y = torch.zeros(rows, n_out)
    b = mod._buffers
    args = [pack_xt(x2, p.m_tile), b["data"], b["indices"], b["indptr"], b["bias"], y]
    lib = build_xcsr_kernel(regime, activation=activation, index_dtype=mod.index_dtype, device=device, params=p)
    outs, t = run_under_qemu(lib, args, repeat=repeat)
    return torch.from_numpy(outs[-1].reshape(rows, n_out).copy()), t
