"""The gated-linear kernel against torch: random and edge shapes, every schedule, levels, IEEE values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.errors import InputShapeError, InvalidArgumentError
from sparsecc.runtime.gated import GatedLinear, gate_keep, gated_reference, tile_options


def _layer(k, n, thresholds, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return w, b, GatedLinear(w, b, thresholds, name="layer")


@pytest.mark.parametrize("k,n", [(1536, 384), (64, 48), (100, 10), (7, 16), (33, 130)])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_every_schedule_matches_torch(k, n, m):
    h = F.gelu(torch.randn(m, k, generator=torch.Generator().manual_seed(1)))
    th = [0.0, float(h.abs().median()), float(h.abs().quantile(0.9))]
    w, b, mod = _layer(k, n, th)
    for level, t in enumerate(th):
        ref = gated_reference(h, w, b, t)
        for sched in tile_options(n):
            out = mod._run(h, sched, level)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 200), m=st.integers(1, 40), q=st.floats(0.0, 1.0),
       bias=st.booleans(), relu=st.booleans())
def test_property_random_shapes(k, n, m, q, bias, relu):
    h = torch.randn(m, k, generator=torch.Generator().manual_seed(k * 1000 + n))
    h = torch.relu(h) if relu else h
    t = float(h.abs().reshape(-1).quantile(q))
    w, b, mod = _layer(k, n, [t], seed=m, bias=bias)
    torch.testing.assert_close(mod(h), gated_reference(h, w, b, t), rtol=1e-4, atol=1e-4)


def test_threshold_zero_is_the_dense_layer_on_relu_activations():
    h = torch.relu(torch.randn(64, 512, generator=torch.Generator().manual_seed(2)))
    w, b, mod = _layer(512, 256, [0.0])
    assert float((h == 0).float().mean()) > 0.4  # the skipped rows are really there
    torch.testing.assert_close(mod(h), F.linear(h, w, b), rtol=1e-5, atol=1e-5)


def test_all_inactive_gives_the_bias_and_all_active_the_dense_product():
    h = torch.randn(5, 96, generator=torch.Generator().manual_seed(3))
    w, b, mod = _layer(96, 32, [0.0, float(h.abs().max()) + 1.0])
    mod.set_level(1)
    torch.testing.assert_close(mod(h), b.expand(5, 32), rtol=0, atol=0)
    assert mod.realized_density(h) == 0.0
    mod.set_level(0)
    torch.testing.assert_close(mod(h), F.linear(h, w, b), rtol=1e-5, atol=1e-5)
    assert mod.realized_density(h) == 1.0


def test_one_token_and_leading_dims():
    w, b, mod = _layer(128, 64, [0.3])
    h = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(4))
    out = mod(h)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out.reshape(6, 64), gated_reference(h.reshape(6, 128), w, b, 0.3), rtol=1e-5,
                               atol=1e-5)
    one = mod(h[0, 0])
    assert one.shape == (64,)
    torch.testing.assert_close(one, out[0, 0], rtol=1e-5, atol=1e-5)
    assert mod(torch.empty(0, 128)).shape == (0, 64)


def test_nan_and_inf_activations_behave_as_in_torch():
    w, b, mod = _layer(64, 32, [0.5])
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    h[0, 3], h[1, 7], h[2, 9] = float("nan"), float("inf"), -float("inf")
    assert bool(gate_keep(h, 0.5)[0, 3])  # a NaN is never gated away
    out, ref = mod(h), gated_reference(h, w, b, 0.5)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out[0]).all())
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)
    assert torch.equal(out[~fin & ~torch.isnan(ref)], ref[~fin & ~torch.isnan(ref)])


def test_non_finite_weight_in_a_skipped_row_takes_torch_path():
    w, b, _ = _layer(16, 8, [0.5])
    w[:, 0] = float("inf")
    mod = GatedLinear(w, b, [0.5])
    h = torch.ones(2, 16)
    h[:, 0] = 0.1  # gated away: torch still multiplies 0 · inf = NaN
    ref = gated_reference(h, w, b, 0.5)
    assert bool(torch.isnan(ref).all())
    assert torch.equal(torch.isnan(mod(h)), torch.isnan(ref))


def test_levels_nested_and_validated():
    with pytest.raises(InvalidArgumentError, match="non-decreasing"):
        GatedLinear(torch.randn(4, 8), None, [0.5, 0.1], name="fc")
    with pytest.raises(InvalidArgumentError, match="'fc'"):
        GatedLinear(torch.randn(4, 8), None, [-1.0], name="fc")
    with pytest.raises(InvalidArgumentError):
        GatedLinear(torch.randn(4, 8), None, [], name="fc")
    w, b, mod = _layer(64, 16, [0.0, 0.5, 1.0])
    with pytest.raises(InvalidArgumentError, match="level"):
        mod.set_level(3)
    h = torch.randn(10, 64, generator=torch.Generator().manual_seed(6))
    keeps = [gate_keep(h, float(t)) for t in mod.thresholds.reshape(-1)]
    for denser, sparser in zip(keeps, keeps[1:]):
        assert bool((sparser <= denser).all())  # each level's kept set within the denser one's
    dens = [mod.realized_density(h, lv) for lv in range(3)]
    assert dens[0] >= dens[1] >= dens[2] and dens[2] < dens[0]


def test_bad_input_is_named():
    _, _, mod = _layer(32, 8, [0.1])
    with pytest.raises(InputShapeError, match="32"):
        mod(torch.randn(3, 31))
