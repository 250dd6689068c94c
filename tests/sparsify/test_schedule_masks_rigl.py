"""Cubic schedule values, masks through optimizer steps, RigL density, ERK, regularizers."""

import math

import pytest
import torch
from torch import nn

from sparsecc.errors import InvalidSparsityError
from sparsecc.sparsify.masks import attach_masks, prunable_layers, set_capture, set_mask, strip_masks
from sparsecc.sparsify.patterns import Pattern
from sparsecc.sparsify.allocation import erk_densities
from sparsecc.sparsify.regularizers import regularization_penalty
from sparsecc.sparsify.schedules import cubic_sparsity, rigl_drop_fraction, rigl_update


def test_cubic_schedule_values():
    # s_t = s_f + (s_i - s_f)(1 - k/n)^3 with s_i = 0, s_f = 0.8, n = 4, Δt = 10, t0 = 5
    kw = dict(initial=0.0, start=5, n_steps=4, frequency=10)
    assert cubic_sparsity(0, 0.8, **kw) == 0.0
    assert cubic_sparsity(5, 0.8, **kw) == pytest.approx(0.0)
    assert cubic_sparsity(14, 0.8, **kw) == pytest.approx(0.0)            # held until the next step
    assert cubic_sparsity(15, 0.8, **kw) == pytest.approx(0.8 - 0.8 * 0.75 ** 3)   # 0.4625
    assert cubic_sparsity(25, 0.8, **kw) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)    # 0.7
    assert cubic_sparsity(35, 0.8, **kw) == pytest.approx(0.8 - 0.8 * 0.25 ** 3)   # 0.7875
    assert cubic_sparsity(45, 0.8, **kw) == pytest.approx(0.8)
    assert cubic_sparsity(1000, 0.8, **kw) == pytest.approx(0.8)
    assert cubic_sparsity(15, 0.9, initial=0.5, start=5, n_steps=4, frequency=10) == pytest.approx(
        0.9 + (0.5 - 0.9) * 0.75 ** 3)
    with pytest.raises(InvalidSparsityError):
        cubic_sparsity(0, 0.8, n_steps=0)


def test_rigl_drop_fraction_cosine():
    assert rigl_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert rigl_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl_drop_fraction(100, 0.3, 100) == 0.0


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def test_masks_stay_applied_through_optimizer_steps():
    model = _tiny()
    layers = prunable_layers(model)
    assert list(layers) == ["0", "3"]
    attach_masks(layers)
    keep = {n: torch.rand_like(m.weight) > 0.7 for n, m in layers.items()}
    for n, m in layers.items():
        set_mask(m, keep[n])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)  # momentum would revive zeros if masks leaked
    x = torch.randn(8, 2, 5, 5)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        for n, m in layers.items():
            g = m.parametrizations.weight.original.grad
            assert (g[~keep[n]] == 0).all()  # pruned weights get no gradient
        opt.step()
        for n, m in layers.items():
            assert (m.weight[~keep[n]] == 0).all()
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    strip_masks(layers)
    sd = model.state_dict()
    assert set(sd) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # the user's names, no parametrizations
    for n, m in layers.items():
        assert torch.equal(m.weight, before[n]) and (m.weight[~keep[n]] == 0).all()
        assert int((m.weight != 0).sum()) == int(keep[n].sum())


def test_mask_records_the_dense_gradient():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    masks = attach_masks({"l": lin})
    set_mask(lin, torch.tensor([[True, False, True], [False, True, True]]))
    set_capture(masks, True)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lin(x).sum().backward()
    # d(sum(W x))/dW = x for every row, before masking
    assert masks["l"].dense_grad.tolist() == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    assert lin.parametrizations.weight.original.grad.tolist() == [[1.0, 0.0, 3.0], [0.0, 2.0, 3.0]]


@pytest.mark.parametrize("pattern", [Pattern("unstructured"), Pattern("block", block=(2, 1)), Pattern("channel")])
def test_rigl_keeps_density_constant(pattern):
    torch.manual_seed(1)
    w = torch.randn(8, 6)
    mask = torch.zeros(8, 6)
    mask[:4] = 1.0  # rows 0..3 active
    grad = torch.randn(8, 6)
    for frac in (0.0, 0.1, 0.3, 0.5, 1.0):
        new, grown = rigl_update(w * mask, mask, grad, frac, pattern)
        assert float(new.sum()) == float(mask.sum())
        assert ((grown == 1) <= (new == 1)).all()  # grown weights are active
    new, grown = rigl_update(w * mask, mask, grad, 0.5, Pattern("unstructured"))
    # the 12 active weights of lowest |w| are dropped, and 12 of highest |grad| grown among the rest
    active = (w * mask).abs().flatten()
    dropped = set(torch.topk(torch.where(mask.flatten() > 0, active, torch.full_like(active, math.inf)),
                             12, largest=False).indices.tolist())
    assert all(new.flatten()[i] == 0 or grown.flatten()[i] == 1 for i in dropped)
    assert int(grown.sum()) == 12


def test_rigl_refuses_nm():
    with pytest.raises(InvalidSparsityError, match="N:M"):
        rigl_update(torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 4), 0.1, Pattern("n:m", n=2, m=4))


def test_erk_densities_hit_the_overall_density():
    shapes = {"conv1": (32, 1, 5, 5), "conv2": (64, 32, 3, 3), "fc1": (512, 3136), "fc2": (10, 512)}
    d = erk_densities(shapes, 0.2)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(d[n] * math.prod(s) for n, s in shapes.items())
    assert kept / total == pytest.approx(0.2, rel=1e-9)
    assert d["conv1"] == 1.0  # tiny first layer stays dense
    assert d["fc1"] < d["conv2"] < 1.0
    # raw ERK ratio between two non-saturated layers: (Σdims/Πdims) ratio
    r = (sum(shapes["fc1"]) / math.prod(shapes["fc1"])) / (sum(shapes["conv2"]) / math.prod(shapes["conv2"]))
    assert d["fc1"] / d["conv2"] == pytest.approx(r)


def test_regularizers_by_hand():
    w = {"a": torch.tensor([[3.0, -4.0], [0.0, 1.0]])}
    assert float(regularization_penalty("l1", w, Pattern("unstructured"))) == 8.0
    # group lasso over 1x2 blocks (rows here): ||(3,-4)|| + ||(0,1)|| = 5 + 1
    assert float(regularization_penalty("group_lasso", w, Pattern("block", block=(1, 2)))) == pytest.approx(6.0)
    # over columns (2x1 blocks): ||(3,0)|| + ||(-4,1)||
    assert float(regularization_penalty("group_lasso", w, Pattern("block", block=(2, 1)))) == pytest.approx(
        3.0 + math.sqrt(17.0))
    assert float(regularization_penalty("none", w, Pattern("unstructured"))) == 0.0
    with pytest.raises(InvalidSparsityError):
        regularization_penalty("l2", w, Pattern("unstructured"))
