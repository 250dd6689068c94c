"""Global allocation and the budget search on small models (no TVM: FakeTarget)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.errors import AccuracyBudgetError
from tests.conftest import FakeTarget


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        m[0].weight.mul_(10.0)  # layer 0 has 10x larger weights than layer 2
    return m


def test_global_allocation_one_threshold_over_layers():
    m = _model()
    sp = sparsecc.sparsify(m, torch.randn(4, 16), target=FakeTarget(), sparsity=0.5, pattern="unstructured",
                           schedule="oneshot", allocation="global", progress=False)
    d = {c.name: c.density for c in sp.layers}
    assert sp.sparsity == pytest.approx(0.5, abs=1e-3)
    # 768 weights, 384 kept: all from the large-magnitude layer (512 * 0.75); the small one is emptied
    assert d["0"] == pytest.approx(0.75) and d["2"] == 0.0
    # and the kept weights are exactly those above one global threshold
    w0, w2 = sp.model[0].weight, sp.model[2].weight
    kept = torch.cat([w0[w0 != 0].abs(), w2[w2 != 0].abs()])
    pruned = torch.cat([m[0].weight[w0 == 0].abs(), m[2].weight[w2 == 0].abs()])
    assert float(kept.min()) >= float(pruned.max())
    uni = sparsecc.sparsify(m, torch.randn(4, 16), target=FakeTarget(), sparsity=0.5, pattern="unstructured",
                            schedule="oneshot", allocation="uniform", progress=False)
    assert all(c.density == pytest.approx(0.5) for c in uni.layers)


def test_budget_search_keeps_the_measured_drop_within_budget(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(256, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    acc = lambda mod: float((mod(x).argmax(1) == y).float().mean())  # noqa: E731
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    sp = sparsecc.sparsify(m, x[:4], target=FakeTarget(csr_gflops=200.0), accuracy_budget=0.02, pattern="unstructured",
                           schedule="oneshot", data=data, loss_fn=F.cross_entropy, eval_fn=acc, finetune_steps=20,
                           lr=1e-3, progress=False, cache_dir=tmp_path)
    assert acc(m) - acc(sp.model) <= 0.02 + 1e-9
    assert sp.metric_dense - sp.metric_sparse <= 0.02 + 1e-9
    assert sp.sparsity > 0.5
    assert sp.rounds and min(r["drop"] for r in sp.rounds) <= 0.02
    # a budget nothing meets: the error gives the drops
    with pytest.raises(AccuracyBudgetError, match="accuracy_budget=-0.5|≥ 0"):
        sparsecc.sparsify(m, x[:4], target=FakeTarget(), accuracy_budget=-0.5, eval_fn=acc)
