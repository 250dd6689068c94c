"""torch's answers for NaN and infinity in a sparse layer's input.

A sparse kernel skips W's zeros, but torch's dense product multiplies them: a NaN or an infinity in
``X[m, k]`` makes ``0 · X[m, k] = NaN`` in every output ``Y[m, n]`` whose weight ``W[n, k]`` is a pruned zero
(and in every output of a conv window that covers it). So each sparse module checks its input with
:func:`all_finite` (one float32 sum, a few microseconds, against the layer's milliseconds) and, where it
finds a NaN or an infinity, runs torch's own op on its weight (:func:`torch_linear`, :func:`torch_conv2d`)
for that call. NaN and infinity in weights and biases need no such path: the kernels multiply every stored
value, and their fused epilogues keep torch's IEEE semantics (:mod:`sparsecc.codegen.linear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsecc.errors import UnsupportedOpError

__all__ = ["all_finite", "torch_activation", "torch_conv2d", "torch_linear"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no infinity.

    One float32 sum: a NaN or an infinity makes it non-finite. A sum that overflows of finite values reads as
    non-finite too, which sends the caller down its exact torch path needlessly, never wrongly.
    """
    return t.numel() == 0 or math.isfinite(float(t.sum()))


def torch_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """torch's op for a fused epilogue name (None, "relu", "gelu" (erf), "relu6" (``hardtanh(0, 6)``))."""
    if activation is None:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu6":
        return F.hardtanh(y, 0.0, 6.0)
    raise UnsupportedOpError(f"activation {activation!r} is not supported; expected None, 'relu', 'gelu' or 'relu6'")


def torch_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None) -> torch.Tensor:
    """``act(x2 @ weight.T + bias)`` in torch: x2 (M, K), weight (N, K) dense with its zeros -> (M, N)."""
    with torch.no_grad():
        return torch_activation(F.linear(x2, weight, bias), activation)


def torch_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 activation: str | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(conv2d(x, weight, bias) [+ residual])`` in torch: x (N, C_in, H, W), weight (C_out, C_in, kh, kw)."""
    with torch.no_grad():
        y = F.conv2d(x, weight, bias, stride, padding)
        if residual is not None:
            y = y + residual
        return torch_activation(y, activation)
