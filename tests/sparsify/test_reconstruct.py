"""Layer-wise least-squares reconstruction and the activation-aware score."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecc
from sparsecc.errors import DataError, InvalidSparsityError
from sparsecc.sparsify.patterns import as_matrix
from sparsecc.sparsify.reconstruct import InputStatistics, activation_scores, _patches, solve_kept


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
    cols = _patches(conv, x).float()
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
