"""N:M format, TensorIR template and NMLinear kernels against torch (random and edge shapes)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InputShapeError, InvalidSparsityError, UnsupportedOpError
from sparsecc.formats import NMSparseMatrix, is_nm_sparse
from sparsecc.sparsify.patterns import nm_keep


def nm_weight(n_out, k, n, m, seed=0, zero_rows=(), zero_groups=()):
    """Random W (N, K) with at most n nonzeros per m columns (K padded for the mask, then cut)."""
    g = torch.Generator().manual_seed(seed)
    kp = -(-k // m) * m
    w = torch.randn(n_out, kp, generator=g)
    w = (w * nm_keep(w.abs() + 1e-3, n, m))[:, :k].contiguous()
    for r in zero_rows:
        w[r] = 0
    for r, gi in zero_groups:
        w[r, gi * m:(gi + 1) * m] = 0
    return w


def reference(x, w, b, act):
    y = F.linear(x, w, b)
    return torch.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y


# -- format --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n_out=st.integers(1, 9), k=st.integers(1, 13), nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (3, 4)]),
       seed=st.integers(0, 2 ** 16), drop=st.floats(0.0, 1.0))
def test_format_round_trip(n_out, k, nm, seed, drop):
    n, m = nm
    w = nm_weight(n_out, k, n, m, seed)
    w = w * (torch.rand(n_out, k, generator=torch.Generator().manual_seed(seed + 1)) >= drop)  # more zeros
    mat = NMSparseMatrix.from_dense(w, n, m)
    assert torch.equal(mat.to_dense(), w)
    g = -(-k // m)
    assert mat.values.shape == (n_out, g * n) and mat.meta.shape == (n_out, g)
    pos = mat.positions()
    assert int(pos.max()) < m
    assert bool((pos[..., 1:] > pos[..., :-1]).all())  # distinct, increasing within a group
    assert int(mat.columns().max()) < g * m
    assert mat.density == pytest.approx(float((w != 0).sum()) / (n_out * k))
    assert is_nm_sparse(w, n, m)


def test_format_packing_bits():
    w = torch.zeros(1, 8)
    w[0, 1], w[0, 3], w[0, 4] = 1.0, 2.0, 3.0  # group 0: positions 1, 3; group 1: position 0 (+ a zero slot)
    mat = NMSparseMatrix.from_dense(w, 2, 4)
    assert mat.meta.dtype == torch.uint8
    assert int(mat.meta[0, 0]) == 1 | (3 << 2)
    assert mat.positions()[0, 1].tolist() == [0, 1]  # the zero slot takes the lowest free position
    assert mat.values.tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert mat.nbytes == 4 * 4 + 2


def test_format_rejects_dense_groups():
    w = torch.ones(3, 10)
    w[:2] = nm_weight(2, 10, 2, 4)
    with pytest.raises(InvalidSparsityError, match=r"not 2:4 sparse: row 2, columns 0\.\.3 hold 4 nonzeros"):
        NMSparseMatrix.from_dense(w, 2, 4)
    with pytest.raises(InvalidSparsityError, match="0 < n < m"):
        NMSparseMatrix.from_dense(w, 4, 4)
    with pytest.raises(InvalidSparsityError, match="2-d"):
        NMSparseMatrix.from_dense(torch.zeros(4), 2, 4)
    assert not is_nm_sparse(w, 2, 4)


def test_format_edges():
    z = NMSparseMatrix.from_dense(torch.zeros(5, 7), 2, 4)  # density 0, K not divisible by m
    assert z.density == 0.0 and torch.equal(z.to_dense(), torch.zeros(5, 7))
    full = nm_weight(4, 8, 2, 4, zero_rows=[1])
    mat = NMSparseMatrix.from_dense(full, 2, 4)
    assert mat.density == pytest.approx(0.5 * 3 / 4)  # 2:4 everywhere but the empty row
    assert torch.equal(mat.to_dense(), full)
    last = torch.zeros(2, 5)
    last[:, 4] = 1.0  # the last group has one real column and three padding columns
    m1 = NMSparseMatrix.from_dense(last, 2, 4)
    assert torch.equal(m1.to_dense(), last)


# -- template ------------------------------------------------------------------------

def test_template_structure_and_errors():
    from sparsecc.codegen.nm import nm_linear

    f = nm_linear(2, 4, 3, bias=True, activation="relu", m_tile=4, r_tile=8)
    assert len(f.params) == 5 and [int(v) for v in f.attrs["sparsecc.nm"]] == [2, 4]
    text = f.script()
    for name in ('"row"', '"init"', '"compute"', '"epilogue"'):
        assert name in text
    assert '"int16"' in text
    assert '"uint8"' in nm_linear(2, 4, 3, index="packed").script()
    with pytest.raises(UnsupportedOpError, match="tanh"):
        nm_linear(2, 4, 3, activation="tanh")
    with pytest.raises(UnsupportedOpError, match="index mode"):
        nm_linear(2, 4, 3, index="csr")
    with pytest.raises(UnsupportedOpError, match="0 < n < m"):
        nm_linear(4, 4, 3)


@pytest.mark.parametrize("index", ["column", "packed"])
def test_unscheduled_template_numerics(index):
    import tvm

    from sparsecc.codegen.nm import nm_linear
    from sparsecc.runtime.nm import pack_nm

    w = nm_weight(16, 10, 2, 4, seed=3, zero_rows=[5], zero_groups=[(2, 1)])
    b = torch.randn(16)
    mat = NMSparseMatrix.from_dense(w, 2, 4)
    v, p = pack_nm(mat, 8, index)
    lib = tvm.compile(nm_linear(2, 4, mat.groups, bias=True, activation="gelu", m_tile=4, r_tile=8, index=index),
                      target={"kind": "llvm"})
    x = torch.randn(8, 10)
    xt = torch.zeros(2, 12, 4)
    xt[:, :10, :] = x.view(2, 4, 10).transpose(1, 2)
    y = torch.empty(8, 16)
    lib["main"](xt, v, p, b.view(2, 8), y.view(2, 4, 2, 8))
    torch.testing.assert_close(y, reference(x, w, b, "gelu"), atol=1e-5, rtol=1e-5)


# -- scheduled kernels through NMLinear ----------------------------------------------

@pytest.fixture(scope="module")
def nm_case():
    """A 2:4 weight with an odd N, K not divisible by 4 nor the vector width, empty rows and all-zero groups."""
    w = nm_weight(13, 22, 2, 4, seed=1, zero_rows=[0, 7], zero_groups=[(3, 0), (3, 5), (12, 2)])
    return w, torch.randn(13)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 40])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_nmlinear_matches_torch(nm_case, m, act):
    from sparsecc.runtime.nm import NMLinear

    w, b = nm_case
    mod = NMLinear(NMSparseMatrix.from_dense(w, 2, 4), b, activation=act)
    x = torch.randn(m, 22)
    torch.testing.assert_close(mod(x), reference(x, w, b, act), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nm", [(1, 4), (2, 4)])
def test_nmlinear_relu_no_bias_bert_width(nm):
    from sparsecc.runtime.nm import NMLinear

    n, m = nm
    w = nm_weight(48, 96, n, m, seed=2, zero_rows=[4])
    mod = NMLinear(NMSparseMatrix.from_dense(w, n, m), None, activation="relu", eager=True)
    for rows in (2, 24):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(mod(x), reference(x, w, None, "relu"), atol=1e-4, rtol=1e-4)


def test_nmlinear_density_zero():
    from sparsecc.runtime.nm import NMLinear

    b = torch.randn(13)
    zero = NMLinear(NMSparseMatrix.from_dense(torch.zeros(13, 22), 2, 4), b)
    x = torch.randn(9, 22)
    torch.testing.assert_close(zero(x), b.expand(9, 13))


@pytest.mark.parametrize("index", ["column", "packed", "offset", "permute8", "permute_kblock"])
def test_nmlinear_other_templates(index):
    """The X^T template's index modes (the fallback without AVX2) and the AVX2-width permute template."""
    from sparsecc.runtime.nm import NMLinear
    from sparsecc.targets.x86_nm import NMScheduleParams

    b = torch.randn(13)
    w = nm_weight(13, 22, 2, 4, seed=4, zero_rows=[2])
    if index == "permute8":
        params = {"gemv": NMScheduleParams(1, 8, "permute"), "gemm": NMScheduleParams(4, 8, "permute")}
    elif index == "permute_kblock":  # 3 chunks of 8 columns, k_block 2 -> 1 (the largest divisor of 3 below 2)
        params = {"gemv": NMScheduleParams(1, 8, "permute"), "gemm": NMScheduleParams(4, 8, "permute", True, 2)}
    else:
        params = {"gemv": NMScheduleParams(1, 8, index), "gemm": NMScheduleParams(16, 8, index)}
    mod = NMLinear(NMSparseMatrix.from_dense(w, 2, 4), b, params=params)
    for rows in (1, 9):
        x = torch.randn(rows, 22)
        torch.testing.assert_close(mod(x), F.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_nmlinear_batched_inputs(nm_case):
    """(B, S, K) with a shared weight: folded into M = B*S, non-contiguous and B*S not a multiple of the tile."""
    from sparsecc.runtime.nm import NMLinear

    w, b = nm_case
    mod = NMLinear(NMSparseMatrix.from_dense(w, 2, 4), b)
    x = torch.randn(3, 7, 22)  # M = 21
    torch.testing.assert_close(mod(x), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    xt = torch.randn(7, 3, 22).transpose(0, 1)  # non-contiguous (B, S, K)
    assert not xt.is_contiguous()
    torch.testing.assert_close(mod(xt), F.linear(xt, w, b), atol=1e-4, rtol=1e-4)
    xs = torch.randn(2, 5, 44)[..., ::2]  # strided last dim
    torch.testing.assert_close(mod(xs), F.linear(xs, w, b), atol=1e-4, rtol=1e-4)
    assert mod(torch.randn(0, 4, 22)).shape == (0, 4, 13)
    with pytest.raises(InputShapeError, match=r"\(\.\.\., 22\)"):
        mod(torch.randn(2, 21))
    with pytest.raises(InputShapeError, match="bias"):
        NMLinear(NMSparseMatrix.from_dense(w, 2, 4), torch.randn(12))
    with pytest.raises(InvalidSparsityError, match="NMSparseMatrix"):
        NMLinear(w)


def test_sparse_linear_batched_inputs():
    """SparseLinear (BSR) folds (B, S, K) the same way, non-contiguous inputs included."""
    from sparsecc.formats import BlockSparseMatrix
    from sparsecc.runtime.kernels import SparseLinear

    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 24, generator=g) * (torch.rand(2, 24, generator=g) < 0.4).repeat_interleave(16, 0)
    b = torch.randn(32, generator=g)
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, (16, 1)), b)
    for x in (torch.randn(3, 7, 24), torch.randn(7, 3, 24).transpose(0, 1), torch.randn(2, 1, 5, 24)):
        torch.testing.assert_close(mod(x), F.linear(x, w, b), atol=1e-4, rtol=1e-4)


def _vector_bits():
    from sparsecc.targets.x86 import target_vector_bits

    return target_vector_bits()


@pytest.mark.parametrize("k_block", [0, 2, 3])
def test_permute_k_blocks(k_block):
    """K split into blocks of vector chunks (partial sums kept in Y) gives the same result, gelu epilogue included."""
    from sparsecc.runtime.nm import NMLinear
    from sparsecc.targets.x86_nm import NMScheduleParams, effective_k_block

    if _vector_bits() < 512:
        pytest.skip("16-lane permute kernels need AVX-512")
    assert effective_k_block(6, 4) == 3 and effective_k_block(6, 6) == 0 and effective_k_block(5, 2) == 1
    w = nm_weight(32, 90, 2, 4, seed=6, zero_rows=[3], zero_groups=[(5, 0), (5, 22)])  # 96 = 6 chunks of 16
    b = torch.randn(32)
    params = {"gemv": NMScheduleParams(1, 16, "permute"), "gemm": NMScheduleParams(4, 16, "permute", True, k_block)}
    mod = NMLinear(NMSparseMatrix.from_dense(w, 2, 4), b, activation="gelu", params=params)
    x = torch.randn(2, 9, 90)  # M = 18: padded to a multiple of 4
    torch.testing.assert_close(mod(x), reference(x, w, b, "gelu"), atol=1e-4, rtol=1e-4)
