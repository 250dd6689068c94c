"""MoE-fied feed-forward blocks: the expert kernels against torch, the clustering and router, the pass, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.errors import InvalidArgumentError, RoutingError
from sparsecc.passes.routing import cluster_neurons, fit_router
from sparsecc.runtime.moe import MoEFFN


def _ffn(d, k, n, experts, top_k, act="gelu", seed=0):
    g = torch.Generator().manual_seed(seed)
    wu, bu = torch.randn(k, d, generator=g) / d ** 0.5, torch.randn(k, generator=g)
    wd, bd = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    perm = torch.randperm(k, generator=g)
    rw, rb = torch.randn(experts, d, generator=g), torch.randn(experts, generator=g)
    return (wu, bu, wd, bd), MoEFFN(wu, bu, wd, bd, act, perm, experts, top_k, rw, rb, name="ffn")


def _reference(ws, mod, x, act):
    wu, bu, wd, bd = ws
    h = F.linear(x, wu, bu)
    h = F.gelu(h) if act == "gelu" else torch.relu(h)
    keep = torch.zeros_like(h, dtype=torch.bool)
    keep[:, mod.perm] = mod.expert_mask(x)  # back to the original neuron order
    return F.linear(h * keep, wd, bd)


@pytest.mark.parametrize("d,k,n,experts,top_k", [(64, 256, 32, 4, 1), (64, 256, 32, 8, 3), (48, 96, 16, 16, 16),
                                                 (384, 1536, 384, 8, 2)])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_expert_kernels_match_torch(d, k, n, experts, top_k, m, act):
    ws, mod = _ffn(d, k, n, experts, top_k, act)
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(mod(x), _reference(ws, mod, x, act), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod.torch_forward(x), _reference(ws, mod, x, act), rtol=1e-5, atol=1e-5)
    assert mod.expert_mask(x).float().mean() == pytest.approx(top_k / experts)


def test_all_experts_is_the_dense_block_and_nan_propagates():
    ws, mod = _ffn(32, 128, 16, 4, 4)
    x = torch.randn(3, 32)
    wu, bu, wd, bd = ws
    torch.testing.assert_close(mod(x), F.linear(F.gelu(F.linear(x, wu, bu)), wd, bd), rtol=1e-4, atol=1e-4)
    x[1, 0] = float("nan")
    y = mod(x)
    assert bool(torch.isnan(y[1]).all()) and not bool(torch.isnan(y[[0, 2]]).any())


def test_clusters_are_balanced_and_group_coactive_neurons():
    torch.manual_seed(0)
    t, groups = 400, 4
    which = torch.randint(groups, (t,))
    h = torch.randn(t, 64) * 0.05
    for gi in range(groups):  # neurons 16·g .. 16·g+15 fire on the tokens of group g
        h[which == gi, gi * 16:(gi + 1) * 16] += 3.0
    perm = cluster_neurons(h[:, torch.randperm(64)], groups)
    assert sorted(perm.tolist()) == list(range(64))
    perm = cluster_neurons(h, groups)
    for e in range(groups):
        owned = set((perm[e * 16:(e + 1) * 16] // 16).tolist())
        assert len(owned) == 1  # each expert is one planted group
    rw, rb = fit_router(torch.nn.functional.one_hot(which, groups).float(), h, perm, groups)
    sel = (torch.nn.functional.one_hot(which, groups).float() @ rw.t() + rb).argmax(1)
    expert_of_group = {int(perm[e * 16] // 16): e for e in range(groups)}
    assert all(int(s) == expert_of_group[int(w)] for s, w in zip(sel, which))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))) + x


def test_compile_moe_and_errors():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32)
    cal = [torch.randn(4, 32) for _ in range(4)]
    cm = sparsecc.compile(model, x, moe=(4, 2), calibration=cal)
    (node,) = [n for n in cm.graph.graph.nodes if n.op == "call_module" and n.target.startswith("sparsecc_moe")]
    mod = cm.graph.gm.get_submodule(node.target)
    assert (mod.experts, mod.top_k) == (4, 2)
    assert 0.5 <= node.meta["sparsecc.routing"]["moe"]["recall"] <= 1.0
    with torch.no_grad():
        torch.testing.assert_close(cm(x), mod.torch_forward(x) + x, rtol=1e-4, atol=1e-4)
    full = sparsecc.compile(model, x, moe=(4, 4), calibration=cal)
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidArgumentError, match="split"):
        sparsecc.compile(model, x, moe=(5, 1), calibration=cal)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        sparsecc.compile(model, x, moe=(4, 5), calibration=cal)
    with pytest.raises(InvalidArgumentError, match="give one"):
        sparsecc.compile(model, x, moe=(4, 1), activation_density=0.5, calibration=cal)
    with pytest.raises(RoutingError, match="no feed-forward block"):
        sparsecc.compile(torch.nn.Linear(32, 32).eval(), x, moe=(4, 1), calibration=cal)


def test_export_moe_matches_the_module(tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32)
    cal = [torch.randn(4, 32) for _ in range(4)]
    cm = sparsecc.compile(model, x, moe=(4, 2), calibration=cal, measure=False)
    em = sparsecc.load(cm.export(tmp_path / "moe"))
    torch.testing.assert_close(em(x), cm(x), rtol=1e-4, atol=1e-4)
