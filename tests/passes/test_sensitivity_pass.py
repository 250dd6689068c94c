import torch

from sparsecc.ir.capture import capture
from sparsecc.passes import PassContext, PassManager
from sparsecc.passes.sensitivity import SENSITIVITY_KEY, SensitivityAnalysis
from sparsecc.sparsify.patterns import Pattern


def test_sensitivity_pass_writes_drops_and_restores_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(32, 8)
    graph = capture(model, x)
    ref = graph.gm(x).detach()
    before = [graph.tensor(s.weight).clone() for s in graph.linear_sites()]

    def metric(gm):
        with torch.no_grad():
            return -float((gm(x) - ref).abs().mean())

    cands = [(Pattern("unstructured"), 0.5), (Pattern("unstructured"), 0.0), (Pattern("block", block=(8, 1)), 0.5)]
    out = PassManager([SensitivityAnalysis(metric, cands, tmp_path / "s.json")]).run(graph, PassContext())
    assert out is graph
    sites = graph.linear_sites()
    for s, w in zip(sites, before):
        meta = s.node.meta[SENSITIVITY_KEY]
        assert torch.equal(graph.tensor(s.weight), w)  # analysis only
        assert 0 < meta["unstructured@0.500"] < meta["unstructured@0.000"]
    # 8x1 blocks tile the 16x8 weight but not the 4x16 one
    assert "block 8x1@0.500" in sites[0].node.meta[SENSITIVITY_KEY]
    assert "block 8x1@0.500" not in sites[1].node.meta[SENSITIVITY_KEY]
    # pruning the whole last layer (density 0) leaves only its bias: the drop is measured exactly
    w = graph.tensor(sites[1].weight)
    saved = w.clone()
    with torch.no_grad():
        w.zero_()
    assert sites[1].node.meta[SENSITIVITY_KEY]["unstructured@0.000"] == -metric(graph.gm)
    with torch.no_grad():
        w.copy_(saved)
