"""CUDA target: GPU template numerics (on the CPU), generated CUDA source, nvcc, compile without and with a GPU.

Without a GPU (CI): the GPU template is built for LLVM and compared with torch
(it fixes the index arithmetic every CUDA schedule inherits), the CUDA source of
every format and regime is checked for its structure and compiled by nvcc when
nvcc exists, and ``compile(target="cuda")`` raises ``TargetUnavailableError``
unless ``build_only=True``. The tests marked ``gpu`` run the kernels and a whole
compiled model on a CUDA GPU and are skipped here.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.errors import KernelBuildError, TargetError, TargetUnavailableError
from sparsecc.formats import BlockSparseMatrix

tvm = pytest.importorskip("tvm")

from sparsecc.codegen.linear_cuda import bsr_linear_gpu
from sparsecc.targets import cuda
from sparsecc.formats import Candidate
from sparsecc.targets.base import resolve_target

HAS_GPU = cuda.cuda_device_available()
NVCC = cuda.find_nvcc()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda and TVM)")

BLOCKS = [(1, 1), (16, 1), (8, 1), (4, 4), (1, 8)]


def reference(x, w, b, act):
    y = F.linear(x, w, b)
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return F.gelu(y)
    return y


def random_weight(n, k, block, density, g, empty_rows=True):
    br, bc = block
    keep = torch.rand(n // br, k // bc, generator=g) < density
    if empty_rows and n // br > 1:
        keep[0] = False  # an empty block row
    w = torch.randn(n, k, generator=g) * keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return w


def run_template(fn, x, mat, bias):
    br = mat.block[0]
    n = mat.shape[0]
    data, ind = mat.data.contiguous(), mat.indices.contiguous()
    if data.shape[0] == 0:
        data, ind = torch.zeros(1, *mat.block), torch.zeros(1, dtype=torch.int32)
    y = torch.full((x.shape[0], n // br, br), float("nan"))
    args = [x.contiguous(), data, ind, mat.indptr.contiguous()]
    if bias is not None:
        args.append(bias.reshape(n // br, br).contiguous())
    fn(*args, y)
    return y.reshape(x.shape[0], n)


# -- the GPU template's numerics, on the CPU -----------------------------------------

_CPU_BUILDS: dict = {}


def cpu_template(block, k, bias, act, m_tile, rows):
    """The unscheduled GPU template built for LLVM; the init is hoisted out of the data-dependent reduction
    (as the GPU lowering does: an empty block row must give act(bias), not garbage)."""
    key = (block, k, bias, act, m_tile, rows)
    if key not in _CPU_BUILDS:
        sch = tvm.s_tir.Schedule(bsr_linear_gpu(block, k=k, bias=bias, activation=act, m_tile=m_tile, rows=rows,
                                                pad=1))
        sch.decompose_reduction("compute", sch.get_loops("compute")[-2])
        _CPU_BUILDS[key] = tvm.compile(sch.mod, target="llvm")["main"]
    return _CPU_BUILDS[key]


@pytest.mark.parametrize("block, act", [((1, 1), "relu"), ((16, 1), "gelu"), ((4, 4), None), ((1, 8), "relu")])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 11), nb=st.integers(1, 7), density=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
       seed=st.integers(0, 2**16))
def test_gpu_template_matches_torch_on_cpu(block, act, m, nb, density, seed):
    """M not a multiple of m_tile (3), block rows not a multiple of rows (2), empty rows, density 0 and 1."""
    k = 24  # a multiple of every bc; not of the 32 lanes
    br, _ = block
    n = nb * br
    g = torch.Generator().manual_seed(seed)
    w = random_weight(n, k, block, density, g)
    b = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g)
    fn = cpu_template(block, k, True, act, 3, 2)
    y = run_template(fn, x, BlockSparseMatrix.from_dense(w, block), b)
    torch.testing.assert_close(y, reference(x, w, b, act), rtol=1e-4, atol=1e-4)


def test_gpu_template_without_bias_all_zero_weight():
    k, n = 16, 8
    w = torch.zeros(n, k)
    x = torch.randn(5, k)
    fn = cpu_template((4, 1), k, False, None, 2, 3)
    y = run_template(fn, x, BlockSparseMatrix.from_dense(w, (4, 1)), None)
    assert torch.equal(y, torch.zeros(5, n))


def test_gpu_template_rejects_bad_sizes():
    with pytest.raises(sparsecc.SparseccError, match="multiple of the block width"):
        bsr_linear_gpu((1, 8), k=12)
    with pytest.raises(sparsecc.SparseccError, match="positive"):
        bsr_linear_gpu((4, 1), k=16, m_tile=0)


# -- generated CUDA source -----------------------------------------------------------

_SOURCES: dict = {}


def built(block, regime, k=768, bias=True, act="gelu", arch="sm_80"):
    key = (block, regime, k, bias, act, arch)
    if key not in _SOURCES:
        lib = cuda.build(cuda.schedule_linear(block, regime, k=k, bias=bias, activation=act),
                         cuda.cuda_target(arch))
        _SOURCES[key] = (lib, cuda.kernel_source(lib))
    return _SOURCES[key]


def kernel_body(src: str) -> str:
    start = src.index('extern "C" __global__')
    return src[start:]


@pytest.mark.parametrize("regime", ["gemv", "gemm"])
@pytest.mark.parametrize("block", BLOCKS)
def test_cuda_source_structure(block, regime):
    _, src = built(block, regime)
    body = kernel_body(src)
    # one kernel, launched with the thread layout of the rule
    assert len(re.findall(r"__global__ void __launch_bounds__\((\d+)\) main_kernel\(", body)) == 2  # decl + def
    params = cuda.default_params(block, regime, 768)
    assert f"__launch_bounds__({params.rows * 32})" in body
    for axis in ("blockIdx.x", "blockIdx.y", "threadIdx.x", "threadIdx.z"):
        assert axis in body, axis
    # the X tile staged in shared memory (static size = m_tile * K floats), then a barrier before the gathers
    assert f"__shared__ alignas(64) float XS_ptr[{params.m_tile * 768}];" in body
    assert body.index("__syncthreads()") < body.index("IND_ptr[")
    assert re.search(r"XS_ptr\[[^\]]*IND_ptr\[", body), "X gathered from shared memory"
    # lanes reduce by warp shuffles, log2(lanes) steps
    shuffles = re.findall(r"__shfl_down_sync\(mask_ptr\[0\], red_buf0_ptr\[0\], (\d+), 32\)", body)
    assert [int(s) for s in shuffles] == [params.lanes >> i for i in range(1, params.lanes.bit_length())]
    if regime == "gemv":
        assert params.m_tile == 1 and params.lanes == 32 and len(shuffles) == 5
    # the epilogue (bias + GELU's erf polynomial) is fused and written by lane 0 only
    assert "B_ptr[" in body and "0x1p-1f" in body
    assert "((int)threadIdx.x) == 0" in body


@pytest.mark.parametrize("block", [(16, 1), (1, 1)])
def test_cuda_host_code_has_no_loops(block):
    """All the work is in the kernel: the host function only checks arguments and launches it."""
    lib, _ = built(block, "gemm")
    host_ir = lib.mod.inspect_source("ll")
    assert "main_kernel" in host_ir
    assert not re.search(r"^for_(begin|body)", host_ir, re.MULTILINE)
    # control: a CPU build of the same template has its loops in the host code
    cpu_ir = tvm.compile(bsr_linear_gpu(block, k=16), target="llvm").mod.inspect_source("ll")
    assert re.search(r"^for_(begin|body)", cpu_ir, re.MULTILINE)


def test_cuda_source_sizes_follow_k_and_arch():
    _, src = built((8, 1), "gemm", k=3072, bias=False, act=None, arch="sm_90")
    body = kernel_body(src)
    assert cuda.default_params((8, 1), "gemm", 3072).m_tile == 4
    assert "float XS_ptr[12288];" in body  # 4 rows x 3072 floats = 48 KiB
    assert "B_ptr" not in body and "0x1p-1f" not in body
    with pytest.raises(KernelBuildError, match="shared"):
        cuda.schedule_linear((8, 1), "gemm", k=3072, bias=False, params=cuda.GpuParams(m_tile=8))


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("block, regime", [((1, 1), "gemm"), ((16, 1), "gemv"), ((4, 4), "gemm"), ((1, 8), "gemv")])
def test_nvcc_compiles_generated_source(block, regime, tmp_path):
    _, src = built(block, regime)
    cubin = cuda.nvcc_compile(src, "sm_80", out_dir=str(tmp_path))
    assert cubin.stat().st_size > 1000
    assert b"main_kernel" in cubin.read_bytes()


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_nvcc_compiles_for_sm90_and_reports_errors(tmp_path):
    _, src = built((8, 1), "gemm", k=3072, bias=False, act=None, arch="sm_90")
    assert cuda.nvcc_compile(src, "sm_90", out_dir=str(tmp_path / "ok")).exists()
    with pytest.raises(KernelBuildError, match="nvcc -arch=sm_90 failed"):
        cuda.nvcc_compile(src + "\nthis is not C++;\n", "sm_90", out_dir=str(tmp_path / "bad"))


# -- target resolution, cost model ----------------------------------------------------

def test_resolve_cuda_targets():
    t = resolve_target({"kind": "cuda", "arch": "sm_90"})
    assert t.name == "cuda" and t.arch == "sm_90"
    assert str(t.tvm_target().attrs["arch"]) == "sm_90"
    assert resolve_target("cuda").name == "cuda"
    with pytest.raises(TargetError, match="sm_80"):
        resolve_target({"kind": "cuda", "arch": "ampere"})
    with pytest.raises(TargetError, match="unknown"):
        resolve_target({"kind": "cuda", "arch": "sm_80", "cores": 4})


def test_roofline_cost_model_choices():
    from sparsecc.formats import candidates
    from sparsecc.tune.cost_model import cost_model_for

    cost = cost_model_for(cuda.CudaTarget("sm_90", build_only=True))
    assert "roofline" in cost.source
    n, k = 3072, 768
    fills = {b: 1.0 for b in [(1, 1), (1, 4), (1, 8), (4, 1), (8, 1), (16, 1), (4, 4)]}
    est = cost.estimates(candidates((n, k), "auto", 0.1), (n, k), 1, int(0.1 * n * k), fills)
    assert min(est, key=est.get).startswith("bsr")  # bandwidth-bound gemv: 10% of the bytes wins
    est = cost.estimates(candidates((n, k), "unstructured", 0.5), (n, k), 128, int(0.5 * n * k), fills)
    assert min(est, key=est.get) == "dense"  # CSR at density 0.5, M = 128: cuBLAS wins
    sm89 = cost_model_for(cuda.CudaTarget("sm_89", build_only=True))
    assert sm89.kernels["dense"].gbps < cost.kernels["dense"].gbps


def test_nm_weights_run_on_the_csr_kernel():
    from sparsecc.formats import NMSparseMatrix

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 16, generator=g)
    keep = torch.zeros(32, 4, 4, dtype=torch.bool)
    keep[..., :2] = True  # 2:4 along K
    w = w * keep[:, :, torch.randperm(4, generator=g)].reshape(32, 16)
    nm = NMSparseMatrix.from_dense(w, 2, 4)
    from sparsecc.runtime import make_linear

    mod = make_linear(cuda.CudaTarget("sm_80", build_only=True), nm, None)
    assert mod.block == (1, 1) and mod.format == "csr"
    dense = BlockSparseMatrix(mod.shape, mod.block, mod.data, mod.indices, mod.indptr).to_dense()
    assert torch.equal(dense, w)
    assert torch.equal(mod.indptr[1:] - mod.indptr[:-1], torch.full((32,), 8, dtype=torch.int32))  # balanced
    assert Candidate("nm", (2, 4)) in cuda.roofline_constants("sm_80")


# -- compile without a GPU -------------------------------------------------------------

def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_compile_cuda_without_gpu_raises():
    with pytest.raises(TargetUnavailableError, match="build_only=True"):
        sparsecc.compile(mlp(), (torch.randn(1, 256),), target="cuda", sparsity=0.9, pattern="block")
    assert issubclass(TargetUnavailableError, TargetError)


def test_build_only_is_cuda_only():
    with pytest.raises(TargetError, match="build_only"):
        sparsecc.compile(mlp(), (torch.randn(1, 256),), target="x86", build_only=True)


def test_compile_build_only_returns_sources(tmp_path):
    model = mlp()
    art = sparsecc.compile(model, (torch.randn(1, 256),), target={"kind": "cuda", "arch": "sm_90"},
                           sparsity=0.9, pattern="block", block_shape=(16, 1), build_only=True)
    srcs = art.sources()
    assert sorted(srcs) == ["0", "2"]  # both linears on sparse kernels
    assert set(srcs["0"]) == {"cuda_bsr_16x1_gemv_bias_relu_k256", "cuda_bsr_16x1_gemm_bias_relu_k256"}
    assert set(srcs["2"]) == {"cuda_bsr_16x1_gemv_bias_k512", "cuda_bsr_16x1_gemm_bias_k512"}
    for per_layer in srcs.values():
        for src in per_layer.values():
            assert "__global__" in src and "__shfl_down_sync" in src and "__shared__" in src
    kern = art.kernels["0"]["gemv"]
    assert kern.lib is not None and kern.fn is None
    # the artifact's weights are the pruned ones (16x1 blocks, 10% kept)
    mod = art.modules["0"]
    assert mod.block == (16, 1) and 0.05 < mod.density < 0.15
    pruned = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    dense = BlockSparseMatrix(mod.shape, mod.block, mod.data, mod.indices, mod.indptr).to_dense()
    assert torch.equal(dense, pruned[0].weight.detach())
    paths = art.save(tmp_path)
    assert len(paths) == 4 and all(p.read_text().startswith("\n#ifdef __CUDACC_RTC__") or "__global__" in
                                   p.read_text() for p in paths)
    with pytest.raises(TargetUnavailableError):
        art(torch.randn(1, 256))
    with pytest.raises(TargetUnavailableError):
        mod(torch.randn(1, 256))


# -- on a GPU ---------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("m", [1, 5, 8, 37])
def test_cuda_kernels_match_torch(block, m, act):
    from sparsecc.runtime.cuda_kernels import CudaSparseLinear

    g = torch.Generator().manual_seed(m)
    n, k = 16 * 9, 8 * 13  # block rows not a multiple of 4, K not a multiple of the lanes
    w = random_weight(n, k, block, 0.3, g)
    b = torch.randn(n, generator=g)
    mod = CudaSparseLinear(BlockSparseMatrix.from_dense(w, block), b, activation=act)
    x = torch.randn(m, k, generator=g)
    y = mod(x.cuda())
    torch.testing.assert_close(y.cpu(), reference(x, w, b, act), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_cuda_kernels_density_edges(density):
    from sparsecc.runtime.cuda_kernels import CudaSparseLinear

    w = torch.randn(64, 48) * density
    mod = CudaSparseLinear(BlockSparseMatrix.from_dense(w, (8, 1)), None)
    x = torch.randn(3, 2, 48)
    torch.testing.assert_close(mod(x.cuda()).cpu(), x @ w.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(sparsecc.SparseccError, match="device"):
        mod(x)


@gpu
def test_compile_cuda_end_to_end():
    model = mlp()
    cm = sparsecc.compile(model, (torch.randn(4, 256),), target="cuda", sparsity=0.9, pattern="block",
                          block_shape=(16, 1))
    assert sum(1 for a in cm.layers if a.format == "bsr") == 2
    x = torch.randn(4, 256)
    ref = sparsecc.prune(model, 0.9, block_shape=(16, 1))(x)
    torch.testing.assert_close(cm(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)
