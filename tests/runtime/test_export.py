"""cm.export(path): host artifacts loaded with sparsecc.load, aarch64 artifacts run under qemu-aarch64.

Each export builds one Relax module (a few seconds); models are tiny and shapes static.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.errors import ArtifactError, InputShapeError, ToolchainError, UnsupportedOpError


def _mlp():
    torch.manual_seed(0)
    # 1024x1024 is large enough that the cost model picks BSR at M = 10 (tiny layers rightly stay dense:
    # a sparse kernel call costs ~25 us more than torch's)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 8)).eval()


def _small_resnet():
    from sparsecc.zoo import ResNetCNN, randomize_batchnorm

    torch.manual_seed(0)
    return randomize_batchnorm(ResNetCNN("basic", (1, 1), (16, 32), num_classes=10, stem="3x3")).eval()


@pytest.fixture(scope="module")
def host_export(tmp_path_factory):
    model = _mlp()
    x = torch.randn(2, 5, 64)  # leading dims: M = 10 rows, not a multiple of the gemm tile (8)
    cm = sparsecc.compile(model, x, sparsity=0.8, pattern="block", block_shape=(8, 1), measure=False)
    path = tmp_path_factory.mktemp("host") / "artifact"
    cm.export(path)
    return model, cm, x, path


def test_host_export_loads_and_matches(host_export):
    model, cm, x, path = host_export
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.so", "params.bin"]
    manifest = json.loads((path / "manifest.json").read_text())
    # the compiled module's batch dim (0) is dynamic; the artifact fixes it to the example's
    assert manifest["inputs"] == [{"shape": [2, 5, 64], "dtype": "float32", "fixed_dims": [0]}]
    assert manifest["versions"]["sparsecc"] == sparsecc.__version__
    assert any(layer["format"] == "bsr" for layer in manifest["layers"])
    lm = sparsecc.load(path)
    ref = sparsecc.prune(model, 0.8, block_shape=(8, 1))(x)
    x2 = torch.randn(2, 5, 64)
    torch.testing.assert_close(lm(x), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lm(x2), cm(x2), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputShapeError, match=r"\(2, 5, 64\).*dim 0 was dynamic in the compiled module but is fixed"):
        lm(torch.randn(3, 5, 64))


def test_export_never_overwrites_a_user_folder(host_export, tmp_path):
    _, cm, _, _ = host_export
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not empty"):
        cm.export(user)
    assert (user / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        cm.export(tmp_path / "afile")
    cm.export(user, overwrite=True)
    assert not (user / "notes.txt").exists() and (user / "model.so").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    cm.export(empty)  # an empty folder is fine without overwrite
    assert (empty / "manifest.json").is_file()


def test_corrupt_or_missing_artifact_files_are_named(host_export, tmp_path):
    import shutil

    _, _, _, path = host_export
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    with open(bad / "params.bin", "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    with pytest.raises(ArtifactError, match="params.bin is corrupt"):
        sparsecc.load(bad)
    (bad / "model.so").unlink()
    with pytest.raises(ArtifactError, match="model.so is missing"):
        sparsecc.load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        sparsecc.load(bad)
    with pytest.raises(ArtifactError, match="not a sparsecc export folder"):
        sparsecc.load(tmp_path / "nowhere")


def _edited(path, tmp_path, edit):
    import shutil

    bad = tmp_path / "edited"
    if bad.exists():
        shutil.rmtree(bad)
    shutil.copytree(path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_edited_manifests_are_refused_before_any_file_is_opened(host_export, tmp_path):
    _, _, x, path = host_export
    # a file load opens but the manifest does not list (its hash would go unchecked): refused, even when the
    # file itself is truncated (opening a truncated library is a bus error)
    bad = _edited(path, tmp_path, lambda m: m["files"].pop("model.so"))
    data = (bad / "model.so").read_bytes()
    (bad / "model.so").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match=r"manifest.json: field 'files' does not list model.so"):
        sparsecc.load(bad)
    cases = [
        (lambda m: m["files"].update({"../outside": "0" * 64}), r"field 'files' names '../outside'"),
        (lambda m: m.update(inputs=[{"shape": [2, -5, 64], "dtype": "float32"}]), r"field 'inputs\[0\].shape'"),
        (lambda m: m.update(inputs=[{"shape": [2, 5, 64], "dtype": "complex"}]), r"field 'inputs\[0\].dtype'"),
        (lambda m: m.update(inputs=[]), r"field 'inputs'"),
        (lambda m: m.update(output_tree="[not a tree"), r"field 'output_tree'"),
        (lambda m: m.update(target={"name": 3}), r"field 'target'"),
        # two inputs where the library takes one: caught at load, not inside TVM at the first call
        (lambda m: m.update(inputs=m["inputs"] * 2), r"field 'inputs' lists 2 inputs .* main takes"),
    ]
    for edit, msg in cases:
        with pytest.raises(ArtifactError, match=msg):
            sparsecc.load(_edited(path, tmp_path, edit))
    # the original still loads and runs
    assert sparsecc.load(path)(x).shape == (2, 5, 8)


@pytest.fixture(scope="module")
def toolchain():
    from sparsecc.targets.toolchain import aarch64_toolchain

    try:
        return aarch64_toolchain()
    except ToolchainError as e:
        pytest.skip(f"aarch64 toolchain cannot be fetched here: {e}")


def test_arm_unstructured_convs_on_the_direct_kernel_under_qemu(toolchain, tmp_path):
    from sparsecc.runtime.export import run_artifact_under_qemu
    from sparsecc.targets.arm import ArmTarget

    class Target(_FastXCSR, ArmTarget):
        pass

    model = _small_resnet()
    x = torch.randn(1, 3, 10, 10)
    cm = sparsecc.compile(model, x, target=Target("arm"), sparsity=0.7, pattern="unstructured")
    assert sum(a.format == "xcsr" for a in cm.layers if a.kind == "conv2d") >= 4
    y, _ = run_artifact_under_qemu(cm.export(tmp_path / "c"), x)
    torch.testing.assert_close(y, sparsecc.prune(model, 0.7)(x), rtol=1e-4, atol=1e-5)


def test_arm_residual_cnn_at_80_percent_runs_under_qemu(toolchain, tmp_path):
    """The must-show at CI size: a residual CNN (3x3 and 1x1 convs, BN folded) at 80% sparsity, 32x32."""
    from sparsecc.runtime.export import run_artifact_under_qemu

    model = _small_resnet()
    x = torch.randn(1, 3, 32, 32)
    cm = sparsecc.compile(model, x, target="arm:cortex-a76", sparsity=0.8, pattern="block", block_shape=(16, 1))
    convs = [a for a in cm.layers if a.kind == "conv2d"]
    assert sum(a.format == "bsr" for a in convs) >= 4  # the sparse convs are on the aarch64 kernels
    path = cm.export(tmp_path / "arm")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and "cortex-a76" in manifest["target"]["tvm"]
    with pytest.raises(ArtifactError, match="aarch64"):
        sparsecc.load(path)  # not loadable on an x86 host
    with torch.no_grad():
        ref = sparsecc.prune(model, 0.8, block_shape=(16, 1))(x)
    y, _ = run_artifact_under_qemu(path, x)
    assert y.shape == ref.shape
    assert float((y - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


def test_arm_conv_epilogues_keep_nan_and_inf_under_qemu(toolchain, tmp_path):
    """Sparse convs with fused ReLU6 and ReLU on aarch64: NaN and -inf in the biases come out as torch's."""
    from sparsecc.runtime.export import run_artifact_under_qemu

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU6(), nn.Conv2d(32, 32, 1), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bias[3] = float("inf")  # relu6(inf) = 6: the next conv sees finite inputs
        model[2].bias[5] = float("nan")  # relu(nan) = nan (a max-based relu gave 0)
        model[2].bias[7] = float("inf")
        model[2].bias[9] = float("-inf")  # relu(-inf) = 0
    x = torch.randn(1, 16, 8, 8)
    cm = sparsecc.compile(model, x, target="arm", sparsity=0.8, pattern="block", block_shape=(16, 1), measure=False)
    assert sum(a.format == "bsr" for a in cm.layers) == 2
    ref = sparsecc.prune(model, 0.8, block_shape=(16, 1))(x)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    y, _ = run_artifact_under_qemu(cm.export(tmp_path / "arm"), x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_arm_linear_model_under_qemu(toolchain, tmp_path):
    """Sparse linears with fused ReLU/GELU and a 3-d input whose M is not a multiple of the NEON tile."""
    from sparsecc.runtime.export import run_artifact_under_qemu

    model = _mlp()
    x = torch.randn(3, 3, 64)
    cm = sparsecc.compile(model, x, target="arm", sparsity=0.7, pattern="block", block_shape=(8, 1))
    path = cm.export(tmp_path / "mlp")
    y, _ = run_artifact_under_qemu(path, x)
    torch.testing.assert_close(y, sparsecc.prune(model, 0.7, block_shape=(8, 1))(x), rtol=1e-4, atol=1e-5)


def test_export_refuses_kernels_without_an_export_path(tmp_path):
    class Opaque(nn.Module):  # a module of sparsecc.runtime that export does not know
        pass

    Opaque.__module__ = "sparsecc.runtime.fake"
    from sparsecc.runtime.export import _export_view

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    gm.add_submodule("k", Opaque())
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.target = "k"
    gm.recompile()
    with pytest.raises(UnsupportedOpError, match="Opaque kernels have no export path"):
        _export_view(gm)


def test_arm_nm_linears_under_qemu(toolchain, tmp_path):
    """2:4 linears exported through the N:M kernels (a cost model that favours N:M forces the format)."""
    from sparsecc.runtime.export import run_artifact_under_qemu
    from sparsecc.formats import Candidate
    from sparsecc.targets.arm import ArmTarget, static_roofline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 30)).eval()
    x = torch.randn(3, 3, 64)
    roofline = static_roofline("arm")
    gemv, gemm, gbps, oh = roofline[Candidate("nm", (2, 4))]
    roofline[Candidate("nm", (2, 4))] = (gemv * 10, gemm * 10, gbps * 10, oh)

    class FastNM(ArmTarget):
        def roofline(self):
            return roofline

    target = FastNM("arm")
    cm = sparsecc.compile(model, x, target=target, pattern="2:4", sparsity=0.5)
    assert [a.format for a in cm.layers] == ["nm", "nm"]
    w = [m.weight for m in model if isinstance(m, nn.Linear)]
    y, _ = run_artifact_under_qemu(cm.export(tmp_path / "nm"), x)
    torch.testing.assert_close(y, cm(x), rtol=1e-4, atol=1e-5)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (ref[0], ref[2]):  # 2:4 by magnitude along K: keep the 2 largest |w| of every 4
            g = lin.weight.reshape(lin.weight.shape[0], -1, 4)
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
            lin.weight.mul_(keep.reshape(lin.weight.shape))
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    assert float((y - model(x)).abs().max()) > 1e-3  # the weights really were pruned to 2:4
    assert all(float((v == 0).float().mean()) < 0.01 for v in w)  # and the user's model was not


class _FastXCSR:
    """Mixin: a roofline that makes the M-vectorized unstructured kernel win, so every layer takes it."""

    def roofline(self):
        from sparsecc.formats import Candidate

        return {Candidate("dense"): (10.0, 10.0, 10.0, 0.01), Candidate("xcsr"): (1000.0, 1000.0, 1000.0, 0.001)}


def _unstructured_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 30)).eval()


def test_host_export_of_unstructured_layers(tmp_path):
    from sparsecc.targets.x86 import X86Target

    class Target(_FastXCSR, X86Target):
        pass

    model = _unstructured_mlp()
    x = torch.randn(3, 23, 64)  # M = 69: one full 64-row panel and a padded one
    cm = sparsecc.compile(model, x, target=Target(), sparsity=0.7, pattern="unstructured", measure=False)
    assert [a.format for a in cm.layers] == ["xcsr", "xcsr"]
    loaded = sparsecc.load(cm.export(tmp_path / "u"))
    torch.testing.assert_close(loaded(x), cm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm(x), sparsecc.prune(model, 0.7)(x), rtol=1e-5, atol=1e-5)


def test_host_export_of_unstructured_convs_on_the_direct_kernel(tmp_path):
    """Every conv takes the direct NCHW kernel (strided ones on phase images; the residual join fused)."""
    from sparsecc.runtime.conv import SparseConv2d
    from sparsecc.targets.x86 import X86Target

    class Target(_FastXCSR, X86Target):
        pass

    model = _small_resnet()
    x = torch.randn(2, 3, 12, 12)
    cm = sparsecc.compile(model, x, target=Target(), sparsity=0.7, pattern="unstructured", measure=False)
    mods = [m for m in cm.graph.gm.modules() if isinstance(m, SparseConv2d)]
    assert mods and all(m.layout == "direct" for m in mods)
    assert any(m.residual for m in mods) and any(m.stride == (2, 2) for m in mods)
    convs = [a for a in cm.layers if a.kind == "conv2d"]
    assert {a.format for a in convs} == {"xcsr"}
    torch.testing.assert_close(cm(x), sparsecc.prune(model, 0.7)(x), rtol=1e-4, atol=1e-5)
    loaded = sparsecc.load(cm.export(tmp_path / "c"))
    torch.testing.assert_close(loaded(x), cm(x), rtol=1e-5, atol=1e-5)


def test_arm_export_of_unstructured_layers_under_qemu(toolchain, tmp_path):
    from sparsecc.runtime.export import run_artifact_under_qemu
    from sparsecc.targets.arm import ArmTarget

    class Target(_FastXCSR, ArmTarget):
        pass

    model = _unstructured_mlp()
    x = torch.randn(2, 9, 64)
    cm = sparsecc.compile(model, x, target=Target("arm"), sparsity=0.7, pattern="unstructured")
    assert [a.format for a in cm.layers] == ["xcsr", "xcsr"]
    y, _ = run_artifact_under_qemu(cm.export(tmp_path / "u"), x)
    torch.testing.assert_close(y, sparsecc.prune(model, 0.7)(x), rtol=1e-4, atol=1e-5)


def test_arm_routed_mlp_levels_under_qemu(toolchain, tmp_path):
    """Activation routing on aarch64: one artifact, two levels, each equal to the host module's output."""
    import torch.nn.functional as F

    from sparsecc.runtime.export import run_artifact_under_qemu

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(32, 256), nn.Linear(256, 16)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 32)
    cm = sparsecc.compile(model, x, target="arm", activation_density=[1.0, 0.3], calibration=[torch.randn(3, 32)] * 2,
                          measure=False, activation_gate="both")
    assert len(cm.gated_layers()) == 2
    path = cm.export(tmp_path / "arm")
    for level in (0, 1):
        y, _ = run_artifact_under_qemu(path, x, level=level)
        torch.testing.assert_close(y, cm(x, level=level), rtol=1e-4, atol=1e-4)


class _Attention(nn.Module):
    """A dense transformer-ish block: linears (one followed by GELU), a masked softmax, a layer norm."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.up, self.down, self.norm = nn.Linear(d, 72), nn.Linear(72, d), nn.LayerNorm(d)

    def forward(self, x, mask):
        s = self.q(x) @ self.k(x).transpose(-1, -2) / 32 ** 0.5
        p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
        h = self.norm(x + p @ self.v(x))
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


def test_dense_rest_runs_on_packed_linears_and_the_vector_softmax(tmp_path):
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 16, 32)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :, 11:] = True  # padded keys
    cm = sparsecc.compile(model, (x, mask), sparsity=0.0, measure=False)
    path = cm.export(tmp_path / "artifact")
    manifest = json.loads((path / "manifest.json").read_text())
    # the layer norm's weight and bias; the linears' weights are packed into the library, not also shipped raw
    assert manifest["num_params"] == 2
    lib = (path / "model.so").read_bytes()
    # N = 72 padded to the host's panel width (80 with AVX2's 16-column panels, 96 with AVX-512's 32), GELU fused
    padded = [int(n) for n in re.findall(rb"sparsecc_dense_linear_m32_n(\d+)_k32_bias_gelu", lib)]
    assert padded and all(n in (80, 96) for n in padded)
    assert re.search(rb"sparsecc_dense_linear_m32_n32_k32_none", lib)  # the linear without bias
    assert b"sparsecc_softmax_r32_l16" in lib
    lm = sparsecc.load(path)
    x2 = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(lm(x2, mask), model(x2, mask), rtol=1e-4, atol=2e-5)
        x2[0, 3, 5] = float("nan")  # a NaN spreads through the scores as in torch
        y, ref = lm(x2, mask), model(x2, mask)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(y[~torch.isnan(ref)], ref[~torch.isnan(ref)], rtol=1e-4, atol=2e-5)


class _Pointwise(nn.Module):
    """MobileNet-style: a 3x3 stem, a 1x1 expansion with ReLU, a depthwise 3x3, a 1x1 projection, a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.expand, self.dw = nn.Conv2d(12, 30, 1), nn.Conv2d(30, 30, 3, padding=1, groups=30)
        self.project, self.bn = nn.Conv2d(30, 12, 1, bias=False), nn.BatchNorm2d(12)

    def forward(self, x):
        h = self.stem(x)
        return h + self.bn(self.project(torch.nn.functional.relu6(self.dw(torch.relu(self.expand(h))))))


def test_dense_convs_run_on_the_nchw_gemm_and_the_depthwise_kernel(tmp_path):
    torch.manual_seed(0)
    model = _Pointwise().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 9, 7)  # 63 pixels: padded to the panel width
    cm = sparsecc.compile(model, x, sparsity=0.0, measure=False)
    path = cm.export(tmp_path / "artifact")
    lib = (path / "model.so").read_bytes()
    assert re.search(rb"sparsecc_dense_conv1x1_b2_co30_ci12_hw\d+_bias_relu", lib)  # the expansion, ReLU fused
    assert re.search(rb"sparsecc_dense_conv1x1_b2_co12_ci30_hw\d+_bias_none", lib)  # the projection, BN folded
    assert re.search(rb"sparsecc_depthwise_conv_b2_c30_\d+x\d+_k3x3_s1_o9x\d+_bias_relu6", lib)  # ReLU6 fused
    assert b"sparsecc_im2col_b2_c3_9x7_k3x3_s1x1_p1x1" in lib  # the 3x3 stem: im2col, then the same GEMM

    lm = sparsecc.load(path)
    x2 = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(lm(x2), model(x2), rtol=1e-4, atol=2e-5)
        x2[1, 0, 4, 4] = float("nan")
        y, ref = lm(x2), model(x2)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
