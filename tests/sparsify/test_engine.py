"""The engine's objects composed by hand: same result as the keyword API, schedule hooks, allocations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.errors import InvalidSparsityError
from sparsecc.sparsify.allocation import Global, Uniform
from sparsecc.sparsify.engine import PruningEngine, Training, run_sparsify
from sparsecc.sparsify.patterns import UNSTRUCTURED, Pattern
from sparsecc.sparsify.problem import build_problem
from sparsecc.sparsify.schedules import Gradual, OneShot, cubic_sparsity
from sparsecc.sparsify.scores import MagnitudeScore, MovementScore
from sparsecc.sparsify.select import Option, plan_from_choice
from tests.conftest import FakeTarget


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    y = (x[:, :3].sum(1) > 0).long()
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return model, x, data


def _problem(model, x, data, sparsity, importance=MagnitudeScore):
    return build_problem(model, x[:4], target=FakeTarget(), sparsity=sparsity, pattern="unstructured",
                         densities=(0.5, 0.2), importance=importance, data=data, loss_fn=F.cross_entropy,
                         progress=False)


def test_driver_with_objects_matches_the_keyword_api():
    model, x, data = _setup()
    kw = sparsecc.sparsify(model, x[:4], target=FakeTarget(), sparsity=0.75, pattern="unstructured",
                           method="movement", schedule="gradual", allocation="global", data=data,
                           loss_fn=F.cross_entropy, finetune_steps=12, prune_events=3, lr=1e-3, progress=False)
    done = run_sparsify(_problem(model, x, data, 0.75, MovementScore), schedule=Gradual(3, 0.7),
                        allocation=Global(), training=Training(steps=12, lr=1e-3))
    for (k, a), (_, b) in zip(kw.model.state_dict().items(), done.outcome.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in kw.history] == [h["loss"] for h in done.outcome.history]
    assert {c.name: c.density for c in kw.layers} == done.outcome.densities
    kept = sum(d * done.outcome.model.get_submodule(n).weight.numel() for n, d in done.outcome.densities.items())
    assert kept == pytest.approx(0.25 * (16 * 32 + 32 * 8), abs=1.0)


class _Recorder(OneShot):
    def __init__(self):
        self.calls = []

    def prune_initial(self, engine):
        self.calls.append(("initial", engine.density()))
        super().prune_initial(engine)

    def start(self, steps):
        self.calls.append(("start", steps))

    def before_step(self, engine, t):
        self.calls.append(("before", t))

    def after_backward(self, engine, t, optimizer):
        self.calls.append(("after", t))

    def finish(self, engine):
        self.calls.append(("finish", engine.density()))


def test_schedule_hooks_run_around_every_step():
    model, x, data = _setup()
    rec = _Recorder()
    done = run_sparsify(_problem(model, x, data, 0.5), schedule=rec, allocation=Uniform(),
                        training=Training(steps=3))
    assert rec.calls == [("initial", 1.0), ("start", 3), ("before", 0), ("after", 0), ("before", 1),
                         ("after", 1), ("before", 2), ("after", 2), ("finish", 0.5)]
    assert done.outcome.densities == {"0": 0.5, "2": 0.5}
    assert [h["density"] for h in done.outcome.history] == [0.5, 0.5, 0.5]


def test_gradual_densities_follow_the_cubic_schedule():
    g = Gradual(prune_events=4, prune_fraction=0.5)
    g.start(80)  # pruning over the first 40 steps: 4 events, every 10 steps
    assert (g.n_events, g.frequency, sorted(g.events)) == (4, 10, [0, 10, 20, 30, 40])
    plan = {"a": (UNSTRUCTURED, 0.2), "b": (Pattern("n:m", n=2, m=4), 0.5)}
    assert g.densities_at(plan, 0) == {"a": pytest.approx(1.0), "b": 0.5}
    assert g.densities_at(plan, 15)["a"] == pytest.approx(1.0 - cubic_sparsity(15, 0.8, n_steps=4, frequency=10))
    assert g.densities_at(plan, 15)["a"] == pytest.approx(1.0 - (0.8 - 0.8 * 0.75 ** 3))
    assert g.densities_at(plan, 40)["a"] == pytest.approx(0.2)


def test_global_threshold_densities_keep_the_overall_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(10.0)
    eng = PruningEngine(model, {"0": (UNSTRUCTURED, 0.5), "1": (UNSTRUCTURED, 0.5)}, MagnitudeScore(),
                        allocation=Global(), progress=False)
    dens = Global.threshold_densities(eng, 0.5)
    assert dens["0"] * 128 + dens["1"] * 64 == pytest.approx(96.0)
    assert dens == {"0": 0.75, "1": 0.0}  # 96 kept weights, all from the 10x larger layer
    eng.prune_to_density({"0": 0.5, "1": 0.5})
    assert eng.finish() == {"0": 0.75, "1": 0.0}


def test_plan_from_choice_and_allocation_checks():
    choice = {"a": Option("dense", 1.0, 0.0, 10), "b": Option("block 8x1@0.200", 0.5, 0.1, 2),
              "c": Option("2:4@0.500", 0.7, 0.0, 5)}
    assert plan_from_choice(choice) == {"b": (Pattern("block", block=(8, 1)), 0.2),
                                        "c": (Pattern("n:m", n=2, m=4), 0.5)}
    model, x, data = _setup()
    with pytest.raises(InvalidSparsityError, match="allocation='uniform' needs sparsity="):
        sparsecc.sparsify(model, x[:4], target=FakeTarget(), accuracy_budget=0.1, pattern="unstructured",
                          allocation="uniform", schedule="oneshot", eval_fn=lambda m: 1.0, progress=False)
    with pytest.raises(InvalidSparsityError, match="N:M patterns fix every layer's density"):
        Global().check(build_problem(model, x[:4], target=FakeTarget(), sparsity=0.5, pattern="2:4",
                                     densities=(0.5,), importance=MagnitudeScore))
