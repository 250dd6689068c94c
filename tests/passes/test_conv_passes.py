"""Conv passes: BatchNorm folding, conv pruning, format choice and lowering of a small residual CNN."""

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.formats import Candidate
from sparsecc.ir.capture import capture
from sparsecc.passes import PassContext, PassManager, default_pipeline
from sparsecc.passes.conv import FoldBatchNorm, conv_candidates, prunable_conv_sites
from sparsecc.runtime.conv import SparseConv2d
from sparsecc.sparsify.patterns import as_matrix
from sparsecc.zoo import ResNetCNN, randomize_batchnorm
from tests.conftest import FakeTarget


class ConvTarget(FakeTarget):
    """Hand-set cost model (sparse wins at low density) with the real TVM conv kernels (the x86 ones)."""

    kind = "x86"
    layer_formats = {"linear": frozenset({"csr", "bsr"}), "conv2d": frozenset({"csr", "bsr"})}

    def tvm_target(self):
        from sparsecc.targets.x86 import host_target

        return host_target()


def small_resnet(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(ResNetCNN("basic", (1, 1), (16, 32), num_classes=10, stem="3x3"), seed).eval()


def n_targets(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_fold_batchnorm_is_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 1, stride=2), nn.BatchNorm2d(8))
    randomize_batchnorm(m, seed=1).eval()
    x = torch.randn(2, 3, 9, 9)
    graph = capture(m, x)
    assert n_targets(graph.gm, torch.ops.aten.batch_norm.default) == 2
    res = FoldBatchNorm().run(graph, PassContext())
    assert res.modified and res.info["folded"] == 2
    graph.gm.graph.lint()
    graph.gm.recompile()
    assert n_targets(graph.gm, torch.ops.aten.batch_norm.default) == 0
    assert not any("running_mean" in n for n, _ in graph.gm.named_buffers())  # statistics dropped
    torch.testing.assert_close(graph.gm(x), m(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_keeps_bn_when_conv_output_is_shared():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = randomize_batchnorm(Two()).eval()
    x = torch.randn(1, 3, 6, 6)
    graph = capture(m, x)
    res = FoldBatchNorm().run(graph, PassContext())
    assert not res.modified
    torch.testing.assert_close(graph.gm(x), m(x))


def test_depthwise_and_grouped_convs_stay_in_torch():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 16, 1)).eval()
    graph = capture(m, torch.randn(1, 8, 8, 8))
    assert [s.name for s in prunable_conv_sites(graph)] == ["2"]


def test_conv_candidates_need_channel_aligned_row_blocks():
    cands = conv_candidates("auto", (32, 6, 3, 3), 0.2)
    assert Candidate("bsr", (16, 1)) in cands and Candidate("csr", (1, 1)) in cands
    assert Candidate("bsr", (1, 4)) not in cands  # K = 54 is not a multiple of 4 anyway
    cands = conv_candidates("auto", (32, 4, 3, 3), 0.2)  # K = 36: 1x4 tiles, and 4 divides C_in
    assert Candidate("bsr", (1, 4)) in cands and Candidate("bsr", (1, 8)) not in cands
    cands = conv_candidates("auto", (32, 6, 1, 2), 0.2)  # K = 12: 1x4 tiles, but 4 does not divide C_in
    assert Candidate("bsr", (1, 4)) not in cands and Candidate("bsr", (4, 1)) in cands
    assert conv_candidates("block", (32, 4, 3, 3), 1.0) == [Candidate("dense")]
    # unstructured convs: the NHWC CSR and the direct (xcsr) kernels; N:M has no conv kernel
    cands = conv_candidates("unstructured", (8, 4, 3, 3), 0.3)
    assert Candidate("xcsr") in cands and Candidate("csr", (1, 1)) in cands
    assert all(c.format != "nm" for c in conv_candidates("auto", (8, 4, 3, 3), 0.5))


def test_prune_convs_in_matrix_blocks_matches_sparsecc_prune():
    m = small_resnet()
    x = torch.randn(1, 3, 8, 8)
    ref = sparsecc.prune(m, 0.75, block_shape=(16, 1))
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Conv2d):
            mat = as_matrix(mod.weight)
            blocks = (mat != 0).reshape(mat.shape[0] // 16, 16, -1).any(1)
            # every block is all-zero or fully kept and 25% of the blocks are kept
            assert torch.equal((mat != 0).reshape(mat.shape[0] // 16, 16, -1).all(1), blocks), name
            assert abs(blocks.float().mean().item() - 0.25) < 0.02, name
    assert float((m.layer1[0].conv1.weight == 0).float().mean()) < 0.01  # the user's model is untouched
    graph = capture(m, x)
    ctx = PassContext(target=ConvTarget())
    graph = PassManager(default_pipeline(ctx.target, 0.75, "block", (16, 1), measure=False)[:1]).run(graph, ctx)
    ref_mods = dict(ref.named_modules())
    for s in prunable_conv_sites(graph):
        assert torch.equal(graph.tensor(s.weight) != 0, ref_mods[s.name].weight != 0), s.name


def test_compile_small_residual_cnn_matches_pruned_reference():
    m = small_resnet()
    x = torch.randn(2, 3, 9, 7)  # batch 2, odd H and W
    graph = capture(m, x)
    ctx = PassContext(target=ConvTarget())
    graph = PassManager(default_pipeline(ctx.target, 0.7, "block", (16, 1), measure=False)).run(graph, ctx)
    mods = [mod for mod in graph.gm.modules() if isinstance(mod, SparseConv2d)]
    assert len(mods) == 6  # every conv, stem and 1x1 downsample included
    assert sum(mod.residual for mod in mods) == 2  # relu(conv + identity) fused in both blocks
    assert n_targets(graph.gm, torch.ops.aten.conv2d.default) == 0
    assert n_targets(graph.gm, torch.ops.aten.batch_norm.default) == 0
    ref = sparsecc.prune(m, 0.7, block_shape=(16, 1))
    y, r = graph.gm(x), ref(x)
    assert (y - r).abs().max() <= 1e-4 * r.abs().max()
    x2 = torch.randn(2, 3, 9, 7)
    torch.testing.assert_close(graph.gm(x2), ref(x2), atol=1e-4, rtol=1e-4)


def test_relu6_is_fused_and_dense_convs_keep_working():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, groups=16),
                      nn.Conv2d(16, 16, 1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 6, 6)
    graph = capture(m, x)
    ctx = PassContext(target=ConvTarget())
    graph = PassManager(default_pipeline(ctx.target, 0.6, "block", (16, 1), measure=False)).run(graph, ctx)
    mods = {mod.activation for mod in graph.gm.modules() if isinstance(mod, SparseConv2d)}
    assert mods == {"relu6", "relu"}
    assert n_targets(graph.gm, torch.ops.aten.hardtanh.default) == 0
    assert n_targets(graph.gm, torch.ops.aten.conv2d.default) == 1  # the depthwise conv
    ref = sparsecc.prune(m, 0.6, block_shape=(16, 1))
    torch.testing.assert_close(graph.gm(x), ref(x), atol=1e-4, rtol=1e-4)


def test_sparsecc_compile_on_host_matches_and_reports_convs():
    m = small_resnet(1)
    x = torch.randn(1, 3, 8, 8)
    cm = sparsecc.compile(m, x, sparsity=0.8, pattern="block", block_shape=(16, 1), measure=False)
    ref = sparsecc.prune(m, 0.8, block_shape=(16, 1))
    torch.testing.assert_close(cm(x), ref(x), atol=1e-4, rtol=1e-4)
    convs = [a for a in cm.layers if a.kind == "conv2d"]
    assert len(convs) == 6 and all(abs(a.density - 0.2) < 0.05 for a in convs)
    assert all(a.format in ("dense", "bsr") and a.est_ms for a in convs)


def test_unknown_conv_layer_in_sparsity_dict():
    with pytest.raises(sparsecc.UnknownLayerError, match="nope"):
        sparsecc.prune(small_resnet(), {"nope": 0.5})
    m = sparsecc.prune(small_resnet(), {"layer1.0.conv1": 0.5})
    assert abs(float((m.layer1[0].conv1.weight == 0).float().mean()) - 0.5) < 0.01
    assert float((m.layer1[0].conv2.weight == 0).float().mean()) < 0.01


def test_dropping_folded_bn_attrs_keeps_kernel_modules_buffers():
    """Regression: BN folding's clean-up deleted the buffers of linears lowered before it (a ResNet's fc)."""
    import torch.fx as fx

    from sparsecc.ir.rewrite import delete_unused_attrs

    class Kernel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("data", torch.ones(3))

        def forward(self, x):
            return x * self.data

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = Kernel()
            self.register_buffer("stale_running_mean", torch.zeros(3))

        def forward(self, x):
            return self.kernel(x)

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return qualname == "kernel" or super().is_leaf_module(m, qualname)

    root = M()
    gm = fx.GraphModule(root, Leaf().trace(root))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    delete_unused_attrs(gm)
    names = {n for n, _ in gm.named_buffers()}
    assert names == {"kernel.data"}
    assert torch.equal(gm(torch.full((3,), 2.0)), torch.full((3,), 2.0))
