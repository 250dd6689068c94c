"""MLIR export (sparsecc.runtime.mlir): sparse encodings on the weights, verification, and the
ExecutionEngine's outputs against torch's."""

import re

import numpy as np
import pytest
import torch

import sparsecc
from sparsecc.runtime.mlir import _encode, torch_mlir_available, to_mlir

pytestmark = pytest.mark.skipif(not torch_mlir_available(), reason="torch-mlir is not installed")

TOL = 1e-4


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()


def _check(mm, n_weights):
    assert "#sparse_tensor.encoding" in mm.text
    assert len(mm.weights) == n_weights
    assert mm.verify() is True  # parses and verifies in a fresh torch_mlir.ir.Context
    # @main takes the inputs, then one sparse tensor per weight
    head = re.search(r"func\.func @main\((.*?)\) ->", mm.text).group(1)
    assert head.count("#sparse") == n_weights


def _max_diff(mm, x, ref):
    with torch.no_grad():
        want = ref(x).numpy()
    got = mm.run(x)[0]
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


def test_bsr_16x1_mlp_runs():
    torch.manual_seed(1)
    x = torch.randn(64, 64)
    model = _mlp()
    cm = sparsecc.compile(model, x, target="x86", sparsity=0.95, pattern="block", block_shape=(16, 1),
                          measure=False)
    mm = to_mlir(cm, (x,))
    _check(mm, 2)
    # the blocks are the compiled kernels' (the cost model's choice within the 16x1 pruning) or, for a
    # layer run dense, the pruning's 16x1
    assert [w.layout for w in mm.weights] == ["bsr", "bsr"]
    assert all(w.encoding in mm.text for w in mm.weights)
    # the exported weights are the compiled layers' weights, value for value
    ref = sparsecc.prune(model, 0.95, block_shape=(16, 1))
    for w, lin in zip(mm.weights, (ref[0], ref[2])):
        assert w.shape == tuple(lin.weight.shape)
        assert torch.equal(w.to_dense(), lin.weight.detach())
    assert abs(mm.weights[0].nnz / (128 * 64) - 0.05) < 0.01
    assert _max_diff(mm, x, ref) <= TOL


def test_bsr_16x2_and_csr_mlp_run():
    x = torch.randn(4, 64)
    model = _mlp(2)
    cm = sparsecc.compile(model, x, target="x86", sparsity=0.8, pattern="block", block_shape=(16, 2),
                          measure=False)
    mm = to_mlir(cm, (x,))
    _check(mm, 2)
    assert all(w.layout == "bsr" and w.encoding in mm.text for w in mm.weights)
    assert _max_diff(mm, x, sparsecc.prune(model, 0.8, block_shape=(16, 2))) <= TOL

    cm = sparsecc.compile(model, x, target="x86", sparsity=0.8, pattern="unstructured", measure=False)
    mm = to_mlir(cm, (x,))
    _check(mm, 2)
    assert [w.layout for w in mm.weights] == ["csr", "csr"]
    assert "(d0, d1) -> (d0 : dense, d1 : compressed), posWidth = 64, crdWidth = 64" in mm.text
    ref = sparsecc.prune(model, 0.8)
    assert torch.equal(mm.weights[0].to_dense(), ref[0].weight.detach())
    assert _max_diff(mm, x, ref) <= TOL


def test_encodings():
    w = torch.zeros(32, 8)
    w[16:32, 3] = 1.0
    sw = _encode("fc", w, "bsr", (16, 1))  # (br, 1) blocks: the (N / br, K, br) view
    assert sw.encoding == ("#sparse_tensor.encoding<{ map = (d0, d1, d2) -> (d0 : dense, d1 : compressed, "
                           "d2 : dense), posWidth = 64, crdWidth = 64 }>")
    assert tuple(sw.tensor.shape) == (2, 8, 16) and sw.shape == (32, 8) and sw.nnz == 16
    assert sw.tensor.crow_indices().tolist() == [0, 0, 1] and sw.tensor.col_indices().tolist() == [3]
    assert torch.equal(sw.to_dense(), w)
    sw = _encode("fc", w, "bsr", (16, 2))
    assert "(d0 floordiv 16 : dense, d1 floordiv 2 : compressed, d0 mod 16 : dense, d1 mod 2 : dense)" in sw.encoding
    assert sw.nnz == 32 and torch.equal(sw.to_dense(), w)
    sw = _encode("fc", w, "bsr", (1, 2))
    assert "(d0 : dense, d1 floordiv 2 : compressed, d1 mod 2 : dense)" in sw.encoding
    sw = _encode("fc", w, "csr", (1, 1))
    assert "(d0 : dense, d1 : compressed)" in sw.encoding and sw.nnz == 16
    assert sw.tensor.crow_indices().dtype == torch.int64


def test_torch_dialect_and_structured_24():
    x = torch.randn(4, 64)
    cm = sparsecc.compile(_mlp(3), x, target="x86", pattern="2:4", measure=False)
    mm = to_mlir(cm, (x,), lower=False, nm="structured")
    _check(mm, 2)
    assert "torch.aten.mm" in mm.text and "structured[2, 4]" in mm.text
    with pytest.raises(sparsecc.errors.SparseccError, match="2:4"):
        mm.run(x)
    with pytest.raises(sparsecc.errors.InvalidArgumentError, match="nm"):
        to_mlir(cm, (x,), nm="bogus")


def test_bert_layer_runs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                  num_hidden_layers=1, attn_implementation="eager")
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = transformers.models.bert.modeling_bert.BertLayer(cfg)

        def forward(self, h):
            return self.layer(h)[0]

    model = Layer().eval()
    x = torch.randn(1, 8, 64)
    cm = sparsecc.compile(model, x, target="x86", sparsity=0.8, pattern="block", block_shape=(16, 1),
                          measure=False)
    mm = to_mlir(cm, (x,))
    _check(mm, 6)  # q, k, v, attention output, intermediate, output
    assert all(w.layout == "bsr" and w.encoding in mm.text for w in mm.weights)
    assert _max_diff(mm, x, sparsecc.prune(model, 0.8, block_shape=(16, 1))) <= TOL
