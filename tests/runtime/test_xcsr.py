"""The unstructured kernel family vectorized along M (``xcsr``) against torch, on random and edge shapes."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InputShapeError, InvalidSparsityError
from sparsecc.formats import RowSparseMatrix
from sparsecc.runtime.xcsr import XCSRLinear
from sparsecc.targets.x86_xcsr import XCSRParams
from tests.conftest import check_close


def _weight(n, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 300), m=st.integers(0, 140), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       bias=st.booleans(), act=st.sampled_from([None, "relu", "gelu"]), seed=st.integers(0, 2**16))
def test_matches_torch(n, k, m, density, bias, act, seed):
    w = _weight(n, k, density, seed)
    b = torch.randn(n) if bias else None
    mod = XCSRLinear(RowSparseMatrix.from_dense(w), b, act)
    x = torch.randn(m, k)
    ref = F.linear(x, w, b)
    ref = torch.relu(ref) if act == "relu" else F.gelu(ref) if act == "gelu" else ref
    check_close(mod(x), ref, atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([4, 16, 24]), k=st.integers(1, 200), m=st.integers(8, 70),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), chains=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_accumulator_chains_match_torch(n, k, m, density, chains, seed):
    # rows of odd and even nonzero counts per column block: the tail after the last full set of chains
    w = _weight(n, k, density, seed)
    b = torch.randn(n)
    p = XCSRParams(m_tile=16, row_group=4, k_block=32, chains=chains)
    mod = XCSRLinear(RowSparseMatrix.from_dense(w), b, "relu", params={"gemv": XCSRParams(1, 4, 32), "gemm": p})
    assert f"_c{chains}_" in mod.kernel_name
    x = torch.randn(m, k)
    check_close(mod(x), torch.relu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)


def test_edge_rows_columns_and_leading_dims():
    w = torch.zeros(33, 19)
    w[0, 0] = 2.0    # one nonzero
    w[5, :] = 1.0    # a dense row
    w[:, 7] = -1.0   # a dense column; rows 1-4 and 6-32 otherwise empty
    m = RowSparseMatrix.from_dense(w)
    assert torch.equal(m.to_dense(), w) and m.indices.dtype == torch.int16
    mod = XCSRLinear(m, torch.arange(33.0))
    for shape in ((3, 19), (2, 5, 19), (64, 19), (65, 19), (1, 19)):
        x = torch.randn(*shape)
        check_close(mod(x), F.linear(x, w, torch.arange(33.0)), atol=1e-5, rtol=1e-5)
    nt = x.t().contiguous().t()  # a non-contiguous input
    check_close(mod(nt), F.linear(nt, w, torch.arange(33.0)), atol=1e-5, rtol=1e-5)


def test_wide_k_uses_32_bit_indices_and_small_tiles():
    w = _weight(3, 40000, 0.001, 1)
    m = RowSparseMatrix.from_dense(w)
    assert m.indices.dtype == torch.int32
    mod = XCSRLinear(m, params={"gemv": XCSRParams(1, 4), "gemm": XCSRParams(16, 4)})
    for rows in (2, 20):
        x = torch.randn(rows, 40000)
        check_close(mod(x), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_errors():
    m = RowSparseMatrix.from_dense(_weight(8, 8, 0.5, 0))
    with pytest.raises(InvalidSparsityError, match="RowSparseMatrix"):
        XCSRLinear(torch.zeros(8, 8))
    with pytest.raises(InputShapeError, match=r"bias must have shape \(8,\)"):
        XCSRLinear(m, torch.zeros(3))
    with pytest.raises(InputShapeError, match=r"\(\.\.\., 8\)"):
        XCSRLinear(m)(torch.zeros(2, 9))
    with pytest.raises(InvalidSparsityError, match="k_block"):
        XCSRLinear(m, params={"gemv": XCSRParams(1, 8, 64), "gemm": XCSRParams(64, 16, 128)})


def test_layers_reading_one_tensor_pack_it_once_and_see_in_place_changes():
    from sparsecc.runtime import xcsr

    a, b = (XCSRLinear(RowSparseMatrix.from_dense(_weight(16, 24, 0.4, s))) for s in (1, 2))
    x = torch.randn(70, 24)
    ya = a(x)
    packed = xcsr._LAST.xt
    yb = b(x)
    assert xcsr._LAST.xt is packed  # the second layer reused the panels
    check_close(yb, F.linear(x, b_dense := RowSparseMatrix.from_dense(_weight(16, 24, 0.4, 2)).to_dense()))
    x.mul_(2)  # in place: a new version, so the panels are packed again
    check_close(a(x), 2 * ya, atol=1e-5, rtol=1e-5)
    assert xcsr._LAST.xt is not packed
    check_close(b(x.clone()), 2 * F.linear(x / 2, b_dense), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 150), lead=st.sampled_from([(), (2,)]), act=st.sampled_from([None, "relu", "gelu"]),
       seed=st.integers(0, 2**16))
def test_chained_layers_hand_over_panels_and_match_torch(m, lead, act, seed):
    from sparsecc.runtime import xcsr

    w1, w2 = _weight(48, 40, 0.3, seed), _weight(24, 48, 0.5, seed + 1)
    b1, b2 = torch.randn(48), torch.randn(24)
    up, down = XCSRLinear(RowSparseMatrix.from_dense(w1), b1, act), XCSRLinear(RowSparseMatrix.from_dense(w2), b2)
    assert up.chain_to(down) and not down.chain_to(up)  # K of up is 40, not 24
    x = torch.randn(*lead, m, 40)
    h = up(x)
    if m * (lead[0] if lead else 1) >= 8:
        assert h.dim() == 3 and h.shape[1] == 48  # panels (MT, N, mt)
    y = down(h)
    ref = F.linear(x, w1, b1)
    ref = torch.relu(ref) if act == "relu" else F.gelu(ref) if act == "gelu" else ref
    check_close(y, F.linear(ref, w2, b2), atol=1e-4, rtol=1e-4)
    assert xcsr._HANDOFF.ref is None  # taken
    check_close(down(ref), F.linear(ref, w2, b2), atol=1e-4, rtol=1e-4)  # a plain input still works


def test_compile_chains_the_feed_forward_projections(tmp_path):
    import sparsecc
    from sparsecc.formats import Candidate
    from sparsecc.targets.x86 import X86Target

    class Target(X86Target):  # a roofline under which every layer takes the unstructured kernels
        def roofline(self):
            return {Candidate("dense"): (10.0, 10.0, 10.0, 0.01), Candidate("xcsr"): (1000.0, 1000.0, 1000.0, 0.001)}

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.down(F.gelu(self.up(x))) + x

    torch.manual_seed(0)
    model = FFN().eval()
    x = torch.randn(4, 20, 32)  # M = 80: two panels of 64 rows, the second padded
    cm = sparsecc.compile(model, (x,), target=Target(), sparsity=0.7, pattern="unstructured", measure=False)
    mods = [m for m in cm.graph.gm.modules() if isinstance(m, XCSRLinear)]
    assert len(mods) == 2 and mods[0].next_layer is mods[1] and mods[1].takes_panels
    assert cm.layers[0].kernel.endswith("_po")
    ref = sparsecc.prune(model, 0.7)(x)
    check_close(cm(x), ref, atol=1e-4, rtol=1e-4)
    small = x[:1, :3]  # M = 3: the gather kernels, no hand-off
    cm3 = sparsecc.compile(model, (small,), target=Target(), sparsity=0.7, pattern="unstructured", measure=False)
    check_close(cm3(small), sparsecc.prune(model, 0.7)(small), atol=1e-4, rtol=1e-4)
    loaded = sparsecc.load(cm.export(tmp_path / "ffn"))  # exported layers run standalone
    check_close(loaded(x), ref, atol=1e-4, rtol=1e-4)


def test_column_block_fills_three_quarters_of_l1():
    from sparsecc.targets.x86 import host_l1d_bytes, host_l2_bytes
    from sparsecc.targets.x86_xcsr import column_block, default_xcsr_params

    assert column_block(64, 32 * 1024) == 96     # 24 KiB of a 32 KiB L1 (Zen 3)
    assert column_block(64, 32 * 1024, 512 * 1024) == 96
    assert column_block(64, 48 * 1024) == 128    # capped (Zen 5: 144 would fit)
    assert column_block(64, 16 * 1024) == 32     # floor
    assert column_block(32, 32 * 1024) == 128
    assert column_block(64, 32 * 1024, 1024 * 1024) == 192   # a 1 MiB L2 (Zen 4): 48 KiB of panel
    assert column_block(64, 48 * 1024, 2048 * 1024) == 192
    assert column_block(32, 32 * 1024, 1024 * 1024) == 384
    assert column_block(1024, 32 * 1024, 1024 * 1024) == 32  # never below the floor
    l1, l2 = host_l1d_bytes(), host_l2_bytes()
    assert 4 * 1024 <= l1 <= 4 * 1024 * 1024 and l1 < l2
    gemv, gemm = default_xcsr_params("gemv", l1, l2), default_xcsr_params("gemm", l1, l2)
    assert gemv.k_block == gemm.k_block == column_block(64, l1, l2)  # one storage layout for both regimes
    from sparsecc.targets.x86_xcsr import host_xcsr_params

    assert (host_xcsr_params("gemv"), host_xcsr_params("gemm")) == (gemv, gemm)
    assert XCSRLinear(RowSparseMatrix.from_dense(torch.eye(8)), None).params == {
        "gemv": replace(gemv, row_group=8), "gemm": replace(gemm, row_group=8)}  # N = 8: the largest power of two dividing N
    assert default_xcsr_params("gemm").k_block == 128


@pytest.mark.parametrize("k", [191, 192, 193, 385])
def test_192_column_blocks_match_torch(k):
    w = _weight(40, k, 0.3, k + 1)
    mod = XCSRLinear(RowSparseMatrix.from_dense(w), None, None,
                     params={"gemv": XCSRParams(1, 8, 192), "gemm": XCSRParams(64, 8, 192)})
    for m in (1, 9, 64, 65):
        x = torch.randn(m, k)
        check_close(mod(x), F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [95, 96, 97, 191, 385])
def test_96_column_blocks_match_torch(k):
    # block boundaries not at a power of two, K just below, at and above a multiple of the block
    w = _weight(48, k, 0.4, k)
    b = torch.randn(48)
    mod = XCSRLinear(RowSparseMatrix.from_dense(w), b, "gelu",
                     params={"gemv": XCSRParams(1, 16, 96), "gemm": XCSRParams(64, 16, 96)})
    for m in (1, 5, 64, 130):
        x = torch.randn(m, k)
        check_close(mod(x), F.gelu(F.linear(x, w, b)), atol=1e-4, rtol=1e-4)
