"""aarch64 NEON target: named devices, schedule parameters for the linear templates, cross build and export.

``target="arm"`` is a generic ARMv8-A core with NEON (Advanced SIMD, 128-bit,
32 vector registers); a named device adds LLVM's ``mcpu`` so the backend uses
that core's scheduling model and extensions (:data:`ARM_DEVICES`).

Schedules: the x86 rules of :mod:`sparsecc.targets.x86` are target-neutral
(they vectorize along the contiguous block dimension, unroll an M tile of
accumulators and parallelize the outer loop), so ARM reuses them. What
differs is the register budget: NEON has 32 registers of 4 floats (AVX-512: 32
of 16, AVX2: 16 of 8). The M tile is therefore chosen so the accumulator tile of one
block row (``m_tile * br * bc`` floats) fits in 16 NEON registers, half the file,
leaving the rest for X broadcasts and weights: 16x1 and 4x4 blocks get 4 rows (x86:
8 with AVX-512, 4 with AVX2, by the same rule), the others 8. A vector loop wider than 4 lanes (16x1: 16 lanes) is split by
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

import subprocess
from dataclasses import dataclass
from pathlib import Path

import tvm

from sparsecc.cache import KERNELS
from sparsecc.errors import KernelBuildError, TargetError, ToolchainError
from sparsecc.fileio import atomic_path
from sparsecc.formats import Candidate, block_candidate
from sparsecc.targets import x86
from sparsecc.targets.base import Target
from sparsecc.targets.toolchain import aarch64_toolchain
from sparsecc.targets.x86_nm import default_nm_params, schedule_nm

__all__ = ["ARM_DEVICES", "ArmDevice", "ArmTarget", "arm_params", "arm_target", "build", "build_linear_kernel",
           "build_nm_kernel", "cross_built", "disassemble", "export_library", "neon_instructions", "nm_params",
           "static_roofline"]


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


def build_linear_kernel(block, regime: str, *, bias: bool, activation=None, device: str = "arm",
                        k: int | None = None) -> Path:
    """Cross-build one sparse linear kernel and return its aarch64 ``.so`` (in the kernel cache).

    The kernel's arguments are those of :func:`sparsecc.runtime.kernels.get_linear_kernel`; ``M`` must be a
    multiple of ``arm_params(block, regime).m_tile``.

    Raises
    ------
    KernelBuildError, ToolchainError
    """
    target = arm_target(device)
    block = tuple(block)
    sch = schedule_linear(block, regime, bias=bias, activation=activation, k=k)
    name = block_candidate(block).kernel_name("linear", regime, bias, activation)
    return cross_built(sch, name, target)


def build_xcsr_kernel(regime: str, *, activation=None, index_dtype: str = "int16", device: str = "arm",
                      params=None) -> Path:
    """Cross-build one unstructured (xcsr) linear kernel (:mod:`sparsecc.codegen.xcsr`), return its aarch64 ``.so``.

    Arguments of the kernel: those of :func:`sparsecc.runtime.xcsr.get_xcsr_kernel`.

    Raises
    ------
    KernelBuildError, ToolchainError
    """
    from sparsecc.targets.x86_xcsr import default_xcsr_params, schedule_xcsr, xcsr_kernel_name

    target = arm_target(device)
    params = params or default_xcsr_params(regime)
    sch = schedule_xcsr(regime, activation=activation, index_dtype=index_dtype, target=target, params=params)
    return cross_built(sch, xcsr_kernel_name(regime, activation, index_dtype, params), target)


def cross_built(sch, name: str, target) -> Path:
    """The aarch64 ``.so`` of a scheduled kernel (a ``Schedule`` or an ``IRModule``), built once into the kernel
    cache under ``name`` and the hash of its TensorIR.

    Raises
    ------
    KernelBuildError, ToolchainError
    """
    mod = getattr(sch, "mod", sch)
    digest = KERNELS.digest(mod.script(), str(target), tvm.__version__)
    return KERNELS.library(name, digest, lambda tmp: export_library(build(mod, target), tmp), target_dir="aarch64")


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


#: Fraction of the core's FP32 peak each kernel is assumed to reach (gemm regime; gemv gets half), and the
#: fraction of the core's bandwidth it streams at. Relative orders follow the x86 measurements of
#: ../shared/notes/tvm-0.27-facts.md (16x1 > 8x1 > 4x4 > 4x1 > 1x8 > 1x4 > CSR; N:M, vectorized along M, near 8x1);
#: dense assumes a tuned BLAS-class GEMM. Not measured on ARM hardware.
STATIC_EFFICIENCY = {
    Candidate("dense"): (0.60, 0.80), Candidate("csr", (1, 1)): (0.06, 0.35),
    Candidate("bsr", (1, 4)): (0.12, 0.55), Candidate("bsr", (1, 8)): (0.15, 0.60),
    Candidate("bsr", (4, 1)): (0.20, 0.60), Candidate("bsr", (8, 1)): (0.28, 0.70),
    Candidate("bsr", (16, 1)): (0.35, 0.75), Candidate("bsr", (4, 4)): (0.25, 0.65),
    Candidate("nm", (2, 4)): (0.30, 0.60), Candidate("nm", (1, 4)): (0.25, 0.60),
    Candidate("xcsr"): (0.35, 0.55),
}
#: Fixed cost of one kernel call on the board (ms).
STATIC_OVERHEAD_MS = 0.005


def static_roofline(device: str = "arm") -> dict:
    """Roofline constants of an ARM core from its data sheet (:data:`ARM_DEVICES`, :data:`STATIC_EFFICIENCY`).

    ``P = efficiency x peak GFLOP/s`` (half of it for M < 8), ``BW = fraction x core GB/s``: returns
    ``{Candidate: (GFLOP/s gemv, GFLOP/s gemm, GB/s, overhead ms)}`` for the cost model's roofline
    (Williams et al., CACM 2009).
    """
    _, dev = device_for(device)
    out = {}
    for cand, (eff, bw) in STATIC_EFFICIENCY.items():
        gemm = eff * dev.peak_gflops
        out[cand] = (gemm / 2, gemm, bw * dev.gbps, STATIC_OVERHEAD_MS)
    return out


class ArmTarget(Target):
    """An aarch64 NEON device (``"arm"``, ``"cortex-a76"``, ``"neoverse-n1"``/``"graviton2"``, ...).

    Formats are chosen with the static roofline (:func:`static_roofline`; nothing is timed: the host is
    not the device). The kernel modules of the compiled graph are host builds of the same formats (N:M
    packed with the NEON tiles), so ``cm(*inputs)`` runs and can be checked on the host;
    ``cm.export(path)`` cross-compiles the deployable aarch64 artifact.

    Parameters
    ----------
    device : str
        A key of :data:`ARM_DEVICES` or an alias (``"graviton3"``), optionally prefixed ``"arm:"``.
    rpc : sparsecc.tune.remote.RPCDevice, optional
        A board behind a TVM RPC tracker: the cost model is fitted to kernels timed there
        (:func:`sparsecc.tune.cost_model.cost_model_for`) instead of :func:`static_roofline`.
    """

    kind = "arm"
    layer_formats = {"linear": frozenset({"csr", "bsr", "nm", "xcsr"}), "conv2d": frozenset({"csr", "bsr", "xcsr"})}
    can_time_kernels = False

    def __init__(self, device: str = "arm", rpc=None):
        from sparsecc.targets.x86 import X86Target

        self.rpc = rpc
        self.device, self.arm_device = device_for(device)
        self.name = "arm" if self.device == "arm" else f"arm:{self.device}"
        self.host = X86Target()  # runs the compiled module's kernels in this process
        self.rules = self.host.rules

    def tvm_target(self):
        """The *host* target: the compiled module's kernels run here (see the class docstring)."""
        return self.host.tvm_target()

    def deploy_tvm_target(self) -> tvm.target.Target:
        """The aarch64 ``tvm.target.Target`` the exported artifact is built for."""
        return arm_target(self.device)

    @property
    def deploy_arch(self) -> str:
        return "aarch64"

    def kernel_params(self, family: str, regime: str, **shape):
        """NEON tiles: ``"linear"`` (:func:`arm_params`), ``"nm"`` (:func:`nm_params`), ``"dense"``
        (:func:`sparsecc.targets.x86.dense_params` for 32 registers of 4 floats); convs use the host's."""
        if family == "linear":
            return arm_params(tuple(shape["block"]), regime)
        if family == "dense":
            return x86.dense_params(shape["m"], shape["k"], 4, 32)
        if family == "nm":
            return nm_params(regime, self.device)
        return self.host.kernel_params(family, regime, **shape)

    def build(self, mod):
        """Host build (the compiled module's kernels run here); :func:`build` cross-builds for the device."""
        return self.host.build(mod)

    def export_library(self, lib, path) -> None:
        export_library(lib, path)

    def describe(self) -> str:
        remote = f"; formats timed on {self.rpc.describe()}" if self.rpc is not None else ""
        return f"{self.name} ({self.arm_device.description}; host kernels for cm(), aarch64 export{remote})"

    def cache_key(self) -> str:
        return f"{self.name}|{self.deploy_tvm_target()}|tvm {tvm.__version__}"

    def roofline(self) -> dict:
        return static_roofline(self.device)

    def __repr__(self) -> str:
        return f"ArmTarget({self.device!r})" if self.rpc is None else f"ArmTarget({self.device!r}, rpc={self.rpc!r})"


def nm_params(regime: str, device: str = "arm"):
    """N:M tiles for NEON: the x86 N:M rules' defaults at 128-bit vectors (gemm: 4 rows of X per vector)."""
    return default_nm_params(regime, target=arm_target(device))


def build_nm_kernel(n: int, m: int, groups: int, regime: str, *, bias: bool, activation=None,
                    device: str = "arm", params=None) -> Path:
    """Cross-build one N:M linear kernel (:mod:`sparsecc.codegen.nm`) and return its aarch64 ``.so`` (cached)."""
    target = arm_target(device)
    params = params or nm_params(regime, device)
    sch = schedule_nm(n, m, groups, regime, bias=bias, activation=activation, target=target, params=params)
    name = Candidate("nm", (n, m)).kernel_name("linear", regime, bias, activation) + f"_g{groups}"
    return cross_built(sch, name, target)


