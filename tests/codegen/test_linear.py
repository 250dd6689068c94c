"""TensorIR templates: structure and unscheduled numerics (built without schedules)."""

import pytest
import torch
import torch.nn.functional as F
import tvm

from sparsecc.codegen import bsr_linear, csr_linear, linear_template
from sparsecc.errors import UnsupportedOpError
from sparsecc.formats import BlockSparseMatrix


def test_template_signature_and_blocks():
    f = bsr_linear((8, 1), bias=True, activation="relu", m_tile=4)
    assert len(f.params) == 6
    assert [int(v) for v in f.attrs["sparsecc.block"]] == [8, 1]
    text = f.script()
    for name in ('"row"', '"init"', '"compute"', '"epilogue"'):
        assert name in text
    assert "PTR[vio + 1] - PTR[vio]" in text  # data-dependent reduction extent
    assert len(csr_linear(bias=False).params) == 5


def test_bad_activation():
    with pytest.raises(UnsupportedOpError, match="tanh"):
        linear_template((1, 1), activation="tanh")


@pytest.mark.parametrize("block,act", [((1, 1), "gelu"), ((4, 4), None), ((8, 1), "relu")])
def test_unscheduled_template_numerics(block, act):
    # a plain (serial, unvectorized) build of the template is the reference semantics
    br, bc = block
    torch.manual_seed(0)
    w = torch.randn(16, 8) * (torch.rand(16 // br, 8 // bc) < 0.5).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    b = torch.randn(16)
    m = BlockSparseMatrix.from_dense(w, block)
    lib = tvm.compile(linear_template(block, bias=True, activation=act, m_tile=2), target={"kind": "llvm"})
    x = torch.randn(6, 8)  # M must be a multiple of m_tile
    y = torch.empty(6, 16)
    lib["main"](x, m.data, m.indices, m.indptr, b.view(-1, br), y.view(6, -1, br))
    ref = F.linear(x, w, b)
    ref = torch.relu(ref) if act == "relu" else F.gelu(ref) if act == "gelu" else ref
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
