"""Channel dependency groups on hand-built graphs: residual, concat, split, grouped and depthwise convs,
flatten into a linear, attention heads, FFN neurons, layer norm, and refusal of unknown ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecc.errors import UnsupportedOpError
from sparsecc.ir.capture import capture
from sparsecc.passes.base import PassContext
from sparsecc.passes.channels import CHANNELS_META_KEY, FindChannelGroups, channel_groups


def groups_of(model, x, **kw):
    return channel_groups(capture(model.eval(), x), **kw)


def group_with(groups, target, dim):
    found = [g for g in groups if any(m.target == target and m.dim == dim for m in g.members)]
    assert len(found) <= 1
    return found[0] if found else None


def member(g, target, dim):
    return next(m for m in g.members if m.target == target and m.dim == dim)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        return self.c(h + self.b(h))


def test_residual_add_couples_both_producers_and_the_consumer():
    gs = groups_of(Residual(), torch.randn(1, 3, 8, 8))
    g = group_with(gs, "a.weight", 0)
    assert g is not None and g.size == 8 and g.kind == "channels"
    targets = {(m.target, m.dim) for m in g.members}
    assert {("a.weight", 0), ("a.bias", 0), ("bn.weight", 0), ("bn.running_mean", 0), ("b.weight", 0),
            ("b.weight", 1), ("b.bias", 0), ("c.weight", 1)} <= targets
    assert not member(g, "bn.running_var", 0).is_parameter
    for m in g.members:
        np.testing.assert_array_equal(m.unit_of, np.arange(8))
    # the input channels and the output channels are fixed; the kernel taps are not channels
    assert group_with(gs, "a.weight", 1) is None and group_with(gs, "c.weight", 0) is None
    assert group_with(gs, "a.weight", 2) is None
    assert len(gs) == 1
    assert "a[out]" in str(gs) and "c[in]" in str(gs)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), F.relu(self.b(x))], dim=1))


def test_concat_maps_each_input_to_its_slice_of_the_output():
    gs = groups_of(Concat(), torch.randn(1, 3, 5, 5))
    g = group_with(gs, "c.weight", 1)
    assert g.size == 10
    np.testing.assert_array_equal(member(g, "a.weight", 0).unit_of, np.arange(4))
    np.testing.assert_array_equal(member(g, "b.weight", 0).unit_of, np.arange(4, 10))
    np.testing.assert_array_equal(member(g, "c.weight", 1).unit_of, np.arange(10))


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.c = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        lo, hi = torch.split(self.a(x), [3, 5], dim=1)
        return self.b(lo.sum(1, keepdim=True).expand(-1, 3, -1, -1)) + self.c(hi)


def test_split_offsets_the_second_part():
    gs = groups_of(Split(), torch.randn(1, 3, 4, 4))
    g = group_with(gs, "c.weight", 1)
    assert g is None  # the first part is reduced over (sum): the split conv's channels are kept whole
    gs = groups_of(SplitPlain(), torch.randn(1, 3, 4, 4))
    g = group_with(gs, "a.weight", 0)
    assert g.size == 8
    np.testing.assert_array_equal(member(g, "b.weight", 1).unit_of, np.arange(3))
    np.testing.assert_array_equal(member(g, "c.weight", 1).unit_of, np.arange(3, 8))


class SplitPlain(Split):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        lo, hi = torch.split(self.a(x), [3, 5], dim=1)
        return self.b(lo) + self.c(hi)


class Grouped(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(F.relu6(self.g(self.a(x))))


def test_depthwise_conv_couples_its_input_and_output_channels():
    gs = groups_of(Grouped(8), torch.randn(1, 3, 6, 6))
    g = group_with(gs, "a.weight", 0)
    assert {("g.weight", 0), ("g.bias", 0), ("c.weight", 1)} <= {(m.target, m.dim) for m in g.members}
    assert len(gs) == 1


def test_grouped_conv_keeps_its_channels_whole():
    gs = groups_of(Grouped(2), torch.randn(1, 3, 6, 6))
    assert len(gs) == 0
    assert any("grouped convolution" in f for f in gs.fixed)


class Heads(nn.Module):
    """One attention block (heads of 4) with its FFN and a layer norm, as transformers write it."""

    def __init__(self, d=16, heads=4, ffn=24):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ln = nn.LayerNorm(d)
        self.hd = d // heads

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        h = self.ln(x + self.o(a))
        return h + self.down(F.gelu(self.up(h)))


def test_attention_heads_and_ffn_neurons_are_groups_and_the_hidden_dim_is_fixed():
    gs = groups_of(Heads(), torch.randn(2, 5, 16))
    heads = group_with(gs, "q.weight", 0)
    assert heads.kind == "heads" and heads.size == 4 and heads.unit == 4
    for t in ("q.weight", "k.weight", "v.weight", "q.bias"):
        np.testing.assert_array_equal(member(heads, t, 0).unit_of, np.arange(16) // 4)
    np.testing.assert_array_equal(member(heads, "o.weight", 1).unit_of, np.arange(16) // 4)
    ffn = group_with(gs, "up.weight", 0)
    assert ffn.kind == "neurons" and ffn.size == 24
    assert {("up.bias", 0), ("down.weight", 1)} <= {(m.target, m.dim) for m in ffn.members}
    assert len(gs) == 2  # the hidden dim goes through the layer norm and the output
    assert group_with(gs, "ln.weight", 0) is None and group_with(gs, "o.weight", 0) is None
    assert any("layer_norm" in f for f in gs.fixed)


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_into_a_linear_removes_whole_blocks_of_columns():
    gs = groups_of(FlattenHead(), torch.randn(2, 1, 4, 4))
    g = group_with(gs, "conv.weight", 0)
    assert g.size == 6 and g.unit == 16
    np.testing.assert_array_equal(member(g, "fc.weight", 1).unit_of, np.arange(96) // 16)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def test_an_unknown_op_on_prunable_channels_is_refused_naming_the_node():
    with pytest.raises(UnsupportedOpError, match="cumsum") as err:
        groups_of(Unknown(), torch.randn(1, 3, 4, 4))
    assert "'a'" in str(err.value) or "a" in str(err.value).split("layers")[1]
    gs = groups_of(Unknown(), torch.randn(1, 3, 4, 4), unknown="keep")
    assert group_with(gs, "a.weight", 0) is None


class Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):  # (B, 4, 4) -> (B, 4, 6) -> (B, 6, 4) by a reshape that is not a transpose
        h = self.a(x)
        return self.b(h.reshape(h.shape[0], 6, 4).transpose(1, 2))


def test_a_reshape_that_mixes_channels_is_refused():
    with pytest.raises(UnsupportedOpError, match="reshape mixing"):
        groups_of(Mixing(), torch.randn(2, 4, 4))


def test_find_channel_groups_pass_writes_namespaced_meta_only():
    graph = capture(Residual().eval(), torch.randn(1, 3, 8, 8))
    before = [n.format_node() for n in graph.gm.graph.nodes]
    res = FindChannelGroups()(graph, PassContext())
    assert not res.modified and len(res.info["groups"]) == 1
    assert [n.format_node() for n in graph.gm.graph.nodes] == before
    tagged = [n for n in graph.gm.graph.nodes if CHANNELS_META_KEY in n.meta]
    assert tagged and all(set(n.meta[CHANNELS_META_KEY].values()) == {0} for n in tagged)


def test_fx_captured_graphs_are_refused():
    from sparsecc.ir.graph import SparseGraph

    graph = SparseGraph(torch.fx.symbolic_trace(Residual()), "fx", [])
    with pytest.raises(UnsupportedOpError, match="torch.export"):
        channel_groups(graph)
