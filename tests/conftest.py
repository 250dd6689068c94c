"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparsecc.formats import BSR, CSR, BlockSparseMatrix, Candidate
from sparsecc.targets import Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TorchSparseLinear(torch.nn.Module):
    """Reference kernel module for pass tests: runs the BSR matrix densely in torch."""

    def __init__(self, matrix: BlockSparseMatrix, bias=None, activation=None):
        super().__init__()
        self.register_buffer("w", matrix.to_dense())
        self.bias = bias
        self.activation = activation
        self.kernel_name = f"ref_{matrix.format}_{matrix.block[0]}x{matrix.block[1]}"

    def forward(self, x):
        y = F.linear(x, self.w, self.bias)
        if self.activation == "relu":
            y = torch.relu(y)
        elif self.activation == "gelu":
            y = F.gelu(y)
        return y


class FakeTarget(Target):
    """A target with a hand-set roofline and torch kernels: tests passes without TVM.

    Dense runs at 100 GFLOP/s; CSR at 10; BSR at 60 (any block). Overhead 0.01 ms.
    Its kernel modules (:class:`TorchSparseLinear`) are registered for the target kind ``"fake"``.
    """

    name = "fake"
    kind = "fake"
    layer_formats = {"linear": frozenset({"csr", "bsr"})}

    def __init__(self, csr_gflops=10.0, bsr_gflops=60.0, dense_gflops=100.0):
        self._roofline = {Candidate("dense"): (dense_gflops, dense_gflops, 30.0, 0.01)}
        for fmt, g in ((CSR, csr_gflops), (BSR, bsr_gflops)):
            for c in fmt.calibration_candidates():
                self._roofline[c] = (g, g, 30.0, 0.01)

    def roofline(self):
        return self._roofline

    def tvm_target(self):
        return None

    def describe(self):
        return "fake"

    def cache_key(self):
        return "fake"


@CSR.register_module("fake")
@BSR.register_module("fake")
def _fake_linear(matrix, bias=None, activation=None, target=None, tuning_db=None):
    return TorchSparseLinear(matrix, bias, activation)


@pytest.fixture
def fake_target():
    return FakeTarget()


def check_close(actual, expected, atol=1e-4, rtol=1e-4):
    """Assert two (nested) outputs are numerically equal within tolerances; return max abs diff."""
    if isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        return float((actual - expected).detach().abs().max()) if expected.numel() else 0.0
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        return max([check_close(a, e, atol, rtol) for a, e in zip(actual, expected)] or [0.0])
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        return max([check_close(actual[k], expected[k], atol, rtol) for k in expected.keys()] or [0.0])
    assert actual == expected
    return 0.0


class MLP(torch.nn.Module):
    def __init__(self, d_in=32, hidden=64, d_out=16):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()
