import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsecc.errors import InvalidSparsityError, UnknownLayerError
from sparsecc.ir import capture
from sparsecc.passes import MagnitudePrune, PassContext, magnitude_masks
from sparsecc.passes.prune import block_scores


def test_unstructured_global_threshold_by_hand():
    a = torch.tensor([[1.0, -5.0], [0.5, 3.0]])
    b = torch.tensor([[-4.0, 0.1]])
    masks = magnitude_masks({"a": a, "b": b}, 0.5, (1, 1), scope="global")  # 6 weights, keep 3 largest |w|: 5, 4, 3
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [[True, False]]


def test_layer_scope_prunes_each_to_its_sparsity():
    a = torch.arange(1.0, 9.0).reshape(2, 4)
    b = torch.arange(1.0, 9.0).reshape(2, 4) * 100
    masks = magnitude_masks({"a": a, "b": b}, 0.75, (1, 1), scope="layer")
    assert int(masks["a"].sum()) == 2 and int(masks["b"].sum()) == 2
    assert masks["a"][1, 2:].all() and masks["b"][1, 2:].all()


def test_block_scores_and_block_masks():
    w = torch.zeros(16, 4)
    w[0:8, 1] = 3.0      # strong 8x1 block
    w[8:16, 2] = 1.0     # weaker
    w[8:16, 3] = 0.01
    sc = block_scores(w, (8, 1))
    assert sc.shape == (2, 4)
    assert sc[0, 1] == pytest.approx(3.0) and sc[1, 2] == pytest.approx(1.0)
    masks = magnitude_masks({"w": w}, 0.75, (8, 1), scope="global")  # 8 blocks, keep 2
    kept = masks["w"]
    assert kept[0:8, 1].all() and kept[8:16, 2].all() and int(kept.sum()) == 16


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([(1, 1), (4, 1), (8, 1), (1, 4), (4, 4)]),
       st.floats(0.0, 0.99))
def test_global_block_prune_reaches_requested_sparsity(nb, kb, block, s):
    torch.manual_seed(nb * 7 + kb)
    n, k = nb * block[0] * 2, kb * block[1] * 2
    weights = {"x": torch.randn(n, k), "y": torch.randn(n, k) * 3}
    masks = magnitude_masks(weights, s, block, scope="global")
    total = 2 * n * k
    kept = sum(int(m.sum()) for m in masks.values())
    area = block[0] * block[1]
    assert abs(kept - total * (1 - s)) <= area  # exact up to one block
    for m in masks.values():  # every block all-kept or all-pruned
        blocks = m.reshape(n // block[0], block[0], k // block[1], block[1]).float().mean(dim=(1, 3))
        assert ((blocks == 0) | (blocks == 1)).all()


def test_prune_pass_on_graph_and_errors(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    res = MagnitudePrune({"fc1": 0.5, "fc2": 0.9}).run(g, PassContext())
    assert res.modified
    w1, w2, w3 = (g.tensor(s.weight) for s in g.linear_sites())
    assert float((w1 == 0).float().mean()) == pytest.approx(0.5)
    assert float((w2 == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)
    assert int((w3 == 0).sum()) == 0
    assert int((mlp.fc1.weight == 0).sum()) == 0  # user's model untouched
    with pytest.raises(UnknownLayerError, match="'fc9'"):
        MagnitudePrune({"fc9": 0.5}).run(g, PassContext())
    with pytest.raises(InvalidSparsityError, match="'fc1'.*1.0"):
        MagnitudePrune({"fc1": 1.0})
    with pytest.raises(InvalidSparsityError, match="-0.1"):
        MagnitudePrune(-0.1)


def test_default_layer_scope_prunes_every_layer_to_the_sparsity(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    MagnitudePrune(0.75, block=(4, 1)).run(g, PassContext())
    for s in g.linear_sites():
        w = g.tensor(s.weight)
        assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=1e-6), s.name
