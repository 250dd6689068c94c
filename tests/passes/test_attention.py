"""The attention rewrite: the two-matmul form against torch's scaled_dot_product_attention, and the pass."""

import math

import pytest

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.passes.attention import SDPA, ChooseAttention
from sparsecc.runtime.attention import attention_bmm, attention_fused


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
    for form in (attention_bmm, attention_fused, SDPA):
        monkeypatch.setattr(ChooseAttention, "_best", lambda self, *a, f=form: f)
        cm = sparsecc.compile(model, (x, mask), pattern="dense")
        targets = [n.target for n in cm.graph.gm.graph.nodes if n.op == "call_function"]
        assert form in targets and all(f not in targets for f in (attention_bmm, attention_fused, SDPA) if f is not form)
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


@pytest.mark.parametrize("form", [attention_bmm, attention_fused])
def test_rewritten_graph_exports_with_torch_attention(monkeypatch, tmp_path, form):
    monkeypatch.setattr(ChooseAttention, "_best", lambda self, *a: form)
    torch.manual_seed(0)
    model = _Attn().eval()
    x, mask = torch.randn(2, 16, 32), torch.ones(2, 1, 16, 16, dtype=torch.bool)
    cm = sparsecc.compile(model, (x, mask), pattern="dense")
    assert any(n.target is form for n in cm.graph.gm.graph.nodes if n.op == "call_function")
    loaded = sparsecc.load(cm.export(tmp_path / "attn"))
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(loaded(x, mask)), model(x, mask), rtol=1e-4, atol=1e-5)


def test_best_form_is_timed_and_fused_only_where_supported(monkeypatch):
    from sparsecc.passes import attention as passes_attention
    from sparsecc.targets.x86 import X86Target

    timed = []

    def fake_interleaved(forms, runs, warmup):
        timed.append(set(forms))
        return {f: {SDPA: 1.0, attention_bmm: 0.97, attention_fused: 0.5}[f] for f in forms}

    monkeypatch.setattr(passes_attention, "interleaved_ms", fake_interleaved)
    ctx = type("Ctx", (), {"target": X86Target()})()
    p = ChooseAttention()
    d16 = [(2, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16), (2, 1, 8, 8)]
    assert p._best(d16, torch.bool, None, ctx) is attention_fused
    assert timed[-1] == {SDPA, attention_bmm, attention_fused}
    d7 = [(2, 2, 8, 7), (2, 2, 8, 7), (2, 2, 8, 7), None]  # a head dim the kernel does not take
    assert p._best(d7, None, None, ctx) is SDPA  # 0.97 is not within the 0.95 margin
    assert timed[-1] == {SDPA, attention_bmm}


@settings(max_examples=14, deadline=None)
@given(b=st.integers(1, 3), h=st.sampled_from([1, 3]), s=st.sampled_from([1, 9, 24]), l_=st.sampled_from([1, 7, 33]),
       d=st.sampled_from([16, 48]), mask=st.sampled_from([None, "bool", "float", "bool_broadcast", "bool_batch1"]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_fused_kernel_matches_torch_sdpa(b, h, s, l_, d, mask, scale, seed):
    from sparsecc.runtime import attention as rt

    built = []
    real = rt._fused_kernel
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, h, s, d, generator=g), torch.randn(b, h, l_, d, generator=g), torch.randn(b, h, l_, d, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, s, l_, generator=g) < 0.6
        m[..., 0, :] = False  # a query that attends to nothing: zeros, as torch
    elif mask == "bool_broadcast":
        m = torch.rand(b, 1, 1, l_, generator=g) < 0.7
    elif mask == "bool_batch1":
        m = torch.rand(1, 1, s, l_, generator=g) < 0.7
    elif mask == "float":
        m = torch.randn(b, 1, s, l_, generator=g)
        m[..., -1] = -math.inf
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt, "_fused_kernel", lambda *a: built.append(a) or real(*a))
        out = attention_fused(q, k, v, m, scale=scale)
    assert len(built) == 1  # the kernel ran, not torch's op
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fused_falls_back_to_torch_where_the_kernel_could_differ(monkeypatch):
    from sparsecc.runtime import attention as rt

    built = []
    real = rt._fused_kernel
    monkeypatch.setattr(rt, "_fused_kernel", lambda *a: built.append(a) or real(*a))
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    for bad in (q, v):
        x = bad.clone()
        bad[0, 1, 2, 3] = math.nan
        ref = F.scaled_dot_product_attention(q, k, v)
        out = attention_fused(q, k, v)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        bad.copy_(x)
    huge = torch.full((1, 1, 2, 16), 1e20)  # finite inputs whose scores overflow: torch's answer
    ref = F.scaled_dot_product_attention(huge, huge, huge)
    out = attention_fused(huge, huge, huge)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(out[~torch.isnan(out)], ref[~torch.isnan(ref)])
    per_head = torch.rand(1, 2, 4, 5) < 0.5  # a mask per head: torch's op
    torch.testing.assert_close(attention_fused(q, k, v, per_head), F.scaled_dot_product_attention(q, k, v, attn_mask=per_head))
    odd = torch.randn(1, 2, 4, 12)  # head dim not a multiple of the vector width
    torch.testing.assert_close(attention_fused(odd, odd, odd), F.scaled_dot_product_attention(odd, odd, odd))
    nan_mask = torch.zeros(1, 1, 4, 5)
    nan_mask[0, 0, 1, 1] = math.nan
    assert torch.equal(torch.isnan(attention_fused(q, k, v, nan_mask)),
                       torch.isnan(F.scaled_dot_product_attention(q, k, v, attn_mask=nan_mask)))
    assert len(built) == 1  # only the overflow case reached the kernel
