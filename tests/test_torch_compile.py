"""torch.compile(backend="sparsecc"), dynamic batch by default, and CompiledModule as an nn.Module."""

import io
import pickle
import warnings

import pytest
import torch

import sparsecc
from sparsecc import dynamo
from sparsecc.errors import FallbackWarning, InputShapeError, InvalidArgumentError, NotPicklableError
from tests.conftest import MLP, check_close

OPTS = {"sparsity": 0.9, "pattern": "block", "block_shape": (16, 1), "measure": False}


def _sparse(cm):
    return [a for a in cm.layers if a.format in ("csr", "bsr")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    dynamo.reset()
    yield
    torch._dynamo.reset()
    dynamo.reset()


def test_backend_is_found_by_name_and_matches_sparsecc_compile():
    """The entry point registers "sparsecc"; outputs equal sparsecc.compile's; layers keep the model's names."""
    assert "sparsecc" in torch._dynamo.list_backends(exclude_tags=())
    torch.manual_seed(0)
    model = MLP(128, 512, 64).eval()
    x = torch.randn(4, 128)
    compiled = torch.compile(model, backend="sparsecc", options=OPTS)
    with torch.no_grad():
        y = compiled(x)
    cm = sparsecc.compile(model, x, **OPTS)
    check_close(y, cm(x), atol=1e-5, rtol=1e-5)
    check_close(y, sparsecc.prune(model, 0.9, block_shape=(16, 1))(x), atol=1e-4, rtol=1e-4)
    last = dynamo.sparsecc_backend.last
    assert [a.name for a in last.layers] == [a.name for a in cm.layers] == ["fc1", "fc2", "fc3"]
    assert _sparse(last), last.report()
    assert dynamo.STATS["compiled"] == 1


def test_new_batch_sizes_reuse_the_compiled_formats():
    """dynamo specializes the first call; the dynamic re-trace keeps the formats (nothing timed again), and
    further sizes reuse the dynamic module."""
    torch.manual_seed(0)
    model = MLP(128, 512, 64).eval()
    ref = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    compiled = torch.compile(model, backend="sparsecc", options=OPTS)
    with torch.no_grad():
        for b in (4, 8, 3, 1, 17):
            x = torch.randn(b, 128)
            check_close(compiled(x), ref(x), atol=1e-4, rtol=1e-4)
    assert dynamo.STATS["compiled"] <= 2, dynamo.STATS
    modules = [cm for entry in dynamo._CACHE.values() for cm in entry.modules]
    assert len(modules) == dynamo.STATS["compiled"]
    for later in modules[1:]:
        assert all("kept from the earlier compile" in a.reason for a in later.layers), later.report()
        assert [a.format for a in later.layers] == [a.format for a in modules[0].layers]


def test_graph_break_regions_run_and_unprunable_graphs_fall_back_to_eager():
    torch.manual_seed(0)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 256)
            self.b = torch.nn.Linear(256, 32)

        def forward(self, x):
            h = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return torch.sigmoid(self.b(h)) * 2

    model = Broken().eval()
    x = torch.randn(5, 64)
    compiled = torch.compile(model, backend="sparsecc", options=OPTS)
    with torch.no_grad():
        y = compiled(x)
    check_close(y, sparsecc.prune(model, 0.9, block_shape=(16, 1))(x), atol=1e-4, rtol=1e-4)
    assert dynamo.STATS["graphs"] == 2 and dynamo.STATS["compiled"] == 2

    with pytest.warns(FallbackWarning, match="eager"):
        f = torch.compile(lambda t: torch.tanh(t) + 1, backend="sparsecc")
        check_close(f(x), torch.tanh(x) + 1, atol=0, rtol=0)


def test_unknown_option_is_refused():
    compiled = torch.compile(MLP(8, 16, 4).eval(), backend="sparsecc", options={"sparsty": 0.5})
    with pytest.raises(Exception, match="unknown sparsecc backend option.*sparsty"):
        compiled(torch.randn(2, 8))


def test_compile_makes_the_batch_dynamic_by_default_even_from_batch_one():
    torch.manual_seed(0)
    model = MLP(64, 256, 32).eval()
    cm = sparsecc.compile(model, torch.randn(1, 64), sparsity=0.9, pattern="block", block_shape=(16, 1),
                          measure=False)
    assert cm.graph.input_specs[0].shape == (None, 64)
    ref = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    for b in (1, 2, 9, 64):
        x = torch.randn(b, 64)
        check_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(InputShapeError, match=r"\(0\.\., 64\)"):
        cm(torch.randn(3, 65))
    static = sparsecc.compile(model, torch.randn(4, 64), dynamic_shapes=None, measure=False)
    with pytest.raises(InputShapeError, match=r"expected shape \(4, 64\)"):
        static(torch.randn(3, 64))
    with pytest.raises(InvalidArgumentError, match="dynamic_shapes"):
        sparsecc.compile(model, torch.randn(4, 64), dynamic_shapes="batch")


def test_token_inputs_get_a_dynamic_sequence_dim():
    from sparsecc.ir.capture import auto_dynamic_shapes

    ids = torch.zeros(2, 16, dtype=torch.long)
    spec = auto_dynamic_shapes(torch.nn.Identity(), (), {"input_ids": ids, "x": torch.randn(2, 16)})
    assert set(spec["input_ids"]) == {0, 1} and set(spec["x"]) == {0}


def test_compiled_module_is_an_nn_module_with_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = MLP(128, 512, 64).eval()
    x = torch.randn(4, 128)
    cm = sparsecc.compile(model, x, **OPTS)
    assert isinstance(cm, torch.nn.Module) and cm.eval() is cm and cm.to("cpu") is cm
    keys = list(cm.state_dict())
    assert any(k.endswith(".indptr") for k in keys) and any(k.endswith(".data") for k in keys), keys
    other = MLP(128, 512, 64).eval()  # other values on the same nonzeros, compiled to the same formats
    with torch.no_grad():
        for p, q in zip(other.parameters(), sparsecc.prune(model, 0.9, block_shape=(16, 1)).parameters()):
            p.copy_(q * 2)
    cm2 = sparsecc.compile(other, x, **OPTS, formats_from=cm)
    assert float((cm2(x) - cm(x)).abs().max()) > 1e-3
    buf = io.BytesIO()
    torch.save(cm.state_dict(), buf)
    buf.seek(0)
    cm2.load_state_dict(torch.load(buf))
    check_close(cm2(x), cm(x), atol=0, rtol=0)
    bad = {k: v for k, v in cm.state_dict().items()}
    k0 = next(k for k in bad if k.endswith(".indices"))
    bad[k0] = bad[k0][:-1]
    with pytest.raises(InvalidArgumentError, match="shape mismatch"):
        cm2.load_state_dict(bad)
    with pytest.raises(InvalidArgumentError, match="missing keys"):
        cm2.load_state_dict({})


def test_compiled_module_nests_inside_a_bigger_model():
    torch.manual_seed(0)
    model = MLP(128, 512, 64).eval()
    x = torch.randn(4, 128)
    cm = sparsecc.compile(model, x, **OPTS)
    head = torch.nn.Linear(64, 3)
    big = torch.nn.Sequential(cm, head).eval()
    with torch.no_grad():
        check_close(big(x), head(cm(x)), atol=0, rtol=0)
    assert any(k.startswith("0.graph_module.") for k in big.state_dict())
    assert "1.weight" in big.state_dict()


def test_compiled_module_refuses_pickling_moving_and_training_with_clear_messages():
    cm = sparsecc.compile(MLP(16, 32, 8).eval(), torch.randn(2, 16), measure=False)
    with pytest.raises(NotPicklableError, match="state_dict"):
        pickle.dumps(cm)
    with pytest.raises(NotPicklableError):
        torch.save(cm, io.BytesIO())
    for move in (lambda: cm.half(), lambda: cm.to(torch.float64), lambda: cm.to("meta")):
        with pytest.raises(InvalidArgumentError, match="cannot be moved or cast"):
            move()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cm.train() is cm
    assert any("inference" in str(x.message) for x in w)
    check_close(cm(torch.ones(2, 16)), cm(torch.ones(2, 16)), atol=0, rtol=0)
