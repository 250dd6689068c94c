"""aarch64 target: sparse kernels cross-compiled, run under qemu-aarch64 and compared with torch.

Builds use a symbolic K (one build per block, regime, bias and activation, cached on disk under
``$SPARSECC_CACHE_DIR/kernels-aarch64``), so the edge shapes reuse the random shapes' kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsecc.errors import TargetError, ToolchainError
from sparsecc.formats import BLOCK_SHAPES, BlockSparseMatrix
from sparsecc.formats import Candidate
from sparsecc.passes import default_pipeline
from sparsecc.targets.base import resolve_target


@pytest.fixture(scope="module")
def toolchain():
    from sparsecc.targets.toolchain import aarch64_toolchain

    try:
        return aarch64_toolchain()
    except ToolchainError as e:  # no network / no Debian mirror: the only reason to skip
        pytest.skip(f"aarch64 toolchain cannot be fetched here: {e}")


def _weight(n, k, block, density, seed=0, empty_rows=False):
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    keep = (torch.rand(n // br, k // bc, generator=g) < density).float()
    if empty_rows and n // br > 1:
        keep[::2] = 0  # every other block row empty
    w = torch.randn(n, k, generator=g) * keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return w


def _ref(x, w, b, act):
    y = F.linear(x, w, b)
    return torch.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y


# -- target resolution and the static cost model (no toolchain needed) -------------------------------------


def test_resolve_arm_targets():
    from sparsecc.targets.arm import ArmTarget

    t = resolve_target("arm")
    assert isinstance(t, ArmTarget) and t.name == "arm"
    cfg = t.deploy_tvm_target().export()
    assert cfg["mtriple"] == "aarch64-linux-gnu" and "+neon" in list(cfg["mattr"])
    assert "mcpu" not in cfg or str(cfg["mcpu"]) in ("", "generic")
    assert str(resolve_target("graviton2").deploy_tvm_target().export()["mcpu"]) == "neoverse-n1"
    assert str(resolve_target("arm:neoverse-v1").deploy_tvm_target().export()["mcpu"]) == "neoverse-v1"
    assert str(resolve_target("cortex-a76").deploy_tvm_target().export()["mcpu"]) == "cortex-a76"
    with pytest.raises(TargetError, match="unknown ARM device"):
        resolve_target("arm:cortex-z9")
    with pytest.raises(TargetError, match="build_only"):
        resolve_target("arm", build_only=True)
    assert not t.can_time_kernels  # a foreign core is never timed on the host
    assert [type(p).__name__ for p in default_pipeline(t, measure=True) if hasattr(p, "measure")] == \
        ["ChooseFormat", "ChooseConvFormat"]
    assert not any(p.measure for p in default_pipeline(t, measure=True) if hasattr(p, "measure"))


def test_arm_params_fit_neon_registers():
    from sparsecc.targets.arm import ACC_REGISTERS, arm_params

    for block in BLOCK_SHAPES:
        assert arm_params(block, "gemv").m_tile == 1
        p = arm_params(block, "gemm")
        assert 1 <= p.m_tile <= 8
        if block != (1, 1):
            assert p.m_tile * block[0] * block[1] <= ACC_REGISTERS * 4
    assert arm_params((16, 1), "gemm").m_tile == 4 and arm_params((8, 1), "gemm").m_tile == 8


def test_static_cost_model_orders_devices_and_formats():
    from sparsecc.tune.cost_model import cost_model_for

    a72, v1 = cost_model_for(resolve_target("arm")), cost_model_for(resolve_target("graviton3"))
    bsr, csr, dense = Candidate("bsr", (16, 1)), Candidate("csr", (1, 1)), Candidate("dense")
    n = k = 768
    nnzb = int(0.1 * n * k / 16)
    for m in (1, 128):
        assert v1.estimate_ms(bsr, n, k, m, nnzb) < a72.estimate_ms(bsr, n, k, m, nnzb)
        # same stored values: a 16x1 block kernel beats CSR, and 10% of dense beats dense
        assert a72.estimate_ms(bsr, n, k, m, nnzb) < a72.estimate_ms(csr, n, k, m, nnzb * 16)
        assert a72.estimate_ms(bsr, n, k, m, nnzb) < a72.estimate_ms(dense, n, k, m)
    # CSR at density 0.5 loses to dense (as measured on x86)
    assert a72.estimate_ms(csr, n, k, 128, n * k // 2) > a72.estimate_ms(dense, n, k, 128)
    assert "not measured" in a72.source


# -- kernels under qemu -------------------------------------------------------------------------------------

CASES = [
    # (block, M, N mult of br, K mult of bc, density, bias, activation)
    ((1, 1), 1, 33, 19, 0.3, True, None),
    ((1, 1), 13, 24, 40, 0.2, False, "relu"),
    ((1, 4), 3, 20, 36, 0.3, True, "gelu"),
    ((1, 4), 17, 20, 36, 0.3, True, None),
    ((1, 8), 1, 12, 40, 0.4, False, None),
    ((1, 8), 9, 12, 40, 0.4, True, "relu"),
    ((4, 1), 2, 36, 21, 0.3, True, None),
    ((4, 1), 11, 36, 21, 0.3, True, "relu"),
    ((8, 1), 1, 40, 17, 0.3, False, "gelu"),
    ((8, 1), 10, 40, 17, 0.3, True, None),
    ((16, 1), 5, 48, 23, 0.25, True, "relu"),
    ((16, 1), 9, 48, 23, 0.25, True, None),
    ((4, 4), 3, 20, 12, 0.5, True, None),
    ((4, 4), 12, 20, 12, 0.5, False, None),
]


@pytest.mark.parametrize("block,m,n,k,density,bias,act", CASES)
def test_kernel_under_qemu_matches_torch(toolchain, block, m, n, k, density, bias, act):
    from sparsecc.runtime.qemu import run_linear_under_qemu

    w = _weight(n, k, block, density, seed=m + n)
    b = torch.randn(n) if bias else None
    x = torch.randn(m, k)
    y, _ = run_linear_under_qemu(BlockSparseMatrix.from_dense(w, block), x, b, act)
    torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block,m,bias,act", [((1, 1), 13, False, "relu"), ((8, 1), 10, True, None),
                                               ((4, 4), 12, False, None), ((16, 1), 5, True, "relu")])
def test_kernel_under_qemu_edge_weights(toolchain, block, m, bias, act):
    """Empty block rows, density 0 (no stored block at all) and density 1, with the builds of CASES."""
    from sparsecc.runtime.qemu import run_linear_under_qemu

    br, bc = block
    n, k = 3 * br if br > 1 else 7, 5 * bc if bc > 1 else 19
    b = torch.randn(n) if bias else None
    x = torch.randn(m, k)
    for w in (_weight(n, k, block, 0.6, empty_rows=True), torch.zeros(n, k), torch.randn(n, k)):
        y, _ = run_linear_under_qemu(BlockSparseMatrix.from_dense(w, block), x, b, act)
        torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-4, atol=1e-4)


def test_neon_instructions_in_assembly(toolchain):
    from sparsecc.targets.arm import build_linear_kernel, disassemble, neon_instructions

    for block, regime, device in (((16, 1), "gemm", "arm"), ((1, 8), "gemm", "arm"), ((8, 1), "gemv", "graviton3")):
        lib = build_linear_kernel(block, regime, bias=True, activation="relu" if block != (1, 8) else None,
                                  device=device)
        counts = neon_instructions(disassemble(lib))
        assert counts.get("fmla", 0) > 0, (block, regime, counts)  # fused multiply-add on v*.4s
    # the ReLU epilogue runs on vectors too: a compare with zero and a select on .4s (not fmaxnm, which would
    # turn a NaN into 0)
    counts = neon_instructions(disassemble(build_linear_kernel((16, 1), "gemm", bias=True, activation="relu")))
    assert counts.get("fcmlt", 0) > 0 and counts.get("fmaxnm", 0) == 0, counts


def test_nm_kernel_uses_neon(toolchain):
    from sparsecc.targets.arm import build_nm_kernel, disassemble, neon_instructions

    lib = build_nm_kernel(2, 4, 8, "gemm", bias=True, activation="relu")  # the build of the 2:4 gemm case
    assert neon_instructions(disassemble(lib)).get("fmla", 0) > 0


def _nm_weight(n_out, k, n, m, seed):
    """Random W (N, K) with at most n nonzeros in every group of m along K (last group may be partial)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    groups = -(-k // m)
    keep = torch.zeros(n_out, groups * m, dtype=torch.bool)
    scores = torch.rand(n_out, groups, m, generator=g)
    idx = scores.topk(n, dim=-1).indices
    keep.view(n_out, groups, m).scatter_(-1, idx, True)
    return w * keep[:, :k]


@pytest.mark.parametrize("nm,m_rows,n_out,k,bias,act", [
    ((2, 4), 1, 24, 32, True, None),        # gemv
    ((2, 4), 13, 20, 30, True, "relu"),     # gemm, M and N not multiples of the tiles, K not of m
    ((1, 4), 9, 16, 16, False, "gelu"),
])
def test_nm_kernel_under_qemu_matches_torch(toolchain, nm, m_rows, n_out, k, bias, act):
    from sparsecc.formats import NMSparseMatrix
    from sparsecc.runtime.qemu import run_nm_linear_under_qemu

    n, m = nm
    w = _nm_weight(n_out, k, n, m, seed=k)
    w[3] = 0  # an empty row
    b = torch.randn(n_out) if bias else None
    x = torch.randn(m_rows, k)
    y, _ = run_nm_linear_under_qemu(NMSparseMatrix.from_dense(w, n, m), x, b, act)
    torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-4, atol=1e-4)
    # density 0 with the same build
    y0, _ = run_nm_linear_under_qemu(NMSparseMatrix.from_dense(torch.zeros(n_out, k), n, m), x, b, act)
    torch.testing.assert_close(y0, _ref(x, torch.zeros(n_out, k), b, act), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m_rows,n_out,k,density,bias,act", [
    (1, 24, 37, 0.3, True, "gelu"),       # gather kernel, K not a multiple of the vector width
    (5, 8, 16, 1.0, False, None),         # density 1
    (13, 40, 150, 0.1, True, "relu"),     # panel kernel, M and N not multiples of the tiles, 2 column blocks
    (70, 16, 9, 0.0, True, None),         # density 0: bias only
])
def test_xcsr_kernel_under_qemu_matches_torch(toolchain, m_rows, n_out, k, density, bias, act):
    from sparsecc.formats import RowSparseMatrix
    from sparsecc.runtime.qemu import run_xcsr_linear_under_qemu

    g = torch.Generator().manual_seed(k)
    w = torch.randn(n_out, k, generator=g) * (torch.rand(n_out, k, generator=g) < density)
    if density not in (0.0, 1.0):
        w[2] = 0      # an empty row
        w[:, 1] = 0   # an empty column
        w[3] = 0
        w[3, k - 1] = 1.5  # one nonzero in the last column
    b = torch.randn(n_out) if bias else None
    x = torch.randn(m_rows, k)
    y, _ = run_xcsr_linear_under_qemu(RowSparseMatrix.from_dense(w), x, b, act)
    torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("family,m_rows", [("csr", 13), ("bsr", 3), ("xcsr", 1), ("xcsr", 13), ("nm", 2), ("nm", 9)])
def test_fused_epilogues_under_qemu_keep_nan_and_inf_as_torch(toolchain, family, m_rows, act):
    # NaN and infinities in the bias and in a weight (the inputs are finite: the kernel runs, see runtime.ieee)
    from sparsecc.formats import NMSparseMatrix, RowSparseMatrix
    from sparsecc.runtime.qemu import run_linear_under_qemu, run_nm_linear_under_qemu, run_xcsr_linear_under_qemu

    block = (8, 1) if family == "bsr" else (1, 1)
    w = _nm_weight(16, 12, 2, 4, seed=3) if family == "nm" else _weight(16, 12, block, 0.5, seed=3)
    r, c = (w != 0).nonzero()[0]
    w[r, c] = float("nan")
    b = torch.randn(16)
    b[1:4] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = torch.randn(m_rows, 12)
    if family == "xcsr":
        y, _ = run_xcsr_linear_under_qemu(RowSparseMatrix.from_dense(w), x, b, act)
    elif family == "nm":
        y, _ = run_nm_linear_under_qemu(NMSparseMatrix.from_dense(w, 2, 4), x, b, act)
    else:
        y, _ = run_linear_under_qemu(BlockSparseMatrix.from_dense(w, block), x, b, act)
    torch.testing.assert_close(y, _ref(x, w, b, act), rtol=1e-4, atol=1e-4, equal_nan=True)
