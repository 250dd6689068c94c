"""Knapsack selection and the sensitivity cache."""

import json

import pytest
import torch
from torch import nn

from sparsecc.errors import InvalidSparsityError
from sparsecc.sparsify.patterns import Pattern
from sparsecc.sparsify.select import Option, select_for_sparsity, select_under_budget
from sparsecc.sparsify.sensitivity import option_key, sensitivity_analysis


def _options():
    # layer a: big, sparse kernels help; layer b: small, sensitive
    return {
        "a": [Option("dense", 10.0, 0.0, 1000), Option("u@0.5", 6.0, 0.001, 500), Option("u@0.2", 3.0, 0.004, 200),
              Option("u@0.1", 2.0, 0.02, 100)],
        "b": [Option("dense", 1.0, 0.0, 100), Option("u@0.5", 0.8, 0.003, 50), Option("u@0.2", 0.5, 0.05, 20)],
    }


def test_budget_selection_minimizes_latency_within_budget():
    ch = select_under_budget(_options(), 0.005)
    # feasible combos within 0.005: (a@0.2, b dense)=4.0 ms, (a@0.5, b@0.5)=6.8 ms, ... -> a@0.2, b dense
    assert ch["a"].key == "u@0.2" and ch["b"].key == "dense"
    ch = select_under_budget(_options(), 0.0075)
    assert ch["a"].key == "u@0.2" and ch["b"].key == "u@0.5"  # 0.007 drop, 3.8 ms
    ch = select_under_budget(_options(), 0.0)
    assert ch["a"].key == "dense" and ch["b"].key == "dense"
    with pytest.raises(InvalidSparsityError):
        select_under_budget(_options(), -0.1)


def test_sparsity_selection_least_drop():
    # kept ≤ 0.3 * 1100 = 330: options: a@0.2+b@0.5 (250, drop .007), a@0.1+b dense (200, .02),
    # a@0.2+b dense (300, .004) -> least drop .004
    ch = select_for_sparsity(_options(), 0.7)
    assert (ch["a"].key, ch["b"].key) == ("u@0.2", "dense")
    ch = select_for_sparsity(_options(), 0.85)  # kept ≤ 165: a@0.1 + b@0.5 (150)
    assert (ch["a"].key, ch["b"].key) == ("u@0.1", "u@0.5")
    with pytest.raises(InvalidSparsityError, match="cannot be reached"):
        select_for_sparsity(_options(), 0.95)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_sensitivity_measures_each_layer_alone_and_caches(tmp_path):
    model = _model()
    layers = {"0": model[0], "2": model[2]}
    x = torch.randn(32, 8)
    ref = model(x).detach()
    calls = []

    def metric():
        calls.append(1)
        with torch.no_grad():
            return -float((model(x) - ref).abs().mean())

    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    cands = {n: [(Pattern("unstructured"), 0.5), (Pattern("unstructured"), 0.0)] for n in layers}
    path = tmp_path / "sens.json"
    table = sensitivity_analysis(layers, cands, lambda n, w: w.abs(), metric, path, progress=False)
    assert len(calls) == 1 + 4
    assert table["base"] == 0.0
    d = table["drop"]
    for n in layers:
        assert torch.equal(layers[n].weight, before[n])  # weights restored
        assert 0 < d[n][option_key(Pattern("unstructured"), 0.5)] < d[n][option_key(Pattern("unstructured"), 0.0)]
    # the measured drop equals the metric with that layer pruned alone, by hand
    with torch.no_grad():
        w = layers["2"].weight
        keep = w.abs() >= w.abs().flatten().kthvalue(w.numel() // 2 + 1).values
        w.mul_(keep)
    assert d["2"]["unstructured@0.500"] == pytest.approx(-metric(), rel=1e-5)
    with torch.no_grad():
        w.copy_(before["2"])
    # reload: no evaluation at all, same table; file is complete JSON, no temp files left
    calls.clear()
    again = sensitivity_analysis(layers, cands, lambda n, w: w.abs(), metric, path, progress=False)
    assert calls == [] and again == table
    assert json.loads(path.read_text()) == table
    assert [p.name for p in tmp_path.iterdir()] == ["sens.json"]
    # a new candidate measures only what is missing
    cands["0"].append((Pattern("unstructured"), 0.25))
    sensitivity_analysis(layers, cands, lambda n, w: w.abs(), metric, path, progress=False)
    assert len(calls) == 1


def test_interrupted_sweep_keeps_finished_layers(tmp_path):
    model = _model()
    layers = {"0": model[0], "2": model[2]}
    cands = {n: [(Pattern("unstructured"), 0.5)] for n in layers}
    n_calls = []

    def metric():
        n_calls.append(1)
        if len(n_calls) == 3:  # base, layer 0, then interrupted on layer 2
            raise KeyboardInterrupt
        return 1.0

    path = tmp_path / "s.json"
    with pytest.raises(KeyboardInterrupt):
        sensitivity_analysis(layers, cands, lambda n, w: w.abs(), metric, path, progress=False)
    saved = json.loads(path.read_text())
    assert list(saved["drop"]) == ["0"]
    assert torch.equal(layers["2"].weight, _model()[2].weight)  # restored after the interruption
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


class _TwoLayerProblem:
    """The part of a SparsifyProblem the budget searches read: two 4x4 layers, latency = density."""

    layers = ["a", "b"]
    infos = {"a": ("linear", (4, 4)), "b": ("linear", (4, 4))}

    def latency(self, name, pattern, density):
        return float(density)

    def candidates(self, name):
        return [(Pattern("unstructured"), 0.5), (Pattern("unstructured"), 0.25)]

    from sparsecc.sparsify.problem import SparsifyProblem
    options = SparsifyProblem.options


@pytest.mark.parametrize("mixed_passes", [True, False])
def test_mixed_search_reports_every_measured_plan_and_keeps_the_start_unless_one_passes(mixed_passes):
    from types import SimpleNamespace

    from sparsecc.sparsify.budget import search_mixed_budget

    u = Pattern("unstructured")
    problem = _TwoLayerProblem()
    start = ({"a": (u, 0.5), "b": (u, 0.5)}, SimpleNamespace(metric=0.95))  # measured drop 0.05, pred 1.0 ms
    # a gives up weights for free, b does not: the first mixed plan is a at 0.25, b at 0.5 (pred 0.75 ms)
    errors = {"a": {option_key(u, 0.5): 0.1, option_key(u, 0.25): 0.1},
              "b": {option_key(u, 0.5): 0.1, option_key(u, 0.25): 0.5}}
    runs = []

    def run(plan):
        runs.append(plan)
        return SimpleNamespace(metric=0.93 if mixed_passes else 0.80)

    plan, outcome, rounds = search_mixed_budget(problem, errors, start, 0.1, 1.0, run, search_rounds=3)
    assert runs and len(rounds) == len(runs)  # every measured plan is reported, the start plan never re-run
    assert all(r["pattern"] == "per layer" and r["passed"] == mixed_passes for r in rounds)
    assert rounds[0]["plan"] == {"a": option_key(u, 0.25), "b": option_key(u, 0.5)}
    assert rounds[0]["pred_ms"] == pytest.approx(0.75) and rounds[0]["sparsity"] == pytest.approx(0.625)
    assert rounds[0]["patterns"] == {"unstructured": 2}
    if mixed_passes:
        assert plan["a"][1] == 0.25 and outcome.metric == 0.93
    else:
        assert plan == start[0] and outcome is start[1]
