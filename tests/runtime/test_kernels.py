"""Compiled kernels against torch F.linear: every format, regime, bias, activation, edge shapes."""

import os

import pytest

from sparsecc.cache import KERNELS
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InputDtypeError, InputShapeError
from sparsecc.formats import BLOCK_SHAPES, BlockSparseMatrix
from sparsecc.runtime import kernels
from sparsecc.runtime.kernels import SparseLinear, get_linear_kernel


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    old = os.environ.get("SPARSECC_CACHE_DIR")
    os.environ["SPARSECC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kcache"))
    yield
    if old is None:
        os.environ.pop("SPARSECC_CACHE_DIR", None)
    else:
        os.environ["SPARSECC_CACHE_DIR"] = old


def _weight(n, k, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    mask = (torch.rand(n // br, k // bc, generator=g) < density).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return torch.randn(n, k, generator=g) * mask


def _ref(x, w, b, act):
    y = F.linear(x, w, b)
    return torch.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y


def check_kernel(mod, x, w, b, act):
    y = mod(x)
    ref = _ref(x, w, b, act)
    tol = 1e-4 * max(1.0, w.shape[1] / 64) ** 0.5
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("block", BLOCK_SHAPES)
@pytest.mark.parametrize("bias,act", [(True, None), (False, "relu"), (True, "gelu")])
def test_every_kernel_all_regimes(block, bias, act):
    br, bc = block
    n, k = 6 * br * (2 if br == 1 else 1), 5 * bc * (3 if bc == 1 else 1)
    w = _weight(n, k, block, 0.4, seed=n + k)
    w[:br] = 0  # an empty block row
    b = torch.randn(n) if bias else None
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, block), b, act)
    for m in (0, 1, 7, 8, 33):
        check_kernel(mod, torch.randn(m, k), w, b, act)


@pytest.mark.parametrize("block", [(1, 1), (8, 1), (4, 4)])
def test_density_zero_and_one(block):
    br, bc = block
    n, k = 4 * br, 3 * bc
    b = torch.randn(n)
    z = SparseLinear(BlockSparseMatrix.from_dense(torch.zeros(n, k), block), b)
    x = torch.randn(9, k)
    torch.testing.assert_close(z(x), b.expand(9, n))
    w = torch.randn(n, k) + 5.0
    full = SparseLinear(BlockSparseMatrix.from_dense(w, block), b)
    for m in (1, 9):
        check_kernel(full, torch.randn(m, k), w, b, None)


def test_noncontiguous_misaligned_and_batched_inputs():
    w = _weight(32, 24, (8, 1), 0.5)
    b = torch.randn(32)
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, (8, 1)), b, "relu")
    base = torch.randn(40, 25)
    x = base[:, 1:]  # misaligned rows, not contiguous
    assert x.data_ptr() % 64 != 0
    check_kernel(mod, x, w, b, "relu")
    check_kernel(mod, torch.randn(24, 40).t(), w, b, "relu")  # transposed view
    flat = torch.randn(24 * 9 + 1)[1:].view(9, 24)  # contiguous but misaligned
    check_kernel(mod, flat, w, b, "relu")
    x3 = torch.randn(2, 5, 24)
    y3 = mod(x3)
    assert y3.shape == (2, 5, 32)
    torch.testing.assert_close(y3, _ref(x3, w, b, "relu"), atol=1e-4, rtol=1e-4)
    assert mod(torch.randn(0, 3, 24)).shape == (0, 3, 32)


def test_odd_csr_shapes():
    for n, k in ((1, 1), (7, 13), (31, 5)):
        w = _weight(n, k, (1, 1), 0.6, seed=n * k)
        mod = SparseLinear(BlockSparseMatrix.from_dense(w, (1, 1)), None)
        for m in (1, 8, 33):
            check_kernel(mod, torch.randn(m, k), w, None, None)


def test_input_errors_name_expected_and_got():
    mod = SparseLinear(BlockSparseMatrix.from_dense(_weight(8, 8, (8, 1), 1.0), (8, 1)), None)
    with pytest.raises(InputShapeError, match=r"\(\.\.\., 8\).*\(3, 9\)"):
        mod(torch.randn(3, 9))
    with pytest.raises(InputDtypeError, match="float64"):
        mod(torch.randn(3, 8, dtype=torch.float64))


def test_module_metadata_and_alignment():
    w = _weight(32, 16, (16, 1), 0.5)
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, (16, 1)), torch.randn(32), "gelu")
    assert mod.kernel_name == "bsr_16x1_gemm_bias_gelu"
    r = repr(mod)
    assert "(32, 16)" in r and "(16, 1)" in r and "bsr" in r and "density" in r
    for t in (mod.data, mod.indices, mod.indptr, mod.bias):
        assert t.data_ptr() % 64 == 0
    y = torch.empty(33, 32)
    assert y.data_ptr() % 64 == 0  # torch's CPU allocator aligns to 64 bytes


def test_kernel_cache_memory_and_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    KERNELS.clear()
    f1 = get_linear_kernel((4, 1), "gemv", False, None)
    assert get_linear_kernel((4, 1), "gemv", False, None) is f1
    files = list((tmp_path / "kernels" / "host").glob("bsr_4x1_gemv-*.so"))
    assert len(files) == 1
    KERNELS.clear()
    f2 = get_linear_kernel((4, 1), "gemv", False, None)  # loaded from disk
    assert f2 is not f1 and len(list((tmp_path / "kernels" / "host").glob("*.so"))) == 1
    w = _weight(8, 4, (4, 1), 1.0)
    x = torch.randn(3, 4)
    m = BlockSparseMatrix.from_dense(w, (4, 1))
    y = torch.empty(3, 8)
    f2(x, m.data, m.indices, m.indptr, y.view(3, 2, 4))
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(block=st.sampled_from(BLOCK_SHAPES), nb=st.integers(1, 5), kb=st.integers(1, 7),
       m=st.integers(0, 20), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_kernels_hypothesis(block, nb, kb, m, density, seed):
    br, bc = block
    w = _weight(nb * br, kb * bc, block, density, seed)
    b = torch.randn(nb * br, generator=torch.Generator().manual_seed(seed))
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, block), b)
    check_kernel(mod, torch.randn(m, kb * bc, generator=torch.Generator().manual_seed(seed + 1)), w, b, None)


def test_interleaved_ms_times_every_function_in_turn():
    import time

    from sparsecc.runtime.timing import interleaved_ms

    calls = []
    fns = {"slow": lambda x: (calls.append("slow"), time.sleep(0.002)), "fast": lambda x: calls.append("fast")}
    t = interleaved_ms(fns, 1, runs=5, warmup=1)
    assert calls == ["slow", "fast"] * 6  # warm-up round, then 5 interleaved rounds
    assert t["slow"] >= 2.0 and t["fast"] < 1.0
