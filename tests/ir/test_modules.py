"""Re-modularization of exported programs: linear and conv2d calls on graph-held weights become modules again."""

from __future__ import annotations

import pytest
import torch

import sparsecc
from sparsecc.ir.modules import modules_from_program


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.body = torch.nn.Sequential(torch.nn.Linear(8 * 4 * 4, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.scale = torch.nn.Parameter(torch.randn(16))  # read by a mul, not a layer
        self.register_buffer("shift", torch.randn(16))

    def forward(self, x):
        h = self.conv(x).relu().flatten(1)
        return {"y": self.body(h) * self.scale + self.shift, "h": h}


@pytest.fixture
def program():
    torch.manual_seed(0)
    model = Net().eval()
    return model, torch.export.export(model, (torch.randn(2, 3, 8, 8),))


def test_program_layers_become_modules(program):
    model, ep = program
    gm = modules_from_program(ep)
    kinds = {n: type(m).__name__ for n, m in gm.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert kinds == {"conv": "Conv2d", "body.0": "Linear", "body.2": "Linear"}
    assert gm.conv.stride == (2, 2) and gm.conv.padding == (1, 1)
    x = torch.randn(2, 3, 8, 8)
    out, ref = gm(x), model(x)
    assert set(out) == {"y", "h"}  # the program's output structure is kept
    for k in ref:
        assert torch.equal(out[k], ref[k])
    assert torch.equal(gm.scale, model.scale) and torch.equal(gm.shift, model.shift)
    gm.get_submodule("body.0").weight.data.zero_()  # a copy: the program's weights are untouched
    assert torch.count_nonzero(ep.state_dict["body.0.weight"]) > 0


def test_compile_takes_a_program_and_prunes_it(program):
    model, ep = program
    x = torch.randn(2, 3, 8, 8)
    cm = sparsecc.compile(ep, x, sparsity=0.8, dynamic_shapes=None)
    pruned = {a.name: a for a in cm.layers}
    assert {"body.0", "body.2"} <= set(pruned)
    assert all(abs(a.density - 0.2) < 0.02 for a in cm.layers if a.name.startswith("body"))
    ref = sparsecc.prune(model, 0.8)(x)
    out = cm(x)
    assert torch.allclose(out["y"], ref["y"], atol=1e-4) and torch.allclose(out["h"], ref["h"], atol=1e-4)
