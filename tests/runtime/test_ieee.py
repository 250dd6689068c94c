"""NaN and infinity: every kernel family gives torch's answer, with them in weights, biases and inputs.

Two ways a sparse kernel used to differ from torch, each a case here:

* a fused epilogue that is not IEEE: ``max(v, 0)`` turned a NaN into 0 (``torch.relu(nan)`` is nan), the
  erf polynomial gave ``gelu(+inf) = inf`` where torch's AVX-512 kernel gives nan (its AVX2 kernel gives inf:
  the epilogues follow the host's torch, ``codegen.linear.host_gelu_at_inf``);
* skipping W's zeros: torch's dense product computes ``0 · NaN = NaN`` (and ``0 · inf``), so a NaN or an
  infinity in X reaches every output of its row, not only those with a nonzero weight in its column.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.formats import BlockSparseMatrix, NMSparseMatrix, RowSparseMatrix
from sparsecc.passes.nm import nm_prune_weight
from sparsecc.runtime.conv import SparseConv2d
from sparsecc.runtime.ieee import all_finite, torch_activation
from sparsecc.runtime.kernels import SparseLinear
from sparsecc.runtime.nm import NMLinear
from sparsecc.runtime.xcsr import XCSRLinear

NAN, INF = float("nan"), float("inf")
N, K = 32, 48


def _weight(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    if family == "nm":
        return nm_prune_weight(w, 2, 4)
    if family == "bsr":  # 16x1 blocks, half of them kept
        keep = torch.rand(N // 16, 1, K, generator=g) < 0.5
        return w * keep.expand(N // 16, 16, K).reshape(N, K)
    return w * (torch.rand(N, K, generator=g) < 0.4)


def _linear(family, w, b, act):
    if family == "xcsr":
        return XCSRLinear(RowSparseMatrix.from_dense(w), b, act)
    if family == "nm":
        return NMLinear(NMSparseMatrix.from_dense(w, 2, 4), b, act)
    return SparseLinear(BlockSparseMatrix.from_dense(w, (16, 1) if family == "bsr" else (1, 1)), b, act)


def _same(y, ref):
    # NaN where torch has NaN, the same infinities, finite values within float32 rounding
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4, equal_nan=True)


def _inject(where, value, w, b, x):
    w, b, x = w.clone(), b.clone(), x.clone()
    if where == "weight":
        r, c = (w != 0).nonzero()[3]
        w[r, c] = value
        x[..., c] = x[..., c].abs() + 0.5  # +inf · (positive) = +inf: relu keeps it
    elif where == "bias":
        b[5] = value
    elif where == "input":
        x[..., min(1, x.shape[-2] - 1), 7] = value  # a column that has zero weights in some rows
    elif where == "overflow":  # a finite weight times a finite input overflows to +inf before the epilogue
        r, c = (w != 0).nonzero()[0]
        w[r, c] = 3e38
        x[..., :, c] = 10.0
    return w, b, x


@pytest.mark.parametrize("family", ["xcsr", "csr", "bsr", "nm"])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("where,value", [("weight", NAN), ("weight", INF), ("bias", NAN), ("bias", INF),
                                         ("input", NAN), ("input", INF), ("input", -INF), ("overflow", None)])
@pytest.mark.parametrize("m", [1, 20])
def test_linear_families_propagate_nan_and_inf_as_torch(family, act, where, value, m):
    w, b, x = _inject(where, value, _weight(family), torch.randn(N), torch.randn(m, K))
    ref = torch_activation(F.linear(x, w, b), act)
    assert not all_finite(ref)  # the case puts a NaN or an infinity in torch's output
    _same(_linear(family, w, b, act)(x), ref)


@pytest.mark.parametrize("layout,kernel,padding", [("nhwc", 3, 1), ("nhwc", 1, 0), ("nchw", 1, 0)])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("where,value", [("weight", NAN), ("bias", NAN), ("input", NAN), ("input", INF),
                                         ("input", -INF)])
def test_conv_families_propagate_nan_and_inf_as_torch(layout, kernel, padding, act, where, value):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, kernel, kernel, generator=g)
    w = w * (torch.rand(16, 1, kernel, kernel, generator=g) < 0.5)  # 16x1 blocks of the (C_out, K) matrix
    b, x = torch.randn(16, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    if where == "weight":
        w[tuple(int(v) for v in (w != 0).nonzero()[2])] = value
    elif where == "bias":
        b[3] = value
    else:
        x[1, 2, 3, 4] = value
    conv = SparseConv2d(w, b, padding=padding, activation=act, block=(16, 1), layout=layout)
    ref = torch_activation(F.conv2d(x, w, b, 1, padding), act)
    assert not all_finite(ref)
    _same(conv(x), ref)


def test_conv_residual_with_nan_input_matches_torch():
    w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 1, 3, 3) < 0.5)
    x, r = torch.randn(1, 8, 5, 5), torch.randn(1, 16, 5, 5)
    x[0, 0, 2, 2] = NAN
    conv = SparseConv2d(w, None, padding=1, activation="relu", block=(16, 1), residual=True)
    ref = torch.relu(F.conv2d(x, w, None, 1, 1) + r)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    _same(conv(x, r), ref)


def test_fused_epilogues_of_nan_and_infinities_are_torchs():
    # finite inputs (the kernel runs, not torch's path); the bias carries the special values
    w = torch.eye(K)[:N].contiguous()
    b = torch.zeros(N)
    b[:4] = torch.tensor([INF, -INF, NAN, -3.0])
    x = torch.randn(24, K)
    for family in ("xcsr", "csr", "nm"):
        wf = nm_prune_weight(w, 2, 4) if family == "nm" else w
        for act in ("relu", "gelu"):
            ref = torch_activation(F.linear(x, wf, b), act)
            assert torch.isnan(ref[:, 2]).all() and (torch.isinf(ref[:, 0]).all() if act == "relu" else True)
            _same(_linear(family, wf, b, act)(x), ref)


def test_chained_xcsr_pair_passes_nan_from_the_first_layer_to_torch_semantics():
    from sparsecc.runtime.xcsr import _HANDOFF

    w1, w2 = _weight("xcsr", 1), _weight("xcsr", 2)[:, :N].contiguous()
    first = XCSRLinear(RowSparseMatrix.from_dense(w1), torch.randn(N), "gelu")
    second = XCSRLinear(RowSparseMatrix.from_dense(w2), None)
    assert first.chain_to(second)
    x = torch.randn(40, K)
    w1n = w1.clone()
    r, c = (w1 != 0).nonzero()[0]
    w1n[r, c] = NAN  # the first layer's output has a NaN column: the second layer sees NaN in X
    first = XCSRLinear(RowSparseMatrix.from_dense(w1n), first.bias, "gelu")
    assert first.chain_to(second)
    ref = F.linear(F.gelu(F.linear(x, w1n, first.bias)), w2)
    _same(second(first(x)), ref)
    assert _HANDOFF.ref is None


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 40), rows=st.lists(st.integers(0, 39), min_size=1, max_size=3),
       cols=st.lists(st.integers(0, K - 1), min_size=1, max_size=3),
       value=st.sampled_from([NAN, INF, -INF]), family=st.sampled_from(["xcsr", "csr", "nm"]))
def test_non_finite_inputs_anywhere_match_torch(m, rows, cols, value, family):
    w, b = _weight(family, 3), torch.randn(N)
    x = torch.randn(m, K)
    for r, c in zip(rows, cols):
        x[r % m, c] = value
    ref = torch.relu(F.linear(x, w, b))
    assert not all_finite(ref) or value == -INF  # relu(-inf) may leave every output finite
    _same(_linear(family, w, b, "relu")(x), ref)


def test_compiled_model_gives_torchs_answer_for_nan_and_inf_inputs():
    import sparsecc

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 768), torch.nn.ReLU(), torch.nn.Linear(768, 384),
                                torch.nn.GELU(), torch.nn.Linear(384, 16)).eval()
    x = torch.randn(128, 384)
    # 16x1 blocks: sparse on every host's cost model (unstructured CSR may stay dense on AVX2 hosts)
    cm = sparsecc.compile(model, (x,), target="x86", sparsity=0.9, pattern="block", block_shape=(16, 1),
                          measure=False)
    ref_model = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    assert {a.format for a in cm.layers} - {"dense"}  # sparse kernels run
    for value in (NAN, INF, -INF):
        xb = x.clone()
        xb[3, 5] = value
        with torch.no_grad():
            _same(cm(xb), ref_model(xb))
    assert not all_finite(ref_model(xb))
