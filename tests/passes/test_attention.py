"""The attention rewrite: the two-matmul form against torch's scaled_dot_product_attention, and the pass."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.passes.attention import SDPA, ChooseAttention
from sparsecc.runtime.attention import attention_bmm


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), s=st.integers(1, 20), l_=st.integers(1, 20), d=st.integers(1, 40),
       mask=st.sampled_from([None, "bool", "float", "bool_broadcast"]), scale=st.sampled_from([None, 0.3]),
       seed=st.integers(0, 2**16))
def test_matches_torch_sdpa(b, h, s, l_, d, mask, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, l_, d, generator=g), torch.randn(b, h, l_, d, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(b, h, s, l_, generator=g) < 0.7
        m[..., 0, :] = False  # a query that attends to nothing: zeros, as torch
    elif mask == "bool_broadcast":
        m = torch.rand(b, 1, 1, l_, generator=g) < 0.7
    elif mask == "float":
        m = torch.randn(b, 1, s, l_, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    torch.testing.assert_close(attention_bmm(q, k, v, m, scale=scale), ref, rtol=1e-4, atol=1e-5)


def test_nan_and_inf_propagate_as_torch():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    q[0, 0, 1, 3] = math.nan
    v[0, 1, 2, 0] = math.inf
    ref = F.scaled_dot_product_attention(q, k, v)
    out = attention_bmm(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))  # torch: a NaN query row gives zeros
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-5)


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape)


def test_pass_rewrites_only_when_faster_and_the_model_still_matches_torch(monkeypatch):
    torch.manual_seed(0)
    model = _Attn().eval()
    x, mask = torch.randn(2, 16, 32), torch.rand(2, 1, 16, 16) < 0.8
    mask[..., 0] = True
    for faster in (True, False):
        monkeypatch.setattr(ChooseAttention, "_faster", lambda self, *a, f=faster: f)
        cm = sparsecc.compile(model, (x, mask), pattern="dense")
        targets = [n.target for n in cm.graph.gm.graph.nodes if n.op == "call_function"]
        assert (attention_bmm in targets) == faster and (SDPA in targets) == (not faster)
        torch.testing.assert_close(cm(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)


def test_pass_keeps_dropout_and_causal_calls():
    class Causal(_Attn):
        def forward(self, x, mask):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)

    model = Causal().eval()
    x = torch.randn(2, 8, 32)
    cm = sparsecc.compile(model, (x, None), pattern="dense")
    assert any(n.target is SDPA for n in cm.graph.gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(cm(x, None), model(x, None), rtol=1e-5, atol=1e-6)


def test_rewritten_graph_exports_with_torch_attention(monkeypatch, tmp_path):
    monkeypatch.setattr(ChooseAttention, "_faster", lambda self, *a: True)
    torch.manual_seed(0)
    model = _Attn().eval()
    x, mask = torch.randn(2, 16, 32), torch.ones(2, 1, 16, 16, dtype=torch.bool)
    cm = sparsecc.compile(model, (x, mask), pattern="dense")
    assert any(n.target is attention_bmm for n in cm.graph.gm.graph.nodes if n.op == "call_function")
    loaded = sparsecc.load(cm.export(tmp_path / "attn"))
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(loaded(x, mask)), model(x, mask), rtol=1e-4, atol=1e-5)
