"""Kernels on torch's OpenMP pool: the launcher builds, patches a kernel library, stays exact."""

import ctypes
import os
import shutil

import pytest

from sparsecc.cache import KERNELS
import torch
import torch.nn.functional as F

from sparsecc.formats import BlockSparseMatrix
from sparsecc.runtime import kernels, omp_launch
from sparsecc.runtime.kernels import SparseLinear

needs_cc = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")


@needs_cc
def test_launcher_builds_and_kernels_stay_exact_across_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECC_PARALLEL", "omp")
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    KERNELS.clear()
    assert omp_launch.enabled() and omp_launch.launcher_address() is not None
    torch.manual_seed(0)
    w = torch.randn(64, 48) * (torch.rand(4, 48) < 0.3).repeat_interleave(16, 0)
    b = torch.randn(64)
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, (16, 1)), b, "gelu")
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in (1, 37, 256):
                x = torch.randn(m, 48)
                torch.testing.assert_close(mod(x), F.gelu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(old)
        KERNELS.clear()
    lib = ctypes.CDLL(next(str(p) for p in tmp_path.rglob("bsr_16x1_gemm*.so")), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    assert ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch").value == omp_launch.launcher_address()


def test_patch_of_unknown_library_is_refused(tmp_path):
    assert omp_launch.patch_module(str(tmp_path / "missing.so")) is False


def test_default_is_torch_openmp_pool_and_tvm_opts_out(monkeypatch):
    monkeypatch.delenv("SPARSECC_PARALLEL", raising=False)
    assert omp_launch.enabled()
    monkeypatch.setenv("SPARSECC_PARALLEL", "tvm")
    assert not omp_launch.enabled()
