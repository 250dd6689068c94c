"""Importance scores and patterns on tiny layers, against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InvalidSparsityError
from sparsecc.sparsify.patterns import (Pattern, as_matrix, from_matrix, mask_from_scores, nm_keep,
                                        parse_pattern)
from sparsecc.sparsify.scores import ImpactScore, MagnitudeScore, MovementScore

W = torch.tensor([[1.0, -2.0, 0.5, 3.0],
                  [-0.1, 0.2, -4.0, 1.0]])
G1 = torch.tensor([[0.5, 0.5, -2.0, 0.0],
                   [1.0, -1.0, 0.25, 2.0]])
G2 = torch.tensor([[-1.0, 0.5, 2.0, 1.0],
                   [0.0, 1.0, 0.25, -1.0]])


def test_magnitude_is_abs_weight():
    assert torch.equal(MagnitudeScore().score("l", W), W.abs())


def test_impact_sums_abs_w_times_grad_over_batches():
    s = ImpactScore()
    s.accumulate("l", W, G1)
    s.accumulate("l", W, G2)
    # by hand: |w*g1| + |w*g2|
    expected = torch.tensor([[0.5 + 1.0, 1.0 + 1.0, 1.0 + 1.0, 0.0 + 3.0],
                             [0.1 + 0.0, 0.2 + 0.2, 1.0 + 1.0, 2.0 + 1.0]])
    torch.testing.assert_close(s.score("l", W), expected)
    s.reset()
    with pytest.raises(RuntimeError, match="no gradients"):
        s.score("l", W)


def test_movement_is_minus_sum_w_times_grad():
    s = MovementScore()
    s.accumulate("l", W, G1)
    s.accumulate("l", W, G2)
    expected = torch.tensor([[-(0.5 - 1.0), -(-1.0 - 1.0), -(-1.0 + 1.0), -(0.0 + 3.0)],
                             [-(-0.1 + 0.0), -(-0.2 + 0.2), -(-1.0 - 1.0), -(2.0 - 1.0)]])
    torch.testing.assert_close(s.score("l", W), expected)
    # a weight moving away from zero (w and -grad same sign) scores positive
    assert float(s.score("l", W)[0, 1]) == 2.0


def test_block_mask_keeps_highest_mean_blocks():
    # 2x2 blocks of |W|: means [[ (1+2+.1+.2)/4, (.5+3+4+1)/4 ]] = [[0.825, 2.125]]
    keep = mask_from_scores(W.abs(), 0.5, Pattern("block", block=(2, 2)))
    assert keep[:, :2].sum() == 0 and keep[:, 2:].all()


def test_nm_mask_keeps_top_n_per_group_along_k():
    keep = mask_from_scores(W.abs(), 0.0, parse_pattern("2:4"))  # density ignored: N/M
    assert keep.tolist() == [[False, True, False, True], [False, False, True, True]]
    assert (keep.reshape(-1, 4).sum(1) == 2).all()


def test_channel_mask_prunes_whole_rows():
    keep = mask_from_scores(W.abs(), 0.5, parse_pattern("channel"))
    # row means: 1.625 vs 1.325
    assert keep[0].all() and not keep[1].any()


def test_unstructured_mask_density_and_ties():
    keep = mask_from_scores(W.abs(), 0.25, parse_pattern("unstructured"))
    assert int(keep.sum()) == 2 and keep[1, 2] and keep[0, 3]
    assert int(mask_from_scores(W.abs(), 0.0, Pattern("unstructured")).sum()) == 0
    assert bool(mask_from_scores(W.abs(), 1.0, Pattern("unstructured")).all())


def test_pruned_weights_marked_minus_inf_stay_pruned():
    sc = W.abs().clone()
    sc[0, 3] = -math.inf  # the largest weight, already pruned
    keep = mask_from_scores(sc, 0.5, Pattern("unstructured"))
    assert not keep[0, 3] and int(keep.sum()) == 4


def test_conv_matrix_view_round_trips_and_groups_along_input_channels():
    w = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    m = as_matrix(w)
    assert m.shape == (2, 36)
    assert torch.equal(m[0, :4], w[0, :, 0, 0])  # consecutive K entries are input channels
    assert torch.equal(from_matrix(m, w.shape), w)


@pytest.mark.parametrize("bad", ["4:2", "0:4", "blocky", "block", 3])
def test_bad_patterns_raise(bad):
    with pytest.raises(InvalidSparsityError):
        parse_pattern(bad)


def test_pattern_that_does_not_divide_raises():
    with pytest.raises(InvalidSparsityError, match="does not divide"):
        mask_from_scores(torch.rand(6, 6), 0.5, Pattern("block", block=(4, 1)))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 5), n=st.integers(1, 3), data=st.data())
def test_nm_property_exactly_n_per_group(rows, groups, n, data):
    m = data.draw(st.integers(n + 1, 8))
    sc = torch.rand(rows, groups * m)
    keep = nm_keep(sc, n, m)
    assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    # every kept score is ≥ every pruned score of its group
    g = sc.reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    kept_min = torch.where(k, g, torch.full_like(g, 2.0)).min(-1).values
    pruned_max = torch.where(~k, g, torch.full_like(g, -1.0)).max(-1).values
    assert (kept_min >= pruned_max).all()


@settings(max_examples=40, deadline=None)
@given(br=st.sampled_from([1, 2, 4]), bc=st.sampled_from([1, 2]), nb=st.integers(1, 4), kb=st.integers(1, 4),
       density=st.floats(0.0, 1.0))
def test_block_mask_property(br, bc, nb, kb, density):
    sc = torch.rand(nb * br, kb * bc)
    keep = mask_from_scores(sc, density, Pattern("block", block=(br, bc)) if (br, bc) != (1, 1) else Pattern("unstructured"))
    blocks = keep.reshape(nb, br, kb, bc).permute(0, 2, 1, 3).reshape(nb * kb, -1)
    assert ((blocks.sum(1) == 0) | (blocks.sum(1) == br * bc)).all()  # blocks all kept or all pruned
    assert int(blocks.all(1).sum()) == int(round(nb * kb * density))
