"""Shared test helpers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sparsecc.formats import BlockSparseMatrix
from sparsecc.tune.cost_model import CostModel, KernelCalibration, candidate_key

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


class FakeTarget:
    """A target with a hand-set cost model and torch kernels: tests passes without TVM.

    Dense runs at 100 GFLOP/s; CSR at 10; BSR at 60 (any block). Overhead 0.01 ms.
    """

    name = "fake"

    def __init__(self, csr_gflops=10.0, bsr_gflops=60.0, dense_gflops=100.0):
        from sparsecc.formats import BLOCK_SHAPES

        ks = {"dense": KernelCalibration(dense_gflops, dense_gflops, 30.0, 0.01)}
        for b in BLOCK_SHAPES:
            g = csr_gflops if b == (1, 1) else bsr_gflops
            ks[candidate_key("csr" if b == (1, 1) else "bsr", b)] = KernelCalibration(g, g, 30.0, 0.01)
        self._cm = CostModel(ks, "hand-set")

    def cost_model(self):
        return self._cm

    def make_linear(self, matrix, bias=None, activation=None):
        return TorchSparseLinear(matrix, bias, activation)

    def describe(self):
        return "fake"

    def prune_block(self, shapes, density, m):
        return (8, 1)


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
