import pytest
import torch

from sparsecc.ir import capture, get_annotation
from sparsecc.passes import DetectSparsity, PassContext, detect_block_shape
from sparsecc.passes.prune import magnitude_masks


@pytest.mark.parametrize("block", [(4, 1), (8, 1), (16, 1), (1, 4), (1, 8), (4, 4)])
def test_detects_the_block_it_was_pruned_with(block):
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    w = w * magnitude_masks({"w": w}, 0.8, block)["w"]
    found, fill = detect_block_shape(w)
    assert fill[block] == pytest.approx(1.0)
    assert found == block
    assert fill[(1, 1)] == 1.0


def test_unstructured_has_fill_in():
    torch.manual_seed(2)
    w = torch.randn(32, 32)
    w[torch.rand(32, 32) < 0.7] = 0
    found, fill = detect_block_shape(w)
    assert found == (1, 1)
    assert fill[(8, 1)] > 2.0  # 30% density: almost every 8x1 block holds a nonzero


def test_non_tiling_shapes_are_skipped():
    w = torch.zeros(6, 10)
    w[0, 0] = 1
    _, fill = detect_block_shape(w)
    assert set(fill) == {(1, 1)}


def test_detect_pass_annotates(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    s = g.site("fc2")
    w = g.tensor(s.weight)
    g.set_tensor(s.weight, w * magnitude_masks({"w": w}, 0.75, (8, 1))["w"])
    res = DetectSparsity().run(g, PassContext())
    assert res.modified is False
    a1, a2 = get_annotation(g.site("fc1").node), get_annotation(g.site("fc2").node)
    assert a1.pattern == "dense" and a1.density == 1.0 and a1.nnz == 64 * 32
    assert a2.pattern == "block" and a2.density == pytest.approx(0.25) and a2.block_shape in {(8, 1), (16, 1)}
    assert a2.weight_shape == (64, 64) and a2.sparsity == pytest.approx(0.75)
