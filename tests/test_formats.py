"""BlockSparseMatrix round trips and statistics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InvalidSparsityError
from sparsecc.formats import BLOCK_SHAPES, BlockSparseMatrix, block_fill_ratio, count_nonzero_blocks


def _masked(n, k, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    mask = (torch.rand(n // br, k // bc, generator=g) < density)
    mask = mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return torch.randn(n, k, generator=g) * mask


@settings(max_examples=40, deadline=None)
@given(block=st.sampled_from(BLOCK_SHAPES), nb=st.integers(1, 6), kb=st.integers(1, 6),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_round_trip(block, nb, kb, density, seed):
    br, bc = block
    w = torch.randn(nb * br, kb * bc, generator=torch.Generator().manual_seed(seed))
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(seed + 1)) >= density] = 0
    m = BlockSparseMatrix.from_dense(w, block)
    assert torch.equal(m.to_dense(), w)
    assert m.nnzb == count_nonzero_blocks(w, block)
    assert m.indptr[0] == 0 and m.indptr[-1] == m.nnzb
    assert m.data.shape == (m.nnzb, br, bc) and m.data.is_contiguous()
    assert m.indices.dtype == torch.int32 and m.indptr.dtype == torch.int32
    assert m.nnz == m.nnzb * br * bc
    assert m.density == pytest.approx(float((w != 0).sum()) / w.numel())


def test_stats_and_format():
    w = _masked(64, 32, (8, 1), 0.25, 0)
    m = BlockSparseMatrix.from_dense(w, (8, 1))
    assert m.format == "bsr" and BlockSparseMatrix.from_dense(w).format == "csr"
    assert m.nbytes == m.data.numel() * 4 + m.indices.numel() * 4 + m.indptr.numel() * 4
    assert block_fill_ratio(w, (8, 1)) == pytest.approx(1.0)
    assert block_fill_ratio(w, (16, 1)) >= 1.0
    assert block_fill_ratio(torch.zeros(8, 8), (4, 4)) == 1.0


def test_empty_and_full():
    z = BlockSparseMatrix.from_dense(torch.zeros(16, 8), (8, 1))
    assert z.nnzb == 0 and z.density == 0.0 and torch.equal(z.indptr, torch.zeros(3, dtype=torch.int32))
    assert torch.equal(z.to_dense(), torch.zeros(16, 8))
    w = torch.randn(12, 8) + 10.0
    f = BlockSparseMatrix.from_dense(w, (4, 4))
    assert f.nnzb == 6 and f.density == 1.0 and torch.equal(f.to_dense(), w)
    w[4:8] = 0  # empty block row
    e = BlockSparseMatrix.from_dense(w, (4, 1))
    assert e.indptr[2] == e.indptr[1] and torch.equal(e.to_dense(), w)


def test_bad_block_names_shapes():
    with pytest.raises(InvalidSparsityError, match=r"\(10, 8\)"):
        BlockSparseMatrix.from_dense(torch.randn(10, 8), (4, 1))
    with pytest.raises(InvalidSparsityError, match="K=6"):
        count_nonzero_blocks(torch.randn(8, 6), (1, 4))


def test_conversion_is_fast():
    import time
    w = _masked(1536, 384, (8, 1), 0.1, 1)
    t = time.perf_counter()
    for _ in range(10):
        BlockSparseMatrix.from_dense(w, (8, 1))
    assert (time.perf_counter() - t) / 10 < 0.1
    assert not math.isnan(block_fill_ratio(w, (8, 1)))
