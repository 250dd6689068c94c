"""Bad or unusual inputs get a SparseccError naming the argument (or a warning when the result is right but
differs from what the user may expect), and the user's model and files are left as they were."""

import os
import warnings

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.errors import (DataError, InputShapeError, InvalidArgumentError, InvalidSparsityError, PatternWarning,
                             SparseccError, TrainModeWarning, UnknownLayerError)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_a_call_outside_the_dynamic_range_names_the_input_and_the_range():
    b = torch.export.Dim("b", min=1, max=8)
    cm = sparsecc.compile(_mlp(), (torch.randn(4, 16),), sparsity=0.5, dynamic_shapes=({0: b},), measure=False)
    assert cm(torch.randn(8, 16)).shape == (8, 8)
    with pytest.raises(InputShapeError, match=r"dim 0 is 20, outside the range .* \(1 to 8"):
        cm(torch.randn(20, 16))


def test_keyword_inputs_are_matched_by_name():
    model = _mlp()
    x = torch.randn(4, 16)
    cm = sparsecc.compile(model, (x,), sparsity=0.5, measure=False)  # compiled with a positional input
    ref = sparsecc.prune(model, 0.5)(x)
    torch.testing.assert_close(cm(input=x), ref)  # nn.Sequential.forward(input)
    with pytest.raises(InputShapeError, match="'x' is not an input of the compiled model"):
        cm(x=x)
    with pytest.raises(InputShapeError, match="both by position and by keyword"):
        cm(x, input=x)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 8), nn.Linear(4, 8)

        def forward(self, left, right):
            return self.a(left) - self.b(right)

    two = Two().eval()
    l_, r_ = torch.randn(3, 16), torch.randn(3, 4)  # different shapes: the order of the checks matters
    cm = sparsecc.compile(two, {"left": l_, "right": r_}, sparsity=0.5, measure=False)
    ref = sparsecc.prune(two, 0.5)(left=l_, right=r_)
    torch.testing.assert_close(cm(right=r_, left=l_), ref)  # another order than the example's


def test_a_model_that_is_not_a_module_is_named():
    for call in (lambda: sparsecc.compile(lambda t: t * 2, (torch.randn(2),)),
                 lambda: sparsecc.prune(lambda t: t * 2, 0.5),
                 lambda: sparsecc.sparsify("model", (torch.randn(2),), sparsity=0.5)):
        with pytest.raises(InvalidArgumentError, match="model must be a torch.nn.Module"):
            call()


@pytest.mark.parametrize("block", [(0, 1), (1,), (2.5, 1), "4x1"])
def test_bad_block_shapes_of_prune(block):
    with pytest.raises(InvalidSparsityError, match="block_shape"):
        sparsecc.prune(_mlp(), 0.5, block_shape=block)


def test_train_mode_warns_and_compiles_eval_semantics_leaving_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()
    x = torch.randn(8, 16)
    with pytest.warns(TrainModeWarning, match="training mode"):
        cm = sparsecc.compile(model, (x,), measure=False)
    assert model.training and all(m.training for m in model.modules())  # the user's model is untouched
    torch.testing.assert_close(cm(x), model.eval()(x))  # = inference semantics
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainModeWarning)
        sparsecc.compile(model.eval(), (x,), measure=False)  # eval: no warning


def test_a_block_shape_that_tiles_no_layer_warns():
    with pytest.warns(PatternWarning, match=r"block shape \(7, 3\) tiles none of the 2 layers"):
        pruned = sparsecc.prune(_mlp(), 0.5, block_shape=(7, 3))
    assert float((pruned[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # pruned unstructured
    with pytest.warns(PatternWarning, match="tiles not all"):
        pruned = sparsecc.prune(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 7)), 0.5, block_shape=(8, 1))
    assert bool((pruned[0].weight.reshape(4, 8, 16) == 0).all(1).any())  # the tiled layer lost whole 8x1 blocks


def test_unknown_layer_lists_the_prunable_ones():
    with pytest.raises(UnknownLayerError, match="prunable layers are: 0, 2"):
        sparsecc.prune(_mlp(), {"fc7": 0.5})


@pytest.mark.parametrize("data", [[], iter([])])
def test_empty_data_is_a_data_error(data):
    with pytest.raises(DataError, match="data is empty"):
        sparsecc.sparsify(_mlp(), (torch.randn(4, 16),), sparsity=0.5, pattern="unstructured", schedule="oneshot",
                          method="sparsegpt", data=data)


def test_a_generator_of_batches_keeps_its_first_batch():
    x = torch.randn(4, 16)
    seen = []

    def batches():
        for i in range(3):
            seen.append(i)
            yield x + i, None

    res = sparsecc.sparsify(_mlp(), (x,), sparsity=0.5, pattern="unstructured", schedule="oneshot",
                            method="sparsegpt", data=batches(), calib_batches=3)
    assert seen == [0, 1, 2] and res.model is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "bad"])
def test_a_metric_that_is_not_a_finite_number_names_eval_fn(value):
    with pytest.raises(InvalidArgumentError, match="eval_fn"):
        sparsecc.sparsify(_mlp(), (torch.randn(4, 16),), accuracy_budget=0.1, pattern="unstructured",
                          schedule="oneshot", eval_fn=lambda m: value)


def test_export_into_the_current_folder(tmp_path):
    cm = sparsecc.compile(_mlp(), (torch.randn(4, 16),), sparsity=0.5, measure=False)
    here = os.getcwd()
    work = tmp_path / "work"
    work.mkdir()
    try:
        os.chdir(work)
        cm.export(".")
        assert sorted(os.listdir(".")) == ["manifest.json", "model.so", "params.bin"]
        (work / "mine.txt").write_text("keep")
        with pytest.raises(SparseccError, match="not empty"):
            cm.export(".")
        assert (work / "mine.txt").read_text() == "keep"
        cm.export(".", overwrite=True)
        assert sorted(os.listdir(".")) == ["manifest.json", "model.so", "params.bin"]
    finally:
        os.chdir(here)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no stray folder beside it
    x = torch.randn(4, 16)
    torch.testing.assert_close(sparsecc.load(work)(x), cm(x), rtol=1e-4, atol=1e-5)
