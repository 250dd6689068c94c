import networkx as nx
import pytest
import torch

from sparsecc.errors import CaptureError, InputDtypeError, InputShapeError
from sparsecc.ir import capture, get_annotation


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor value: both torch.export and torch.fx refuse it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class ExportHostile(torch.nn.Module):
    """Calls a Python function torch.export cannot trace through (numpy round trip), fx can."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * _np_scale(x)


@torch.fx.wrap
def _np_scale(x):
    return torch.from_numpy(x.detach().numpy() * 0 + 2.0)[..., :1]


def test_export_capture_finds_linears_and_specs(mlp):
    x = torch.randn(4, 32)
    g = capture(mlp, (x,))
    assert g.method == "export"
    names = [s.name for s in g.linear_sites()]
    assert names == ["fc1", "fc2", "fc3"]
    assert g.tensor(g.linear_sites()[0].weight).shape == (64, 32)
    assert g.input_specs[0].shape == (4, 32)
    torch.testing.assert_close(g.gm(x), mlp(x))


def test_capture_never_shares_parameters(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    w = g.tensor(g.site("fc1").weight)
    assert w.data_ptr() != mlp.fc1.weight.data_ptr()
    g.set_tensor(g.site("fc1").weight, torch.zeros_like(w))
    assert float(mlp.fc1.weight.detach().abs().sum()) > 0


def test_dynamic_batch_dim_is_unconstrained(mlp):
    b = torch.export.Dim("batch")
    g = capture(mlp, (torch.randn(4, 32),), dynamic_shapes=({0: b},))
    assert g.input_specs[0].shape == (None, 32)
    g.check_inputs((torch.randn(9, 32),), {})
    with pytest.raises(InputShapeError, match=r"\((\*|\d+\.\.), 32\)"):
        g.check_inputs((torch.randn(9, 31),), {})


def test_input_checks_name_expected_shape_and_dtype(mlp):
    g = capture(mlp, (torch.randn(4, 32),))
    with pytest.raises(InputShapeError, match=r"expected shape \(4, 32\)"):
        g.check_inputs((torch.randn(5, 32),), {})
    with pytest.raises(InputDtypeError, match="float64"):
        g.check_inputs((torch.randn(4, 32, dtype=torch.float64),), {})
    with pytest.raises(InputShapeError, match="expected 1 tensor inputs"):
        g.check_inputs((torch.randn(4, 32), torch.randn(1)), {})


def test_fx_fallback_when_export_fails():
    torch.manual_seed(0)
    m = ExportHostile().eval()
    x = torch.randn(3, 8)
    g = capture(m, (x,))
    assert g.method == "fx"
    assert [s.name for s in g.linear_sites()] == ["fc"]
    torch.testing.assert_close(g.gm(x), m(x))


def test_capture_error_names_both_failures():
    with pytest.raises(CaptureError, match="symbolic_trace"):
        capture(DataDependent(), (torch.randn(2, 8),))
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_networkx_view_and_table(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    nxg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(nxg)
    lin = [s.node.name for s in g.linear_sites()]
    assert nx.has_path(nxg, lin[0], lin[2])
    assert nxg.number_of_nodes() == len(g.graph.nodes)
    table = g.table()
    assert table.splitlines()[0].split()[:3] == ["node", "op", "shape"]
    assert "(2, 64)" in table
    assert get_annotation(g.linear_sites()[0].node) is None
