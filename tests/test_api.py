"""End to end: sparsecc.compile on small models against eager torch, with the real x86 kernels."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.errors import (InputDtypeError, InputShapeError, InvalidSparsityError, SparseccError, TargetError,
                             UnknownLayerError)
from tests.conftest import MLP, check_close


def _compiled_pruned_mlp(seed, hidden, sparsity, block):
    """A pruned MLP (64 -> hidden -> 32) and its compiled module with a dynamic batch dim."""
    torch.manual_seed(seed)
    pruned = sparsecc.prune(MLP(64, hidden, 32).eval(), sparsity, block_shape=block)
    batch = torch.export.Dim("batch", max=1024)
    cm = sparsecc.compile(pruned, (torch.randn(8, 64),), pattern="block", dynamic_shapes=({0: batch},),
                          measure=False)
    return pruned, cm


def _sparse_layers(cm):
    return [a for a in cm.layers if a.format in ("csr", "bsr")]


def test_mlp_block_sparse_matches_pruned_torch_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = MLP(64, 256, 32).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 64)
    y_before = model(x)
    cm = sparsecc.compile(model, (x,), sparsity=0.9, pattern="block", block_shape=(8, 1))
    ref = sparsecc.prune(model, 0.9, block_shape=(8, 1))
    check_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    assert {a.format for a in cm.layers} <= {"bsr", "dense"}
    for a in cm.layers:  # every layer pruned to sparsity 0.9
        assert a.pattern == "block" and a.density == pytest.approx(0.1, abs=0.01)
    total = sum(a.nnz for a in cm.layers) / sum(a.weight_shape[0] * a.weight_shape[1] for a in cm.layers)
    assert total == pytest.approx(0.1, abs=0.01)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model(x), y_before)


def test_dynamic_batch_and_fused_epilogues():
    pruned, cm = _compiled_pruned_mlp(1, 256, 0.85, (16, 1))
    for m in (1, 3, 8, 129):
        x = torch.randn(m, 64)
        check_close(cm(x), pruned(x), atol=1e-4, rtol=1e-4)
    if _sparse_layers(cm):
        assert {a.epilogue for a in _sparse_layers(cm)} <= {"relu", "gelu", None}


def test_existing_zeros_are_compiled_and_density_0_and_1_layers_work():
    torch.manual_seed(2)
    model = MLP(32, 64, 16).eval()
    with torch.no_grad():
        model.fc1.weight.zero_()                       # density 0
        mask = torch.rand(64, 64) < 0.05               # unstructured, density ~0.05
        model.fc2.weight.mul_(mask)
    x = torch.randn(32, 32)
    cm = sparsecc.compile(model, (x,), pattern="auto")
    check_close(cm(x), model(x), atol=1e-4, rtol=1e-4)
    by_name = {a.name: a for a in cm.layers}
    assert by_name["fc1"].density == 0.0 and by_name["fc3"].density == 1.0
    assert by_name["fc3"].format == "dense" and by_name["fc3"].reason == "no zeros"


def test_forced_unstructured_kernels_match():
    torch.manual_seed(3)
    model = MLP(48, 96, 24).eval()
    x = torch.randn(5, 48)
    cm = sparsecc.compile(model, (x,), sparsity={"fc1": 0.95, "fc2": 0.97}, pattern="unstructured",
                          measure=False)
    ref = sparsecc.prune(model, {"fc1": 0.95, "fc2": 0.97})
    check_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    assert {a.name: a.density for a in cm.layers}["fc3"] == 1.0


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = torch.nn.Linear(32 * 8 * 8, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def test_convnet_convs_are_pruned_too():
    # issue #4: conv2d (groups=1) weights are pruned in their (C_out, kh·kw·C_in) layout and go
    # through the conv passes (sparse kernel or torch, whichever the measurement picks)
    torch.manual_seed(4)
    model = ConvNet().eval()
    x = torch.randn(4, 3, 16, 16)
    cm = sparsecc.compile(model, (x,), sparsity=0.9, pattern="block", block_shape=(8, 1))
    ref = sparsecc.prune(model, 0.9, block_shape=(8, 1))
    check_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    assert sorted(a.name for a in cm.layers) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(abs(a.density - 0.1) < 0.02 for a in cm.layers)
    convs = [a for a in cm.layers if a.kind == "conv2d"]
    assert all(a.kernel.startswith("conv_nhwc_") if a.format != "dense" else a.kernel == "torch.conv2d"
               for a in convs)


class Block(torch.nn.Module):
    """A BERT-style transformer block: self-attention + GELU FFN, post-LayerNorm."""

    def __init__(self, d=64, heads=4, ffn=256):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, ffn), torch.nn.Linear(ffn, d)

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, d)))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


def test_transformer_block_dynamic_batch_and_seq():
    torch.manual_seed(5)
    model = Block().eval()
    x = torch.randn(2, 16, 64)
    dyn = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=256)},)
    cm = sparsecc.compile(model, (x,), sparsity=0.8, pattern="block", block_shape=(4, 1), dynamic_shapes=dyn)
    ref = sparsecc.prune(model, 0.8, block_shape=(4, 1))
    for shape in ((2, 16, 64), (1, 7, 64), (3, 33, 64)):
        x = torch.randn(*shape)
        check_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    assert len(cm.layers) == 6
    report = cm.report()
    assert report.splitlines()[0].split()[:3] == ["layer", "weight", "(N,"]
    assert "q" in report and "linears on sparse kernels" in report
    assert "sparsecc_" in str(cm.graph) or not _sparse_layers(cm)


def test_unsupported_linears_stay_dense_without_error():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8))
            self.fc = torch.nn.Linear(8, 16).double()

        def forward(self, x):
            y = F.linear(x, self.w * 2.0)           # weight computed at run time
            return y + self.fc(x.double()).float()  # float64 linear

    torch.manual_seed(6)
    model = Odd().eval()
    x = torch.randn(4, 8)
    cm = sparsecc.compile(model, (x,), sparsity=0.5)
    check_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
    assert cm.layers == []


def test_bad_inputs_raise_sparsecc_errors():
    torch.manual_seed(7)
    model = MLP().eval()
    x = torch.randn(4, 32)
    cm = sparsecc.compile(model, (x,), sparsity=0.5, measure=False)
    with pytest.raises(InputShapeError, match=r"expected shape \(0\.\., 32\)"):  # the batch is dynamic
        cm(torch.randn(4, 31))
    with pytest.raises(InputDtypeError, match="torch.float32"):
        cm(x.double())
    for bad in (1.0, -0.2, 1.5, "half"):
        with pytest.raises(InvalidSparsityError, match="sparsity"):
            sparsecc.compile(model, (x,), sparsity=bad)
    with pytest.raises(UnknownLayerError, match="'fc7'"):
        sparsecc.compile(model, (x,), sparsity={"fc7": 0.5})
    with pytest.raises(InvalidSparsityError, match="'fc1'"):
        sparsecc.compile(model, (x,), sparsity={"fc1": 1.0})
    with pytest.raises(InvalidSparsityError, match="pattern"):
        sparsecc.compile(model, (x,), pattern="3:4")  # not a supported N:M pattern
    with pytest.raises(TargetError, match="build_only"):  # only target="cuda" builds without running
        sparsecc.compile(model, (x,), target="x86", build_only=True)
    with pytest.raises(TargetError, match="unknown target"):
        sparsecc.compile(model, (x,), target="tpu")
    assert issubclass(InputShapeError, SparseccError) and issubclass(InputShapeError, ValueError)


def test_non_contiguous_and_misaligned_inputs():
    pruned, cm = _compiled_pruned_mlp(8, 128, 0.9, (8, 1))
    big = torch.randn(17, 65)
    for x in (big[:, 1:], torch.randn(64, 9).t(), big[1:, :64]):
        check_close(cm(x), pruned(x), atol=1e-4, rtol=1e-4)


def test_calibrated_cost_model_keeps_dense_where_csr_loses():
    """On the real x86 kernels: CSR at density 0.5 is not offered (its int32 indices make it larger than dense),
    the layer is dense or the M-vectorized kernel, whichever estimates faster; 16x1 blocks at 0.1 must be sparse."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.ReLU(), torch.nn.Linear(768, 768)).eval()
    x = torch.randn(128, 768)
    cm = sparsecc.compile(model, (x,), sparsity={"0": 0.5}, pattern="unstructured", measure=False)
    a = {a.name: a for a in cm.layers}["0"]
    assert "csr_1x1" not in a.est_ms and a.format == min(("dense", "xcsr"), key=a.est_ms.get)
    cm = sparsecc.compile(model, (x,), sparsity=0.9, pattern="block", block_shape=(16, 1))
    for a in cm.layers:
        # a block the 16x1 pruning tiles without fill-in (AVX2 hosts time 8x1 faster, AVX-512 ones 16x1)
        assert a.format == "bsr" and a.format_params in ((16, 1), (8, 1), (4, 1)), a.format_params
        assert a.est_ms["bsr_16x1"] < 0.5 * a.est_ms["dense"]
        assert a.measured_ms < a.dense_ms
    check_close(cm(x), sparsecc.prune(model, 0.9, block_shape=(16, 1))(x), atol=1e-4, rtol=1e-4)
