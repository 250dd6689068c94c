"""Structured pruning: removing zero-importance units is exact, the smaller model is checked against the
dependency groups, importance scores and reconstruction do what they say, and sparsify/compile use it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc import zoo
from sparsecc.errors import InvalidArgumentError, InvalidSparsityError, StructureError
from sparsecc.sparsify.structured import group_importance, model_channel_groups, prune_channels, remove_channels


def zero_units(model, group, units):
    """Zero every parameter slice of ``units`` in ``group`` (in place)."""
    units = np.asarray(units)
    with torch.no_grad():
        for m in group.members:
            if not m.is_parameter:
                continue
            t = dict(model.named_parameters())[m.target]
            idx = torch.as_tensor(np.nonzero(np.isin(m.unit_of, units))[0])
            t.index_fill_(m.dim, idx, 0.0)


def exact_after_removing_zeros(model, x, call=lambda m, x: m(x), picks=(0, 2)):
    model = model.eval()
    groups = model_channel_groups(model, x)
    assert len(groups) > 0
    rng = np.random.default_rng(0)
    zeroed = {}
    for g in groups:
        units = rng.choice(g.size, size=max(1, g.size // 4), replace=False)
        zero_units(model, g, units)
        zeroed[g.id] = set(units.tolist())
    imp = group_importance(model, groups, "magnitude")
    keep = {}
    for g in groups:
        assert set(np.nonzero(imp[g.id] == 0)[0].tolist()) == zeroed[g.id]
        keep[g.id] = torch.as_tensor(imp[g.id] > 0)
    small = remove_channels(model, groups, keep, x)
    with torch.no_grad():
        ref, out = call(model, x), call(small, x)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in small.parameters())
    return ref, out, n_before, n_after


def test_removing_zero_importance_channels_is_exact_on_a_resnet():
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.ResNetCNN("basic", (1, 1, 1, 1), (8, 16, 16, 32), 10, stem="3x3"))
    ref, out, n0, n1 = exact_after_removing_zeros(model, torch.randn(2, 3, 16, 16))
    assert out.shape == ref.shape and n1 < n0
    assert (out - ref).abs().max().item() <= 1e-6


def test_removing_zero_importance_channels_is_exact_on_a_mobilenet():
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.MobileNetV2Like(10, width=0.25, stages=zoo.MOBILENET_V2_STAGES[:4]))
    ref, out, n0, n1 = exact_after_removing_zeros(model, torch.randn(2, 3, 32, 32))
    assert out.shape == ref.shape and n1 < n0
    assert (out - ref).abs().max().item() <= 1e-6


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16, attn_implementation="sdpa")
    return BertModel(cfg).eval()


def test_removing_zero_importance_heads_and_neurons_is_exact_on_a_bert():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 8))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref, out, n0, n1 = exact_after_removing_zeros(model, enc, call=lambda m, x: m(**x).last_hidden_state)
    assert out.shape == ref.shape and n1 < n0
    assert (out - ref).abs().max().item() <= 1e-6


def test_bert_heads_removed_updates_the_head_count_and_keeps_the_user_model():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (2, 8))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = prune_channels(model, enc, {"heads": 0.5, "neurons": 0.5})
    att = res.model.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.query.out_features == 16
    assert res.model.encoder.layer[0].intermediate.dense.out_features == 24
    assert res.removed == {"heads": (4, 8), "neurons": (48, 96)}
    assert res.model(**enc).last_hidden_state.shape == (2, 8, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "2/4 heads" not in res.summary() and "4/8 heads" in res.summary()


class HardCodedHeads(nn.Module):
    """Attention whose forward writes its head count: removing heads must be refused, not silently wrong."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 16)
        self.heads = 4

    def forward(self, x):
        b, s, _ = x.shape
        h = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(h, h, h).transpose(1, 2).reshape(b, s, -1))


def test_a_forward_that_writes_its_sizes_is_caught_by_the_check():
    with pytest.raises(StructureError, match="view"):
        prune_channels(HardCodedHeads().eval(), torch.randn(2, 3, 16), 0.5)


class MLP(nn.Module):
    def __init__(self, k=8, n=32):
        super().__init__()
        self.up, self.down = nn.Linear(k, n), nn.Linear(n, k)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def test_activation_importance_sees_dead_neurons_that_magnitude_keeps():
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.up.weight[3].zero_()
        model.up.bias[3] = -5.0  # neuron 3 never fires, but its weights are large
        model.down.weight[:, 3] = 10.0
    x = torch.randn(4, 8)
    groups = model_channel_groups(model, x)
    data = [(torch.randn(16, 8), None) for _ in range(3)]
    mag = group_importance(model, groups, "magnitude")[0]
    act = group_importance(model, groups, "activation", data=data)[0]
    assert mag[3] > np.median(mag) and act[3] == 0.0
    taylor = group_importance(model, groups, "taylor", data=[(torch.randn(16, 8), torch.randn(16, 8))] * 2,
                              loss_fn=F.mse_loss)[0]
    assert taylor.shape == (32,) and np.all(np.isfinite(taylor)) and taylor.min() >= 0 and taylor[3] == 0.0
    with pytest.raises(InvalidArgumentError, match="loss_fn"):
        group_importance(model, groups, "taylor", data=data)
    with pytest.raises(InvalidArgumentError, match="importance"):
        group_importance(model, groups, "l2")


def test_reconstruction_lowers_the_output_error():
    torch.manual_seed(0)
    model = MLP(8, 64).eval()
    data = [(torch.randn(64, 8), None) for _ in range(4)]
    x = torch.randn(256, 8)
    plain = prune_channels(model, x[:4], 0.5).model
    rec = prune_channels(model, x[:4], 0.5, data=data, reconstruct=True)
    (name, before, after), = rec.reconstruction
    assert name == "down" and after < before
    with torch.no_grad():
        e_plain = (plain(x) - model(x)).pow(2).mean()
        e_rec = (rec.model(x) - model(x)).pow(2).mean()
    assert e_rec < 0.8 * e_plain


def test_sparsity_values_and_errors():
    model = MLP().eval()
    x = torch.randn(2, 8)
    with pytest.raises(InvalidSparsityError):
        prune_channels(model, x, 1.0)
    with pytest.raises(InvalidArgumentError, match="data"):
        prune_channels(model, x, 0.5, reconstruct=True)
    with pytest.raises(InvalidArgumentError, match="model"):
        prune_channels(lambda t: t, x, 0.5)
    small = prune_channels(model, x, 0.3, round_to=8).model
    assert small.up.out_features == 24  # 32 - round(0.3 * 32) = 22, rounded up to 24
    groups = model_channel_groups(model, x)
    with pytest.raises(StructureError, match="every unit"):
        remove_channels(model, groups, {0: torch.zeros(32, dtype=torch.bool)}, x)


def test_sparsify_channel_returns_a_smaller_finetuned_model():
    torch.manual_seed(0)
    model = zoo.FashionCNN().eval()
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    res = sparsecc.sparsify(model, data[0][0], sparsity=0.5, pattern="channel", method="impact", data=data,
                            loss_fn=F.cross_entropy, eval_fn=lambda m: 0.5, finetune_steps=3, progress=False)
    assert res.model.conv1.out_channels == 16 and res.model.fc1.in_features == 32 * 7 * 7
    assert len(res.history) == 3 and all(np.isfinite(h["loss"]) for h in res.history)
    conv1 = next(c for c in res.layers if c.name == "conv1")
    assert conv1.pattern == "channel" and conv1.density == pytest.approx(0.5)
    assert 0.7 < res.sparsity < 0.8  # fc1 and conv2 lose both halves
    assert model.conv1.out_channels == 32
    with pytest.raises(InvalidSparsityError, match="channel"):
        sparsecc.sparsify(model, data[0][0], pattern="channel", accuracy_budget=0.01, eval_fn=lambda m: 0.5)


def test_compile_removes_channels_then_prunes_inside():
    torch.manual_seed(0)
    model = zoo.FashionCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    cm = sparsecc.compile(model, x, channel_sparsity=0.5, sparsity=0.5, pattern="unstructured", measure=False)
    ref = sparsecc.prune(prune_channels(model, x, 0.5).model, 0.5)
    with torch.no_grad():
        assert (cm(x) - ref(x)).abs().max().item() <= 1e-4
    assert "structured pruning first: removed 48/96 channels, 256/512 neurons" in cm.report()
    assert cm.weight_bytes < cm.original_weight_bytes / 3


# -- property: on every hand-built graph of the analysis tests, removing zeroed units is exact ----------------

from hypothesis import given, settings, strategies as st  # noqa: E402

import tests.passes.test_channels as hand  # noqa: E402

HAND_BUILT = [(hand.Residual, (1, 3, 8, 8)), (hand.Concat, (2, 3, 5, 5)), (lambda: hand.Grouped(8), (1, 3, 6, 6)),
              (hand.Heads, (2, 5, 16)), (hand.FlattenHead, (2, 1, 4, 4))]


@settings(max_examples=8, deadline=None)
@given(which=st.integers(0, len(HAND_BUILT) - 1), seed=st.integers(0, 2**16), frac=st.floats(0.1, 0.9))
def test_zeroed_units_removed_exactly_on_hand_built_graphs(which, seed, frac):
    make, shape = HAND_BUILT[which]
    torch.manual_seed(seed)
    model = make().eval()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            zoo.randomize_batchnorm(model, seed)
    x = torch.randn(*shape)
    groups = model_channel_groups(model, x)
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        n_zero = min(g.size - 1, max(1, int(frac * g.size)))
        units = rng.choice(g.size, size=n_zero, replace=False)
        zero_units(model, g, units)
        k = torch.ones(g.size, dtype=torch.bool)
        k[torch.as_tensor(units)] = False
        for m in g.members:  # a member losing every entry (one input of a concat) is refused: keep one
            own = np.unique(m.unit_of)
            if not bool(k[torch.as_tensor(own)].any()):
                k[int(own[0])] = True  # (still zero: keeping it changes nothing)
        keep[g.id] = k
    small = remove_channels(model, groups, keep, x)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_split_with_sizes_written_in_the_forward_is_refused():
    """``torch.split(x, [3, 5])`` keeps its sizes when channels go: the check must refuse, not run it wrong."""
    model = hand.SplitPlain().eval()
    with pytest.raises(StructureError, match="no longer runs"):
        prune_channels(model, torch.randn(1, 3, 4, 4), 0.5)


def test_global_allocation_pools_units_of_a_kind_and_keeps_a_floor():
    from sparsecc.sparsify.structured import keep_global

    model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 8), nn.Linear(8, 40), nn.ReLU(),
                          nn.Linear(40, 8)).eval()
    groups = model_channel_groups(model, torch.randn(2, 8))
    sizes = sorted(g.size for g in groups)
    assert sizes == [8, 20, 40]
    imp = {g.id: (np.arange(g.size) + 1.0) * (100.0 if g.size == 40 else 1.0) for g in groups}
    keep = keep_global(imp, groups, 0.5)
    kept = {g.size: int(keep[g.id].sum()) for g in groups}
    assert sum(g.size - kept[g.size] for g in groups) == round(0.5 * 68)
    assert kept[20] == 2 and kept[8] == 1  # the low-importance groups go down to their 10% floor
    small = remove_channels(model, groups, keep, torch.randn(2, 8))
    assert small[0].out_features == 2 and small[3].out_features == kept[40]


def test_reconstruct_all_refits_every_linear():
    torch.manual_seed(0)
    model = MLP(8, 64).eval()
    data = [(torch.randn(64, 8), None) for _ in range(4)]
    res = prune_channels(model, torch.randn(4, 8), 0.5, data=data, reconstruct="all")
    assert [r[0] for r in res.reconstruction] == ["up", "down"]
    assert set(res.kept_rows()) == {"up"} and res.kept_rows()["up"].numel() == 32
    with pytest.raises(InvalidArgumentError, match="reconstruct"):
        prune_channels(model, torch.randn(4, 8), 0.5, data=data, reconstruct="some")


def test_removing_every_channel_of_one_concat_input_is_refused_and_the_default_keeps_one():
    model = hand.Concat().eval()
    x = torch.randn(1, 3, 5, 5)
    groups = model_channel_groups(model, x)
    k = torch.ones(10, dtype=torch.bool)
    k[:4] = False  # all of conv a's outputs
    with pytest.raises(StructureError, match=r"a\.(weight|bias): every entry"):
        remove_channels(model, groups, {0: k}, x)
    imp = {0: np.r_[np.zeros(4), np.arange(6) + 1.0]}
    from sparsecc.sparsify.structured import keep_lowest_removed

    keep = keep_lowest_removed(imp, groups, 0.5)
    assert int(keep[0][:4].sum()) == 1 and int(keep[0].sum()) == 6
