"""Pass infrastructure: instruments around every pass, ensures checked after a pass."""

import pytest
import torch

from sparsecc.errors import PassError
from sparsecc.ir import capture
from sparsecc.passes import (DetectSparsity, MagnitudePrune, Pass, PassContext, PassInstrument, PassManager,
                             PassResult)
from tests.conftest import FakeTarget


class Recorder(PassInstrument):
    def __init__(self):
        self.events = []

    def before_pass(self, index, p, graph, ctx):
        self.events.append(("before", index, p.name))

    def after_pass(self, index, p, result, seconds, ctx):
        self.events.append(("after", index, p.name, result.modified, seconds >= 0))


def test_instruments_see_every_pass_and_timing_fills_history(mlp, tmp_path):
    rec = Recorder()
    ctx = PassContext(target=FakeTarget(), instruments=[rec], dump_dir=tmp_path)
    g = capture(mlp, (torch.randn(4, 32),))
    PassManager([MagnitudePrune(0.5), DetectSparsity()]).run(g, ctx)
    assert rec.events == [("before", 0, "magnitude_prune"), ("after", 0, "magnitude_prune", True, True),
                          ("before", 1, "detect_sparsity"), ("after", 1, "detect_sparsity", False, True)]
    assert [h[0] for h in ctx.history] == ["magnitude_prune", "detect_sparsity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_magnitude_prune.txt", "01_detect_sparsity.txt"]


def test_ensures_failure_names_the_pass(mlp):
    class Broken(Pass):
        name = "broken"

        def run(self, graph, ctx):
            return PassResult(graph, False)

        def ensures(self, graph):
            raise PassError(f"pass {self.name!r} left a plain linear")

    g = capture(mlp, (torch.randn(4, 32),))
    with pytest.raises(PassError, match="'broken' left a plain linear"):
        PassManager([Broken()]).run(g, PassContext(target=FakeTarget()))
