"""aarch64 NEON target: named devices, schedule parameters for the linear templates, cross build and export.

``target="arm"`` is a generic ARMv8-A core with NEON (Advanced SIMD, 128-bit,
32 vector registers); a named device adds LLVM's ``mcpu`` so the backend uses
that core's scheduling model and extensions (:data:`ARM_DEVICES`).

Schedules: the x86 rules of :mod:`sparsecc.targets.x86` are target-neutral
(they vectorize along the contiguous block dimension, unroll an M tile of
accumulators and parallelize the outer loop), so ARM reuses them. What
differs is the register budget: NEON has 32 registers of 4 floats (AVX-512: 32
of 16). The M tile is therefore chosen so the accumulator tile of one block row
(``m_tile * br * bc`` floats) fits in 16 NEON registers, half the file, leaving
the rest for X broadcasts and weights: 16x1 and 4x4 blocks get 4 rows (x86:
8), the others 8. A vector loop wider than 4 lanes (16x1: 16 lanes) is split by
LLVM into several ``fmla v.4s`` instructions. These tile sizes follow from the
register count only; they are not measured on ARM hardware (none is available
here, and qemu timings do not predict a core's).

Cost model: a foreign CPU cannot be measured from the host, so
:class:`ArmTarget` uses a static roofline of the named core
(:data:`ARM_DEVICES`: peak FP32 FLOP/s of its NEON pipes and a sustained
per-core memory bandwidth) with per-kernel efficiency factors taken from the
host x86 measurements in ../shared/notes (sparse kernels reach a smaller
fraction of peak than dense GEMM). ``compile(..., target="arm")`` never times
kernels; the module it returns runs the same formats with host kernels (so it
can be checked against torch on the host), and :meth:`CompiledModule.export`
cross-builds the aarch64 artifact.

Build: ``tvm.compile`` with ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu",
"mattr": ["+neon"], "mcpu": ...}``; export links TVM's object file with the
Debian cross gcc fetched by :mod:`sparsecc.targets.toolchain`.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import tvm

from sparsecc.errors import KernelBuildError, TargetError, ToolchainError
from sparsecc.fileio import atomic_path
from sparsecc.targets import x86
from sparsecc.targets.toolchain import aarch64_toolchain

__all__ = ["ARM_DEVICES", "ArmDevice", "arm_params", "arm_target", "build", "build_linear_kernel",
           "disassemble", "export_library", "neon_instructions"]


@dataclass(frozen=True)
class ArmDevice:
    """A named aarch64 core.

    Attributes
    ----------
    mcpu : str or None
        LLVM CPU name (None: generic ARMv8-A).
    ghz : float
        Clock (GHz) used by the static cost model.
    fma_pipes : int
        128-bit FMA pipes per core (2 on Cortex-A76 / Neoverse-N1, 4 on Neoverse-V1).
    gbps : float
        Sustained memory bandwidth of one core (GB/s, STREAM-like figures from vendor data sheets and
        public reviews; rough).
    description : str
    """

    mcpu: str | None
    ghz: float
    fma_pipes: int
    gbps: float
    description: str

    @property
    def peak_gflops(self) -> float:
        """FP32 peak of one core: pipes x 4 lanes x 2 FLOPs (multiply + add) x GHz."""
        return self.fma_pipes * 4 * 2 * self.ghz


#: Accepted names -> device. ``"arm"`` / ``"aarch64"`` = generic NEON (a Cortex-A72 class core: 2 pipes of 64-bit
#: FMA throughput are counted as 1 128-bit pipe).
ARM_DEVICES = {
    "arm": ArmDevice(None, 1.8, 1, 8.0, "generic ARMv8-A NEON"),
    "cortex-a72": ArmDevice("cortex-a72", 1.8, 1, 8.0, "Cortex-A72 (Raspberry Pi 4)"),
    "cortex-a76": ArmDevice("cortex-a76", 2.4, 2, 15.0, "Cortex-A76 (Raspberry Pi 5, phones)"),
    "neoverse-n1": ArmDevice("neoverse-n1", 2.5, 2, 20.0, "Neoverse-N1 (AWS Graviton2)"),
    "neoverse-v1": ArmDevice("neoverse-v1", 2.6, 4, 30.0, "Neoverse-V1 (AWS Graviton3)"),
}
_ALIASES = {"aarch64": "arm", "arm64": "arm", "graviton2": "neoverse-n1", "graviton3": "neoverse-v1",
            "a76": "cortex-a76", "a72": "cortex-a72"}


def device_for(name: str) -> tuple[str, ArmDevice]:
    """``(canonical name, ArmDevice)`` for ``"arm"``, ``"arm:<core>"``, a core name or an alias.

    Raises
    ------
    TargetError
        Unknown core (the message lists the known ones).
    """
    key = name.lower()
    if key.startswith(("arm:", "aarch64:")):
        key = key.split(":", 1)[1]
    key = _ALIASES.get(key, key)
    if key not in ARM_DEVICES:
        raise TargetError(f"unknown ARM device {name!r}; known: {sorted(ARM_DEVICES) + sorted(_ALIASES)}")
    return key, ARM_DEVICES[key]


def arm_target(device: str = "arm") -> tvm.target.Target:
    """The llvm target of an aarch64 device: ``mtriple=aarch64-linux-gnu``, ``+neon``, ``mcpu`` when named."""
    _, dev = device_for(device)
    cfg = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if dev.mcpu:
        cfg["mcpu"] = dev.mcpu
    return tvm.target.Target(cfg)


#: NEON registers (128-bit, 4 float32 lanes) the accumulator tile may use.
ACC_REGISTERS = 16


def arm_params(block: tuple[int, int], regime: str) -> x86.ScheduleParams:
    """Tile sizes for NEON: ``m_tile * br * bc / 4 <= ACC_REGISTERS`` (at most 8 rows, 1 in gemv)."""
    if regime == "gemv":
        return x86.ScheduleParams(m_tile=1, m_outer=True)
    br, bc = block
    m_tile = 8 if (br, bc) == (1, 1) else max(1, min(8, ACC_REGISTERS * 4 // (br * bc)))
    return x86.ScheduleParams(m_tile=m_tile, m_outer=True)


def schedule_linear(block, regime: str, *, bias: bool, activation=None, k: int | None = None):
    """The x86 rules applied with NEON tile sizes (:func:`arm_params`)."""
    return x86.schedule_linear(tuple(block), regime, bias=bias, activation=activation,
                               params=arm_params(tuple(block), regime), k=k)


def build(mod_or_sch, target: tvm.target.Target | None = None):
    """``tvm.compile`` for an aarch64 target (code generation only; nothing runs on the host)."""
    return x86.build(mod_or_sch, target or arm_target())


def export_library(lib, path) -> Path:
    """Export a built module as an aarch64 shared library with the cross gcc (written atomically).

    Raises
    ------
    ToolchainError
        The toolchain cannot be fetched or the link failed.
    """
    tc = aarch64_toolchain()
    path = Path(path)
    with atomic_path(path, suffix=".so") as tmp:
        try:
            lib.export_library(str(tmp), fcompile=tc.fcompile())
        except ToolchainError:
            raise
        except Exception as e:
            raise ToolchainError(f"exporting the aarch64 library {path} failed: {e}") from e
    return path


def kernel_cache_dir() -> Path:
    from sparsecc.runtime.kernels import cache_root

    return cache_root() / "kernels-aarch64"


def build_linear_kernel(block, regime: str, *, bias: bool, activation=None, device: str = "arm",
                        k: int | None = None) -> Path:
    """Cross-build one sparse linear kernel and return its aarch64 ``.so`` (cached on disk).

    The kernel's arguments are those of :func:`sparsecc.runtime.kernels.get_linear_kernel`; ``M`` must be a
    multiple of ``arm_params(block, regime).m_tile``.

    Raises
    ------
    KernelBuildError, ToolchainError
    """
    from sparsecc.runtime.kernels import kernel_name

    target = arm_target(device)
    sch = schedule_linear(block, regime, bias=bias, activation=activation, k=k)
    text = sch.mod.script()
    digest = hashlib.sha256("\n".join([text, str(target), tvm.__version__]).encode()).hexdigest()[:24]
    path = kernel_cache_dir() / f"{kernel_name(tuple(block), regime, bias, activation)}-{digest}.so"
    if not path.exists():
        export_library(build(sch, target), path)
    return path


def disassemble(lib_path) -> str:
    """``objdump -d`` of an aarch64 shared library (with the cross binutils)."""
    tc = aarch64_toolchain()
    r = subprocess.run([str(tc.objdump), "-d", str(lib_path)], check=False, capture_output=True, text=True,
                       env=tc.env())
    if r.returncode != 0:
        raise ToolchainError(f"objdump -d {lib_path} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def neon_instructions(asm: str) -> dict:
    """Counts of NEON vector FP instructions on ``.4s`` lanes in an objdump listing (fmla, fmul, fadd, fmax, ld1r)."""
    counts = {}
    for line in asm.splitlines():
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        op, operands = parts[2].strip(), parts[3]
        if ".4s" in operands or op in ("ld1r",):
            counts[op] = counts.get(op, 0) + 1
    return counts


def check_buildable(device: str = "arm") -> None:
    """Raise :class:`KernelBuildError` if TVM's LLVM has no AArch64 backend."""
    try:
        tvm.target.Target(arm_target(device))
    except Exception as e:
        raise KernelBuildError(f"TVM cannot target aarch64: {e}") from e


# -- the CompileTarget -------------------------------------------------------------------

#: Fraction of the core's FP32 peak each kernel is assumed to reach (gemm regime; gemv gets half), and the
#: fraction of the core's bandwidth it streams at. Relative orders follow the x86 measurements of
#: ../shared/notes/tvm-0.27-facts.md (16x1 > 8x1 > 4x4 > 4x1 > 1x8 > 1x4 > CSR; N:M, vectorized along M, near 8x1);
#: dense assumes a tuned BLAS-class GEMM. Not measured on ARM hardware.
STATIC_EFFICIENCY = {
    "dense": (0.60, 0.80), "csr_1x1": (0.06, 0.35), "bsr_1x4": (0.12, 0.55), "bsr_1x8": (0.15, 0.60),
    "bsr_4x1": (0.20, 0.60), "bsr_8x1": (0.28, 0.70), "bsr_16x1": (0.35, 0.75), "bsr_4x4": (0.25, 0.65),
    "nm_2:4": (0.30, 0.60), "nm_1:4": (0.25, 0.60),
}
#: Fixed cost of one kernel call on the board (ms).
STATIC_OVERHEAD_MS = 0.005


def static_cost_model(device: str = "arm"):
    """Roofline cost model of an ARM core from its data sheet (:data:`ARM_DEVICES`, :data:`STATIC_EFFICIENCY`).

    ``P = efficiency x peak GFLOP/s`` (half of it for M < 8), ``BW = fraction x core GB/s``; see
    :class:`~sparsecc.tune.cost_model.CostModel` for the latency formula (Williams et al., CACM 2009).
    """
    from sparsecc.tune.cost_model import CostModel, KernelCalibration

    _, dev = device_for(device)
    kernels = {}
    for key, (eff, bw) in STATIC_EFFICIENCY.items():
        gemm = eff * dev.peak_gflops
        kernels[key] = KernelCalibration(gflops_gemv=gemm / 2, gflops_gemm=gemm, gbps=bw * dev.gbps,
                                         overhead_ms=STATIC_OVERHEAD_MS)
    return CostModel(kernels, source=f"static roofline of {dev.description} ({dev.peak_gflops:.1f} GFLOP/s "
                                     f"peak, {dev.gbps:.0f} GB/s), not measured")


from sparsecc.targets.base import CompileTarget


class ArmTarget(CompileTarget):
    """An aarch64 NEON device (``"arm"``, ``"cortex-a76"``, ``"neoverse-n1"``/``"graviton2"``, ...).

    Formats are chosen with :func:`static_cost_model` (nothing is timed: the host is not the device). The
    kernel modules of the compiled graph are host builds of the same formats, so ``cm(*inputs)`` runs and can
    be checked on the host; ``cm.export(path)`` cross-compiles the deployable aarch64 artifact.

    Parameters
    ----------
    device : str
        A key of :data:`ARM_DEVICES` or an alias (``"graviton3"``), optionally prefixed ``"arm:"``.
    """

    def __init__(self, device: str = "arm"):
        super().__init__()
        self.device, self.arm_device = device_for(device)
        self.name = "arm" if self.device == "arm" else f"arm:{self.device}"

    def arm_tvm_target(self) -> tvm.target.Target:
        """The aarch64 ``tvm.target.Target`` the exported artifact is built for."""
        return arm_target(self.device)

    def tvm_target(self):
        """The *host* target: the compiled module's kernels run here (see the class docstring)."""
        return super().tvm_target()

    def make_linear(self, matrix, bias=None, activation=None):
        """Host kernel module of ``matrix``'s format; N:M layers get the NEON tiles (:func:`nm_params`), so
        their packed values and indices are the ones the exported aarch64 kernel reads."""
        from sparsecc.formats import NMSparseMatrix

        if isinstance(matrix, NMSparseMatrix):
            from sparsecc.runtime.nm import NMLinear

            return NMLinear(matrix, bias, activation=activation, target=self.tvm_target(),
                            params={r: nm_params(r, self.device) for r in ("gemv", "gemm")})
        return super().make_linear(matrix, bias, activation)

    def describe(self) -> str:
        return f"{self.name} ({self.arm_device.description}; host kernels for cm(), aarch64 export)"

    def cache_key(self) -> str:
        return f"{self.name}|{self.arm_tvm_target()}|tvm {tvm.__version__}"

    def cost_model(self):
        if self._cost_model is None:
            self._cost_model = static_cost_model(self.device)
        return self._cost_model

    def prepare_compile(self, build_only: bool = False, measure: bool = True):
        """Never measure: host timings say nothing about the ARM core (``build_only`` is for CUDA)."""
        if build_only:
            raise TargetError("build_only=True is for target 'cuda'; for ARM, compile and call cm.export(path)")
        return self, False

    def __repr__(self) -> str:
        return f"ArmTarget({self.device!r})"


def run_linear_under_qemu(matrix, x, bias=None, activation=None, *, device: str = "arm", static_k: bool = False,
                          repeat: int = 1):
    """``act(x @ W.T + b)`` computed by the cross-built aarch64 kernel under qemu (for tests and benchmarks).

    Parameters
    ----------
    matrix : BlockSparseMatrix
        W: (N, K) in BSR/CSR.
    x : torch.Tensor
        (M, K) float32.
    bias : torch.Tensor, optional
        (N,).
    static_k : bool
        Build for the static K of ``matrix`` (one build per K) instead of a symbolic K.

    Returns
    -------
    y : torch.Tensor
        (M, N).
    time_ms : float or None
        Median emulated time of one call (``repeat > 1``).
    """
    import numpy as np
    import torch

    from sparsecc.targets.qemu import run_under_qemu

    n, k = matrix.shape
    br, bc = matrix.block
    m = x.shape[0]
    regime = x86.regime_for(m)
    mt = arm_params((br, bc), regime).m_tile
    mp = -(-max(m, 1) // mt) * mt
    xp = torch.zeros(mp, k)
    xp[:m] = x
    data, indices = matrix.data.detach().float().contiguous(), matrix.indices.int()
    if data.shape[0] == 0:  # nnzb == 0: as SparseLinear, pass one unread block
        data, indices = torch.zeros(1, br, bc), torch.zeros(1, dtype=torch.int32)
    args = [xp, data, indices, matrix.indptr.int()]
    if bias is not None:
        args.append(bias.detach().float().reshape(n // br, br))
    args.append(np.zeros((mp, n // br, br), np.float32))
    lib = build_linear_kernel((br, bc), regime, bias=bias is not None, activation=activation, device=device,
                              k=k if static_k else None)
    outs, t = run_under_qemu(lib, args, repeat=repeat)
    return torch.from_numpy(outs[-1].reshape(mp, n)[:m].copy()), t


def nm_params(regime: str, device: str = "arm"):
    """N:M tiles for NEON: the x86 N:M rules' defaults at 128-bit vectors (gemm: 4 rows of X per vector)."""
    from sparsecc.targets.x86_nm import default_nm_params

    return default_nm_params(regime, target=arm_target(device))


def build_nm_kernel(n: int, m: int, groups: int, regime: str, *, bias: bool, activation=None,
                    device: str = "arm", params=None) -> Path:
    """Cross-build one N:M linear kernel (:mod:`sparsecc.codegen.nm`) and return its aarch64 ``.so`` (cached)."""
    from sparsecc.runtime.nm import nm_kernel_name
    from sparsecc.targets.x86_nm import schedule_nm

    target = arm_target(device)
    params = params or nm_params(regime, device)
    sch = schedule_nm(n, m, groups, regime, bias=bias, activation=activation, target=target, params=params)
    digest = hashlib.sha256("\n".join([sch.mod.script(), str(target), tvm.__version__]).encode()).hexdigest()[:24]
    path = kernel_cache_dir() / f"{nm_kernel_name(n, m, regime, bias, activation)}-g{groups}-{digest}.so"
    if not path.exists():
        export_library(build(sch, target), path)
    return path


def run_nm_linear_under_qemu(matrix, x, bias=None, activation=None, *, device: str = "arm", repeat: int = 1):
    """``act(x @ W.T + b)`` for an N:M ``matrix`` (NMSparseMatrix, W: (N, K)) by the aarch64 kernel under qemu.

    Packing and the tiled transpose of X are those of :class:`sparsecc.runtime.nm.NMLinear` (built with NEON
    tiles, never run on the host here).

    Returns
    -------
    y : torch.Tensor
        (M, N).
    time_ms : float or None
    """
    import torch

    from sparsecc.runtime.nm import NMLinear
    from sparsecc.targets.qemu import run_under_qemu

    params = {r: nm_params(r, device) for r in ("gemv", "gemm")}
    mod = NMLinear(matrix, bias, activation, target=arm_target(device), params=params)
    n_out, k = mod.shape
    rows = x.shape[0]
    regime = x86.regime_for(rows)
    p = mod.params[regime]
    xt = mod._transpose_x(x.reshape(rows, k).contiguous(), p.m_tile)
    mp = xt.shape[0] * p.m_tile
    if p.index == "offset":
        xt = xt.reshape(xt.shape[0], -1)
    meta = getattr(mod, mod._meta_names[regime])
    y4 = torch.zeros(xt.shape[0], p.m_tile, mod.n_padded // mod.r_tile, mod.r_tile)
    args = [xt, mod.values, meta] + ([mod.bias] if mod.bias is not None else []) + [y4]
    lib = build_nm_kernel(mod.n, mod.m, mod.groups, regime, bias=mod.bias is not None, activation=activation,
                          device=device, params=p)
    outs, t = run_under_qemu(lib, args, repeat=repeat)
    y = torch.from_numpy(outs[-1].reshape(mp, mod.n_padded)[:rows, :n_out].copy())
    return y, t
