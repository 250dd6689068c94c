"""Activation routing: block detection on small graphs, gate calibration, levels, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import datasets
from sparsecc.errors import DataError, InvalidArgumentError, RoutingError, SparseccError
from sparsecc.ir.capture import capture
from sparsecc.passes import PassContext
from sparsecc.passes.routing import META, CalibrateGates, FindMLPBlocks, check_densities, routed_blocks
from sparsecc.runtime.gated import gate_keep


class MLP(torch.nn.Module):
    """64 → 256 → act → 64 → 10."""

    def __init__(self, act=torch.relu, hidden=256):
        super().__init__()
        self.act = act
        self.up, self.down, self.head = torch.nn.Linear(64, hidden), torch.nn.Linear(hidden, 64), torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


class SwiGLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(32, 96), torch.nn.Linear(32, 96), torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + x


def _graph(model, x):
    return capture(model.eval(), (x,), None)


def test_finds_plain_and_gated_blocks():
    g = _graph(MLP(F.gelu), torch.randn(4, 64))
    FindMLPBlocks().run(g, PassContext())
    marked = {m["name"]: m for _, m in routed_blocks(g)}
    assert list(marked) == ["down"]
    assert marked["down"]["up"] == ["up"] and marked["down"]["activation"] == "gelu"
    assert marked["down"]["neurons"] == 256 and not marked["down"]["gated"]

    g = _graph(SwiGLU(), torch.randn(4, 32))
    FindMLPBlocks(gate="both").run(g, PassContext())
    marked = {m["name"]: m for _, m in routed_blocks(g)}
    assert set(marked) == {"down", "gate", "up"}
    assert marked["down"]["gated"] and marked["down"]["activation"] == "silu"
    assert sorted(marked["down"]["up"]) == ["gate", "up"]
    assert marked["up"]["role"] == "up" and marked["up"]["block"] == "down"


def test_no_block_in_a_linear_chain():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    g = _graph(model, torch.randn(2, 8))
    FindMLPBlocks().run(g, PassContext())
    assert routed_blocks(g) == []
    with pytest.raises(RoutingError, match="no feed-forward block"):
        CalibrateGates(0.5, [torch.randn(2, 8)]).run(g, PassContext(history=[("find_mlp_blocks", False, 0.0)]))
    with pytest.raises(RoutingError, match="no feed-forward block"):
        sparsecc.compile(model, torch.randn(2, 8), activation_density=0.5, calibration=[torch.randn(2, 8)])


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.2, [], [0.5, 0.7], "half", True])
def test_density_outside_the_unit_interval_is_named(bad):
    with pytest.raises(InvalidArgumentError, match="activation densit"):
        check_densities(bad)
    with pytest.raises(InvalidArgumentError):
        sparsecc.compile(MLP().eval(), torch.randn(2, 64), activation_density=bad, calibration=[torch.randn(2, 64)])


def test_calibration_errors_are_named_and_leave_the_model_alone():
    model = MLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="calibration inputs"):
        sparsecc.compile(model, torch.randn(2, 64), activation_density=0.5)
    with pytest.raises(DataError, match="calibration input 1"):
        sparsecc.compile(model, torch.randn(2, 64), activation_density=0.5,
                         calibration=[torch.randn(2, 64), torch.randn(2, 63)])
    with pytest.raises(InvalidArgumentError, match="'down' or 'both'"):
        sparsecc.compile(model, torch.randn(2, 64), activation_density=0.5, calibration=[torch.randn(2, 64)],
                         activation_gate="up")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert issubclass(RoutingError, SparseccError) and issubclass(DataError, SparseccError)


def _digits_batches(n, size, split):
    x, _ = datasets.digits(split)
    x = x.reshape(len(x), -1)
    return [x[i * size:(i + 1) * size] for i in range(n)]


def test_calibrated_density_holds_on_held_out_data():
    """Gate thresholds from the train digits keep the target density ± 2 points of the test digits' activations."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)).eval()
    cal, held = _digits_batches(8, 64, "train"), _digits_batches(4, 64, "test")
    targets = [0.7, 0.5, 0.3, 0.1]
    cm = sparsecc.compile(model, cal[0], activation_density=targets, calibration=cal, measure=False)
    ((name, mod),) = cm.gated_layers()
    with torch.no_grad():
        h = torch.cat([F.gelu(model[0](x)) for x in held])
    for level, d in enumerate(targets):
        assert abs(mod.realized_density(h, level) - d) <= 0.02, (level, mod.realized_density(h, level))


def test_levels_equal_the_gated_model_and_density_one_the_dense_model():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 64)
    cal = [torch.randn(16, 64) for _ in range(6)]
    cm = sparsecc.compile(model, x, activation_density=[1.0, 0.4, 0.2], calibration=cal, measure=False)
    ((name, mod),) = cm.gated_layers()
    assert name == "down" and mod.num_levels == 3
    th = mod.thresholds.reshape(-1).tolist()
    assert th[0] == 0.0 and th[0] <= th[1] <= th[2]
    with torch.no_grad():
        h = torch.relu(model.up(x))
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)  # threshold 0: exact zeros only
        for level, t in enumerate(th):
            # the gated product plus the bias correction: W times the mean of what the gate drops in calibration
            ref = model.head(F.linear(h * gate_keep(h, t), model.down.weight, mod.level_bias(level)))
            torch.testing.assert_close(cm(x, level=level), ref, rtol=1e-5, atol=1e-5)
        hc = torch.cat([torch.relu(model.up(c)) for c in cal])
        for level, t in enumerate(th):
            dropped = torch.where(gate_keep(hc, t), torch.zeros(()), hc).mean(0)
            torch.testing.assert_close(mod.level_bias(level), model.down.bias + model.down.weight @ dropped,
                                       rtol=1e-4, atol=1e-5)
        assert torch.equal(mod.level_bias(0), model.down.bias)  # threshold 0 drops only zeros: no shift
    plain = sparsecc.compile(model, x, activation_density=[1.0, 0.4, 0.2], calibration=cal, measure=False,
                             gate_bias_correction=False)
    with torch.no_grad():
        ref = model.head(F.linear(h * gate_keep(h, th[2]), model.down.weight, model.down.bias))
        torch.testing.assert_close(plain(x, level=2), ref, rtol=1e-5, atol=1e-5)
    assert cm.level == 0  # level= applies to one call
    cm.set_level(2)
    report = cm.report()
    assert cm.level == 2 and "level 2 of 3" in report
    # threshold 0 keeps the ReLU's nonzeros (about half); the other levels keep their targets
    assert re.search(r"calibration density 0\.(4|5)\d/0\.40/0\.20", report)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 3\)"):
        cm.set_level(3)
    with pytest.raises(InvalidArgumentError):
        cm(x, level=-1)
    assert cm.level == 2
    rows = cm.levels(runs=2)
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6) and rows[0]["max_abs_diff"] < 1e-5
    assert rows[0]["realized_density"] >= rows[1]["realized_density"] >= rows[2]["realized_density"]
    assert rows[2]["realized_density"] == pytest.approx(0.2, abs=0.05)
    assert all(r["ms"] > 0 and r["ungated_ms"] > 0 for r in rows)


def test_both_gates_the_up_projection_input_and_shares_weights():
    torch.manual_seed(0)
    model = MLP(F.gelu).eval()
    x = torch.randn(8, 64)
    cal = [torch.randn(8, 64) for _ in range(4)]
    one = sparsecc.compile(model, x, activation_density=0.5, calibration=cal, measure=False, activation_gate="both")
    three = sparsecc.compile(model, x, activation_density=[0.9, 0.5, 0.3], calibration=cal, measure=False,
                             activation_gate="both")
    assert [n for n, _ in three.gated_layers()] == ["up", "down"]
    # the levels share one stored weight; each adds only a bias shift (N floats per layer)
    assert three.weight_bytes <= 1.2 * one.weight_bytes
    assert three.weight_bytes - one.weight_bytes == 4 * 2 * (256 + 64 + 2)  # 2 more levels: shifts, thresholds
    up = dict(three.gated_layers())["up"]
    t_up = float(up.thresholds[2, 0])
    down = dict(three.gated_layers())["down"]
    t_down = float(down.thresholds[2, 0])
    with torch.no_grad():
        h = F.gelu(F.linear(x * gate_keep(x, t_up), model.up.weight, up.level_bias(2)))
        ref = model.head(F.linear(h * gate_keep(h, t_down), model.down.weight, down.level_bias(2)))
        torch.testing.assert_close(three(x, level=2), ref, rtol=1e-5, atol=1e-5)


def test_all_tokens_inactive_and_one_token():
    torch.manual_seed(0)
    model = MLP(F.gelu).eval()
    cal = [torch.randn(1, 64) for _ in range(8)]
    cm = sparsecc.compile(model, cal[0], activation_density=[0.5], calibration=cal, measure=False)
    ((_, mod),) = cm.gated_layers()
    mod.thresholds.fill_(1e30)  # nothing passes the gate: the down projection is its (level's) bias
    with torch.no_grad():
        ref = model.head(mod.level_bias(0).expand(1, 64))
        torch.testing.assert_close(cm(cal[1]), ref, rtol=1e-6, atol=1e-6)


def test_measured_routing_keeps_slow_layers_dense():
    """A tiny block (gated slower than torch at every level) is not routed when routing is measured."""
    model = MLP(torch.relu, hidden=16).eval()
    x = torch.randn(2, 64)
    cm = sparsecc.compile(model, x, activation_density=[0.9], calibration=[x])
    node = next(n for n in cm.graph.graph.nodes if META in n.meta)
    meta = node.meta[META]
    assert "dense_ms" in meta and len(meta["gated_ms"]) == 1
    assert meta["routed"] == (len(cm.gated_layers()) == 1)
    if not meta["routed"]:  # a dense-kept block is the model itself
        assert min(meta["gated_ms"]) > 0.95 * meta["dense_ms"]
        with torch.no_grad():
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_keeps_every_level(tmp_path):
    """One artifact holds the levels (the thresholds are parameters); its outputs equal the module's per level,
    and it is no larger than an artifact of one level (the weights are stored once)."""
    import json

    from sparsecc.errors import ArtifactError

    torch.manual_seed(0)
    model = MLP(F.gelu).eval()
    x = torch.randn(4, 64)
    cal = [torch.randn(4, 64) for _ in range(6)]
    three = sparsecc.compile(model, x, activation_density=[1.0, 0.5, 0.3], calibration=cal, measure=False,
                             activation_gate="both")
    one = sparsecc.compile(model, x, activation_density=0.5, calibration=cal, measure=False, activation_gate="both")
    three.export(tmp_path / "three")
    one.export(tmp_path / "one")
    em = sparsecc.load(tmp_path / "three")
    assert em.num_levels == 3 and sparsecc.load(tmp_path / "one").num_levels == 1
    for level in range(3):
        torch.testing.assert_close(em(x, level=level), three(x, level=level), rtol=1e-5, atol=1e-5)
    assert em.level == 0
    em.set_level(2)
    torch.testing.assert_close(em(x), three(x, level=2), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError):
        em.set_level(3)

    def size(d):
        return sum(f.stat().st_size for f in (tmp_path / d).iterdir() if f.name != "manifest.json")

    assert size("three") <= 1.2 * size("one")
    mf = tmp_path / "three" / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["routing"]["gates"][0]["param"] = 999
    mf.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="routing"):
        sparsecc.load(tmp_path / "three")


def test_calibration_batches_larger_than_the_example_are_cut():
    torch.manual_seed(0)
    model = MLP().eval()
    big = [torch.randn(12, 64) for _ in range(2)]
    small = [b[i:i + 4] for b in big for i in range(0, 12, 4)]
    a = sparsecc.compile(model, torch.randn(4, 64), activation_density=0.3, calibration=big, measure=False)
    b = sparsecc.compile(model, torch.randn(4, 64), activation_density=0.3, calibration=small, measure=False)
    assert torch.equal(a.gated_layers()[0][1].thresholds, b.gated_layers()[0][1].thresholds)
    with pytest.raises(DataError, match="calibration input 0"):  # 10 is not a multiple of 4, the batch is fixed
        sparsecc.compile(model, torch.randn(4, 64), activation_density=0.3, calibration=[torch.randn(10, 64)],
                         dynamic_shapes=None)
    c = sparsecc.compile(model, torch.randn(4, 64), activation_density=0.3, calibration=[torch.randn(10, 64)],
                         measure=False)  # the batch is dynamic (the default): a batch of 10 runs as it is
    assert c.gated_layers()
