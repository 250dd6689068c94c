"""CUDA target: GPU schedules of the sparse linear kernels, build, source inspection, nvcc check.

Kernels come from the three-level GPU template of
:mod:`sparsecc.codegen.linear_cuda` (thread block "tile" -> block row "row" ->
"compute"). One schedule rule covers BSR (every block shape) and CSR (block
1x1); its tile sizes depend on the M regime:

Thread layout of one thread block (``rows * mt * lanes`` threads, a multiple of 32)::

    blockIdx.x  -> group of ``rows`` block rows of W       blockIdx.y -> M tile of ``mt`` rows of X
    threadIdx.z -> block row within the group (one per warp)
    threadIdx.y -> row of X within the M tile (``mt``)
    threadIdx.x -> ``lanes`` lanes splitting the nonzero blocks of that block row (stride ``lanes``)

* X tile in shared memory: the thread block first copies its ``mt`` rows of X
  (``mt x K`` floats, coalesced: consecutive threads read consecutive floats),
  then every lane gathers ``X[m, indices[p] * bc + j]`` from shared memory
  instead of global memory (the gathers are data-dependent and would not
  coalesce). TVM inserts the ``__syncthreads()`` between copy and use.
* Warp-level reduction: each lane accumulates a partial sum over its nonzero
  blocks (in a register), then the ``lanes`` partial sums of one output are
  added by TVM's cross-thread reduction, lowered to ``__shfl_down_sync``
  (log2(lanes) steps, no shared memory). For M = 1 ("gemv", ``mt = 1``) all 32
  lanes of a warp split one block row: the CSR-vector scheme of Bell & Garland,
  "Implementing sparse matrix-vector multiplication on throughput-oriented
  processors" (SC 2009), applied to block rows.
* "gemm" (M >= 8): ``mt`` rows of X share a warp (``lanes = 32 / mt``), so each
  weight block read from global memory feeds ``mt`` rows; ``mt`` is the largest
  power of two <= 8 whose X tile fits the 48 KiB of static shared memory.
* The epilogue (bias, ReLU/GELU) runs on lane 0 of each group and writes Y.

Limits: fp32 CUDA cores only (no tensor cores, no N:M sparse tensor cores);
block rows with many more nonzeros than others leave warps idle (no load
balancing); K must be static (one build per K).

No GPU is needed to build: ``tvm.compile`` emits the CUDA C source (read with
:func:`kernel_source`); :func:`nvcc_compile` compiles it to a cubin when nvcc is
installed. On a GPU, :func:`build` with ``device_code=True`` compiles the device
code with NVRTC (package ``cuda-bindings``) or, without it, nvcc.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm.s_tir

from sparsecc.codegen.linear_cuda import bsr_linear_gpu
from sparsecc.errors import KernelBuildError, TargetError, TargetUnavailableError
from sparsecc.formats import BLOCK_SHAPES, NM_PATTERNS, Candidate, block_candidate
from sparsecc.targets.base import Target, apply_rules

__all__ = [
    "ARCHS",
    "GEMM_MIN_M",
    "CudaTarget",
    "GpuParams",
    "build",
    "cuda_device_available",
    "cuda_target",
    "default_params",
    "find_nvcc",
    "kernel_source",
    "nvcc_compile",
    "regime_for",
    "roofline_constants",
    "schedule_linear",
]

#: Architectures sparsecc knows a roofline for (``sm_80``: A100, ``sm_90``: H100).
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
GEMM_MIN_M = 8
REGIMES = ("gemv", "gemm")
WARP = 32
#: Static shared memory per thread block (bytes) every CUDA GPU since sm_20 allows.
SHARED_BYTES = 48 * 1024


def regime_for(m: int) -> str:
    """``"gemm"`` for ``m >= 8`` rows of X, else ``"gemv"`` (as on x86)."""
    return "gemm" if m >= GEMM_MIN_M else "gemv"


def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    """``tvm.target.Target`` for CUDA ``arch`` with an LLVM host.

    Raises
    ------
    TargetError
        ``arch`` is not of the form ``sm_XY``.
    """
    arch = str(arch)
    if not (arch.startswith("sm_") and arch[3:].isdigit() and len(arch) >= 5):
        raise TargetError(f"CUDA arch must look like 'sm_80' or 'sm_90', got {arch!r}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def cuda_device_available() -> bool:
    """True when torch sees a CUDA GPU and TVM can open CUDA device 0."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return False


@dataclass(frozen=True)
class GpuParams:
    """Tile sizes of the CUDA rule (see the module docstring for the thread layout).

    Attributes
    ----------
    m_tile : int
        Rows of X per thread block (``threadIdx.y``), a power of two dividing 32.
    rows : int
        Block rows of W per thread block (``threadIdx.z``).
    """

    m_tile: int = 1
    rows: int = 4

    @property
    def lanes(self) -> int:
        """Lanes splitting one block row's nonzero blocks (``threadIdx.x``)."""
        return WARP // self.m_tile


def default_params(block: tuple[int, int], regime: str, k: int) -> GpuParams:
    """Hand-picked tiles (not measured: no GPU was available when they were written).

    ``gemv``: one row of X, a warp per block row. ``gemm``: the largest power of
    two ``mt <= 8`` with ``mt * K * 4`` bytes <= 48 KiB (K = 768: 8; K = 3072: 4).
    """
    if regime == "gemv":
        return GpuParams(m_tile=1, rows=4)
    mt = 8
    while mt > 1 and mt * int(k) * 4 > SHARED_BYTES:
        mt //= 2
    return GpuParams(m_tile=mt, rows=4)


def _block_of(func) -> tuple[int, int]:
    blk = func.attrs["sparsecc.block"]
    return int(blk[0]), int(blk[1])


def rule_gpu_bsr(func, target=None, params: GpuParams = GpuParams()):
    """Bind the GPU template: tiles to blocks, rows/M/lanes to threads, lanes reduce by shuffles."""
    if str(func.attrs.get("sparsecc.kind", "")) != "linear_gpu":
        return None
    mt, rb, lanes = params.m_tile, params.rows, params.lanes
    sch = tvm.s_tir.Schedule(func)
    mo, ig = sch.get_loops("tile")
    sch.bind(mo, "blockIdx.y")
    sch.bind(ig, "blockIdx.x")
    # cooperative, coalesced copy of the X tile into shared memory by every thread of the block
    mi, kk = sch.get_loops("load_x")[-2:]
    _, tz, ty, tx = sch.split(sch.fuse(mi, kk), [None, rb, mt, lanes])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    (r,) = sch.get_loops("row")[-1:]
    sch.bind(r, "threadIdx.z")
    # lanes split the nonzero blocks; the reduction loops must be innermost for the cross-thread lowering
    mi, ii, kb, j = sch.get_loops("compute")[-4:]
    ko, kl = sch.split(kb, [None, lanes])
    sch.reorder(mi, ii, kl, ko, j)
    sch.bind(mi, "threadIdx.y")
    sch.bind(kl, "threadIdx.x")
    emi, _ = sch.get_loops("epilogue")[-2:]
    sch.bind(emi, "threadIdx.y")
    return sch


def schedule_linear(block, regime: str, *, k: int, bias: bool, activation=None,
                    params: GpuParams | None = None) -> tvm.s_tir.Schedule:
    """GPU template for ``block`` ((1, 1) = CSR) and ``regime``, scheduled by :func:`rule_gpu_bsr`.

    Raises
    ------
    KernelBuildError
        Unknown regime, or tiles that do not fit (threads not a multiple of 32, X tile over 48 KiB).
    """
    if regime not in REGIMES:
        raise KernelBuildError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    block = (int(block[0]), int(block[1]))
    params = params or default_params(block, regime, k)
    if WARP % params.m_tile or params.rows < 1 or params.rows * WARP > 1024:
        raise KernelBuildError(f"CUDA tiles {params} invalid: m_tile must divide 32 and rows * 32 <= 1024")
    if params.m_tile * int(k) * 4 > SHARED_BYTES:
        raise KernelBuildError(
            f"X tile of {params.m_tile} rows x K={k} floats needs {params.m_tile * int(k) * 4} bytes of shared "
            f"memory, over the {SHARED_BYTES} available; use a smaller m_tile")
    func = bsr_linear_gpu(block, k=int(k), bias=bias, activation=activation, m_tile=params.m_tile,
                          rows=params.rows, x_scope="shared", acc_scope="local")
    try:
        return apply_rules(RULES, func, None, params)
    except tvm.s_tir.ScheduleError as e:
        raise KernelBuildError(f"CUDA schedule failed for block {block} ({regime}, {params}): {e}") from e


#: The CUDA schedule rules, tried in order.
RULES = (rule_gpu_bsr,)


def _has_nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401

        return True
    except ImportError:
        return False


def build(mod_or_sch, target=None, device_code: bool = False):
    """``tvm.compile`` for a CUDA target (default ``sm_80``); errors become KernelBuildError.

    Parameters
    ----------
    mod_or_sch : tvm.s_tir.Schedule or tvm.IRModule
    target : tvm.target.Target, optional
    device_code : bool
        Compile the CUDA source to device code now (NVRTC if ``cuda-bindings``
        is installed, else nvcc), as needed to run on a GPU. False keeps the
        CUDA source in the module (enough for :func:`kernel_source`; no CUDA
        toolkit needed).
    """
    mod = mod_or_sch.mod if isinstance(mod_or_sch, tvm.s_tir.Schedule) else mod_or_sch
    target = target or cuda_target()
    old = os.environ.get("TVM_CUDA_COMPILE_MODE")
    try:
        if device_code:
            importlib.import_module("tvm.support.nvcc")  # registers tvm_callback_cuda_compile

            if old is None and not _has_nvrtc():
                if find_nvcc() is None:
                    raise KernelBuildError("compiling CUDA kernels needs NVRTC (pip install cuda-bindings) or nvcc")
                os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
        return tvm.compile(mod, target=target)
    except KernelBuildError:
        raise
    except Exception as e:
        raise KernelBuildError(f"TVM build failed for target {target}: {e}") from e
    finally:
        if device_code and old is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


def _device_module(lib):
    mod = lib.mod if hasattr(lib, "mod") else lib
    for m in mod.imports:
        if m.kind == "cuda":
            return m
    raise KernelBuildError("the built module has no CUDA device module")


def kernel_source(lib) -> str:
    """The CUDA C source of a module built by :func:`build` (``tvm.runtime.Executable`` or Module)."""
    src = _device_module(lib).inspect_source()
    if "__global__" not in src:
        raise KernelBuildError("the CUDA module holds no CUDA C source (it was compiled to device code)")
    return src


def find_nvcc() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc``, then ``PATH``, then ``/usr/local/cuda/bin``; None if absent."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        cands.append(Path(which))
    cands.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def nvcc_compile(source: str, arch: str = "sm_80", out_dir: str | None = None, timeout: float = 300.0) -> Path:
    """Compile CUDA C ``source`` with ``nvcc -arch=<arch> -cubin``; returns the cubin's path.

    Raises
    ------
    TargetError
        nvcc is not installed.
    KernelBuildError
        nvcc rejected the source (the message holds nvcc's output).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise TargetError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out = Path(out_dir or tempfile.mkdtemp(prefix="sparsecc-nvcc-"))
    out.mkdir(parents=True, exist_ok=True)
    cu, cubin = out / "kernel.cu", out / "kernel.cubin"
    cu.write_text(source)
    proc = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "-o", str(cubin), str(cu)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise KernelBuildError(f"nvcc -arch={arch} failed on {cu}:\n{proc.stdout}{proc.stderr}")
    return cubin


# -- cost model: a roofline per architecture (no calibration: none possible without a GPU) --------

#: Peak FP32 (CUDA cores, no tensor cores) TFLOP/s and memory GB/s from NVIDIA's datasheets:
#: sm_80 A100 SXM4 80 GB (19.5 TFLOP/s, 2039 GB/s), sm_86 A10 (31.2, 600), sm_89 L4 (30.3, 300),
#: sm_90 H100 SXM5 (66.9, 3350).
ROOFLINE = {"sm_80": (19.5, 2039.0), "sm_86": (31.2, 600.0), "sm_89": (30.3, 300.0), "sm_90": (66.9, 3350.0)}
#: Assumed fractions of those peaks (compute gemv, compute gemm, bandwidth) and the fixed cost per call in ms
#: (launch + Python/DLPack). Assumptions, not measurements: cuBLAS reaches most of the peak; the sparse
#: kernels gather X through shared memory with one FMA per gathered value and re-read the indices per
#: block row element, CSR worst.
EFFICIENCY = {"dense": (0.3, 0.7, 0.8, 0.010), "csr": (0.03, 0.05, 0.35, 0.010), "bsr": (0.05, 0.10, 0.5, 0.010)}


def roofline_constants(arch: str = "sm_80") -> dict:
    """Roofline constants of ``arch`` from datasheet peaks x assumed efficiencies.

    Returns ``{Candidate: (GFLOP/s gemv, GFLOP/s gemm, GB/s, overhead ms)}`` for the cost model's latency
    ``t(M) = overhead + max(FLOPs / P, bytes / BW)`` (Williams et al., CACM 2009), with ``P`` and ``BW`` =
    :data:`ROOFLINE` x :data:`EFFICIENCY`. Unknown archs use the nearest lower known one. Uncalibrated: it
    decides dense vs sparse only where the difference is large (e.g. density 0.1 blocks: bandwidth-bound,
    sparse wins at small M; density 0.5 CSR: dense wins).
    """
    known = sorted(ROOFLINE, key=lambda a: int(a[3:]))
    num = int(arch[3:]) if arch[3:].isdigit() else 80
    base = [a for a in known if int(a[3:]) <= num]
    peak_tf, bw = ROOFLINE[base[-1] if base else known[0]]
    cands = [Candidate("dense")] + [block_candidate(b) for b in BLOCK_SHAPES]
    cands += [Candidate("nm", p) for p in NM_PATTERNS]  # run on the CSR kernel (see CudaSparseLinear)
    out = {}
    for cand in cands:
        ev, em, eb, oh = EFFICIENCY["csr" if cand.format == "nm" else cand.format]
        out[cand] = (peak_tf * 1e3 * ev, peak_tf * 1e3 * em, bw * eb, oh)
    return out


def detect_arch(device_index: int = 0) -> str | None:
    """``"sm_XY"`` of torch's CUDA device ``device_index``, None without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(device_index)
        return f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001
        return None



class CudaTarget(Target):
    """An NVIDIA GPU: sparse linears run as TVM CUDA kernels, everything else in torch on the GPU.

    Convolutions stay in torch (cuDNN): the target declares no conv formats. Formats are chosen by the
    roofline alone (:func:`roofline_constants`): the format pass cannot time GPU kernels from the host.

    Parameters
    ----------
    arch : str, optional
        ``"sm_80"``, ``"sm_90"``, ...; default: the GPU's own, else ``"sm_80"``.
    device_index : int
        torch CUDA device the compiled module runs on.
    build_only : bool
        Build kernels (CUDA source) without a GPU; :func:`sparsecc.compile` then returns a
        :class:`~sparsecc.runtime.cuda_kernels.CudaBuildArtifact`.
    """

    name = "cuda"
    kind = "cuda"
    layer_formats = {"linear": frozenset({"csr", "bsr", "nm"})}
    can_time_kernels = False
    supports_build_only = True
    rules = RULES

    def __init__(self, arch: str | None = None, device_index: int = 0, build_only: bool = False):
        self.device_index = int(device_index)
        self.arch = arch or detect_arch(self.device_index) or "sm_80"
        self._tvm_target = cuda_target(self.arch)  # validates the name
        self.build_only = bool(build_only)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device_index}"

    def tvm_target(self):
        return self._tvm_target

    def describe(self) -> str:
        return f"cuda ({self.arch}{', build only' if self.build_only else ''})"

    def cache_key(self) -> str:
        return f"cuda|{self.arch}|tvm {tvm.__version__}"

    def available(self) -> bool:
        """A usable GPU is present (torch and TVM both see device ``device_index``)."""
        import torch

        return cuda_device_available() and torch.cuda.device_count() > self.device_index

    def check_available(self) -> None:
        """Raise unless a GPU can run the compiled module (build-only targets need none).

        Raises
        ------
        TargetUnavailableError
            No usable GPU and not ``build_only``.
        """
        if self.build_only or self.available():
            return
        import torch

        if not torch.cuda.is_available():
            why = f"torch.cuda.is_available() is False (torch {torch.__version__})"
        else:
            why = f"TVM cannot open CUDA device {self.device_index}"
        raise TargetUnavailableError(
            f"target 'cuda' ({self.arch}) needs a CUDA GPU to run: {why}. Pass build_only=True to "
            "sparsecc.compile to get the CUDA kernels' source and libraries without running them.")

    def kernel_params(self, family: str, regime: str, **shape):
        """``"linear"``: :func:`default_params` for ``block=`` and ``k=``."""
        if family == "linear":
            return default_params(tuple(shape["block"]), regime, int(shape["k"]))
        return super().kernel_params(family, regime, **shape)

    def build(self, mod):
        return build(mod, self.tvm_target(), device_code=not self.build_only)

    def roofline(self) -> dict:
        return roofline_constants(self.arch)

    def __repr__(self) -> str:
        return f"CudaTarget(arch={self.arch!r}, build_only={self.build_only})"
