"""``sparsecc.prune`` is the eager reference of ``compile(sparsity=...)``: one function decides what is pruned."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.passes.prune import prunable_weights
from tests.fuzz_grammar import PadConv


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class SeparateProj(nn.Module):  # kdim != embed_dim: q/k/v_proj_weight instead of in_proj_weight
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)

    def forward(self, x, kv):
        return self.attn(x, kv, kv, need_weights=False)[0]


def _zeros(m, name):
    return float((dict(m.named_parameters())[name] == 0).float().mean())


def test_attention_projections_are_pruned_by_both():
    torch.manual_seed(0)
    m = AttnBlock().eval()
    assert set(prunable_weights(m)) == {"attn.in_proj_weight", "attn.out_proj", "fc"}
    x = torch.randn(2, 5, 32)
    ref = sparsecc.prune(m, 0.5)
    assert _zeros(ref, "attn.in_proj_weight") == pytest.approx(0.5, abs=0.01)
    cm = sparsecc.compile(m, (x,), sparsity=0.5, measure=False)
    assert {a.name for a in cm.layers} == {"attn.in_proj_weight", "attn.out_proj", "fc"}
    torch.testing.assert_close(cm(x), ref(x), atol=1e-5, rtol=1e-5)
    sep = SeparateProj().eval()
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"} <= set(prunable_weights(sep))
    assert _zeros(sparsecc.prune(sep, 0.5), "attn.k_proj_weight") == pytest.approx(0.5, abs=0.01)


def test_a_conv_subclass_that_pads_in_its_forward_is_pruned_by_both():
    torch.manual_seed(0)
    m = nn.Sequential(PadConv(3, 8, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = sparsecc.prune(m, 0.5)
    assert _zeros(ref, "0.weight") == pytest.approx(0.5, abs=0.02)
    cm = sparsecc.compile(m, (x,), sparsity=0.5, measure=False)
    torch.testing.assert_close(cm(x), ref(x), atol=1e-5, rtol=1e-5)


def test_layers_prune_does_not_prune_compile_does_not_prune_either():
    class Functional(nn.Module):  # a raw parameter used through F.linear: not a prunable module weight
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(F.linear(x, self.w))

    torch.manual_seed(0)
    m = Functional().eval()
    x = torch.randn(4, 16)
    ref = sparsecc.prune(m, 0.5)
    assert _zeros(ref, "w") == 0.0 and _zeros(ref, "fc.weight") == pytest.approx(0.5, abs=0.01)
    cm = sparsecc.compile(m, (x,), sparsity=0.5, measure=False)
    torch.testing.assert_close(cm(x), ref(x), atol=1e-5, rtol=1e-5)


def test_nm_pattern_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(12, 16)
    ref = sparsecc.prune(m, pattern="2:4")
    w = ref[0].weight.reshape(32, 4, 4)
    assert int((w != 0).sum(-1).max()) <= 2
    torch.testing.assert_close(sparsecc.compile(m, (x,), pattern="2:4", measure=False)(x), ref(x))
    with pytest.raises(sparsecc.InvalidSparsityError, match="prunes to sparsity 0.5"):
        sparsecc.prune(m, 0.7, pattern="2:4")
