"""Layer-wise least-squares reconstruction and the activation-aware score."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecc
from sparsecc.errors import DataError, InvalidSparsityError
from sparsecc.sparsify.patterns import Pattern, as_matrix, mask_from_scores
from sparsecc.sparsify.reconstruct import (InputStatistics, activation_scores, input_patches, output_error,
                                           solve_kept, sparsegpt_keep)


def _stats(mod, xp, xd=None):
    s = InputStatistics(mod)
    s.add(xp, xp if xd is None else xd)
    return s


def test_activation_scores_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # column norms² 10 and 4
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    got = activation_scores(w, _stats(lin, x))
    assert torch.allclose(got, torch.tensor([[10.0, 16.0], [2.5, 36.0]]))


def test_full_mask_recovers_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(200, 6)
    w = torch.randn(4, 6)
    got = solve_kept(w, torch.ones(4, 6, dtype=torch.bool), _stats(lin, x), damp=1e-9)
    assert torch.allclose(got, w, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 10_000))
def test_solution_is_the_least_squares_fit_to_dense_outputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    xd = torch.randn(64, k, generator=g, dtype=torch.float64)
    xp = xd + 0.3 * torch.randn(64, k, generator=g, dtype=torch.float64)  # earlier layers already pruned
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    keep = torch.rand(n, k, generator=g) < 0.5
    got = solve_kept(w, keep, _stats(lin, xp, xd), damp=1e-10)
    assert not got[~keep].any()
    for r in range(n):
        S = keep[r].nonzero().flatten()
        if S.numel() == 0:
            continue
        ref = torch.linalg.lstsq(xp[:, S], xd @ w[r]).solution
        assert torch.allclose(got[r, S], ref, atol=1e-6, rtol=1e-6)


def test_conv_patches_match_the_as_matrix_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 7)
    y = F.conv2d(x, conv.weight, None, stride=2, padding=1)  # (2, 5, 5, 4)
    cols = input_patches(conv, x).float()
    got = (cols @ as_matrix(conv.weight.detach()).T).reshape(2, 5 * 4, 5).permute(0, 2, 1).reshape(y.shape)
    assert torch.allclose(got, y, atol=1e-5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 16, generator=g), torch.zeros(64, 8)) for _ in range(n)]


def _err(model, ref, data):
    with torch.no_grad():
        return sum(float((model(x) - ref(x)).pow(2).mean()) for x, _ in data)


@pytest.mark.parametrize("pattern,block", [("unstructured", None), ("block", (4, 1))])
def test_reconstruction_lowers_output_error_at_the_same_sparsity(pattern, block):
    model, data = _mlp(), _data()
    kw = dict(sparsity=0.75, pattern=pattern, block_shape=block, schedule="oneshot", data=data,
              calib_batches=4, progress=False)
    plain = sparsecc.sparsify(model, data[0][0], method="activation", **kw)
    rec = sparsecc.sparsify(model, data[0][0], method="activation", reconstruct=True, **kw)
    held = _data(12)[8:]
    assert _err(rec.model, model, held) < 0.7 * _err(plain.model, model, held)
    for sp in (plain, rec):
        for m in sp.model.modules():
            if isinstance(m, nn.Linear):
                assert abs(float((m.weight == 0).float().mean()) - 0.75) < 0.02
                if block:  # whole 4x1 blocks are zero or not
                    nz = (m.weight != 0).reshape(m.weight.shape[0] // 4, 4, -1)
                    assert bool((nz.all(1) | ~nz.any(1)).all())
    # the user's model is untouched
    assert float((_mlp()[0].weight - model[0].weight).abs().max().detach()) == 0.0


def test_layerwise_argument_errors():
    model, data = _mlp(), _data()
    with pytest.raises(InvalidSparsityError, match="oneshot"):
        sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="unstructured", reconstruct=True,
                          schedule="gradual", data=data, loss_fn=F.mse_loss, finetune_steps=2, progress=False)
    with pytest.raises(DataError, match="data="):
        sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="unstructured", method="activation",
                          schedule="oneshot", progress=False)
    with pytest.raises(InvalidSparsityError, match="damp"):
        sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="unstructured", reconstruct=True,
                          schedule="oneshot", data=data, damp=0.0, progress=False)


# ---- SparseGPT masks, output error, error-based allocation


def _identity_stats(k, n=100):
    s = InputStatistics(nn.Linear(k, 1))
    s.H = torch.eye(k, dtype=torch.float64) * n
    s.C = s.H.clone()
    s.rows = n
    return s


@pytest.mark.parametrize("pattern", [Pattern("unstructured"), Pattern("block", (4, 1)), Pattern("n:m", n=2, m=4)])
def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_per_column_block(pattern):
    # H ∝ I: no error compensation, U = I/sqrt(n·(1+damp)), so the saliency is w² up to a constant
    torch.manual_seed(0)
    w = torch.randn(8, 24)
    got = sparsegpt_keep(w, _identity_stats(24), 0.25, pattern, column_block=8)
    for c in range(0, 24, 8):
        ref = mask_from_scores(w[:, c:c + 8].pow(2), 0.25, pattern)
        assert torch.equal(got[:, c:c + 8], ref)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(1, 1), (2, 1), (4, 1), (2, 2)]), st.sampled_from([0.1, 0.25, 0.5, 0.9]),
       st.integers(0, 10_000))
def test_sparsegpt_mask_has_the_pattern_and_density(block, density, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(16, 8)
    x = torch.randn(64, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated inputs
    w = torch.randn(8, 16, generator=g)
    pattern = Pattern("block", block) if block != (1, 1) else Pattern("unstructured")
    keep = sparsegpt_keep(w, _stats(lin, x), density, pattern, column_block=8)
    assert keep.shape == w.shape and keep.dtype == torch.bool
    for c in (slice(0, 8), slice(8, 16)):  # the density holds in every column block
        assert int(keep[:, c].sum()) == block[0] * block[1] * round(density * 64 / (block[0] * block[1]))
    nz = keep.reshape(8 // block[0], block[0], 16 // block[1], block[1])
    assert bool((nz.all(3).all(1) | ~nz.any(3).any(1)).all())  # whole blocks


def test_sparsegpt_beats_wanda_on_correlated_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    mix = torch.randn(32, 32) * (torch.rand(32) ** 4)  # strongly correlated, uneven columns
    x = torch.randn(512, 32) @ mix + 0.05 * torch.randn(512, 32)
    w = torch.randn(16, 32)
    s = _stats(lin, x)
    errs = {}
    for name, keep in (("wanda", mask_from_scores(activation_scores(w, s), 0.25, Pattern("unstructured"))),
                       ("sparsegpt", sparsegpt_keep(w, s, 0.25, Pattern("unstructured")))):
        errs[name] = output_error(w, solve_kept(w, keep, s), s)
    assert errs["sparsegpt"] < 0.9 * errs["wanda"], errs


def test_output_error_by_hand():
    s = InputStatistics(nn.Linear(2, 1))
    s.H = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    s.rows = 1
    w = torch.tensor([[1.0, 2.0]])  # ‖Xwᵀ‖² = 4·1 + 1·4 = 8
    assert output_error(w, torch.tensor([[0.0, 2.0]]), s) == pytest.approx(4 / 8)
    assert output_error(w, torch.tensor([[1.0, 0.0]]), s) == pytest.approx(4 / 8)
    assert output_error(w, torch.tensor([[0.5, 2.0]]), s) == pytest.approx(1 / 8)
    assert output_error(torch.zeros(1, 2), torch.zeros(1, 2), s) == 0.0


class _TwoLayers(nn.Module):
    """fc1 sees inputs of rank 1 (one weight per row reproduces it); fc2 sees full-rank ones."""

    def __init__(self, d_in=16, d_hidden=32, d_out=8):
        super().__init__()
        self.d_in = d_in
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x[:, :self.d_in])) + x[:, self.d_in:])


def _rank1_inputs(count, rows, d_in, d_hidden, seed=1):
    """``count`` inputs of :class:`_TwoLayers`: fc1's part of rank 1, the skip part full rank."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(1, d_in, generator=g)
    return [torch.cat([torch.randn(rows, 1, generator=g) @ basis, torch.randn(rows, d_hidden, generator=g)], 1)
            for _ in range(count)]


def test_error_allocation_reaches_the_sparsity_with_less_output_error():
    torch.manual_seed(0)
    model = _TwoLayers()
    data = [(x, torch.zeros(64, 8)) for x in _rank1_inputs(12, 64, 16, 32)]
    kw = dict(sparsity=0.7, pattern="unstructured", schedule="oneshot", data=data[:8], calib_batches=8,
              method="sparsegpt", reconstruct=True, progress=False, densities=(0.1, 0.2, 0.3, 0.5, 0.7))
    uni = sparsecc.sparsify(model, data[0][0], **kw)
    err = sparsecc.sparsify(model, data[0][0], allocation="error", **kw)
    dens = {n: float((m.weight != 0).float().mean()) for n, m in err.model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    kept = sum(int((m.weight != 0).sum()) for m in err.model.modules() if isinstance(m, nn.Linear))
    assert kept / total <= 0.3 + 0.01
    assert dens["fc1"] < 0.3 < dens["fc2"]  # the layer with rank-1 inputs gives up weights to the other
    assert _err(err.model, model, data[8:]) < 0.7 * _err(uni.model, model, data[8:])


def test_error_allocation_argument_errors():
    model, data = _mlp(), _data()
    with pytest.raises(InvalidSparsityError, match="layer-wise"):
        sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="unstructured", allocation="error",
                          schedule="oneshot", data=data, progress=False)
    with pytest.raises(InvalidSparsityError, match="allocation must be one of"):
        sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="unstructured", allocation="errors",
                          schedule="oneshot", data=data, progress=False)


#: sparsify arguments of the layer-wise budget searches below
_BUDGET_SEARCH = dict(pattern="unstructured", method="sparsegpt", reconstruct=True, schedule="oneshot",
                      calib_batches=4, progress=False)


def _cosine_to(model, val):
    """eval_fn: mean cosine of a model's outputs on ``val`` to ``model``'s."""
    with torch.no_grad():
        ref = model(val)

    def eval_fn(m):
        with torch.no_grad():
            return float(F.cosine_similarity(m(val), ref, dim=-1).mean())
    return eval_fn


def test_layerwise_budget_search_returns_the_fastest_uniform_plan_within_the_budget():
    from sparsecc.errors import AccuracyBudgetError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(32, 64, generator=g), torch.zeros(32, 64)) for _ in range(4)]
    eval_fn = _cosine_to(model, torch.randn(256, 64, generator=g))
    kw = dict(_BUDGET_SEARCH, data=data, eval_fn=eval_fn, search_rounds=0)
    res = sparsecc.sparsify(model, data[0][0], accuracy_budget=0.15, **kw)
    assert res.metric_dense - res.metric_sparse <= 0.15 + 1e-9
    runs = res.rounds
    assert runs and all(r["pattern"] == "unstructured" for r in runs)
    passed = [r["sparsity"] for r in runs if r["passed"]]
    failed = [r["sparsity"] for r in runs if not r["passed"]]
    assert passed and (not failed or max(passed) < min(failed))  # bisection: passing sparsities below failing ones
    kept = sum(int((m.weight != 0).sum()) for m in res.model.modules() if isinstance(m, nn.Linear))
    assert abs(1 - kept / (64 * 128 * 2) - max(passed)) < 0.01  # the sparsest passing plan is returned
    for r in runs:  # the measured drop of each probe agrees with its verdict
        assert r["passed"] == (r["drop"] <= 0.15 + 1e-12)
    with pytest.raises(AccuracyBudgetError, match="sparsity 0.3"):
        sparsecc.sparsify(model, data[0][0], accuracy_budget=0.0, **kw)


def _fixed_latency_target():
    """x86 with a static roofline (the constants of a quiet 2-core Zen 3 calibration): predictions that do not
    depend on how busy the machine running the test is."""
    from sparsecc.formats import Candidate
    from sparsecc.targets.x86 import X86Target

    class Target(X86Target):
        def roofline(self):
            return {Candidate("dense"): (23.9, 130.6, 33.6, 0.004), Candidate("xcsr"): (4.0, 69.6, 13.2, 0.044),
                    Candidate("csr", (1, 1)): (3.8, 14.2, 14.2, 0.04)}

    return Target()


def test_layerwise_budget_search_mixes_layers_where_a_uniform_plan_wastes_the_budget():
    torch.manual_seed(0)
    model = _TwoLayers(256, 256, 256)
    xs = _rank1_inputs(6, 128, 256, 256)
    data = [(x, torch.zeros(128, 256)) for x in xs[:4]]
    eval_fn = _cosine_to(model, torch.cat(xs[4:]))
    kw = dict(_BUDGET_SEARCH, data=data, eval_fn=eval_fn, target=_fixed_latency_target())
    uni = sparsecc.sparsify(model, data[0][0], accuracy_budget=0.02, search_rounds=0, **kw)
    mixed = sparsecc.sparsify(model, data[0][0], accuracy_budget=0.02, **kw)
    per_layer = [r for r in mixed.rounds if r["pattern"] == "per layer"]
    assert per_layer and len(per_layer) <= 3
    for r in mixed.rounds:
        assert r["passed"] == (r["drop"] <= 0.02 + 1e-12)
    assert mixed.metric_dense - mixed.metric_sparse <= 0.02 + 1e-12
    assert mixed.metric_sparse == pytest.approx(eval_fn(mixed.model))
    dens = {c.name: c.density for c in mixed.layers}
    uni_dens = {c.name: c.density for c in uni.layers}
    assert uni_dens["fc1"] == pytest.approx(uni_dens["fc2"], abs=0.01)
    # the free layer goes sparser than any uniform plan passing the budget, the sensitive one no sparser
    assert dens["fc1"] < uni_dens["fc1"] - 0.05
    assert dens["fc2"] >= uni_dens["fc2"] - 0.01
    assert mixed.est_speedup >= uni.est_speedup
