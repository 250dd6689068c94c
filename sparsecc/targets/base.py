"""Compile targets: what a pass needs to know about the machine it compiles for.

A :class:`CompileTarget` gives the passes a calibrated cost model, a factory
for kernel modules and the block shape to prune to; it hides TVM from them.
"""

from __future__ import annotations

import platform
from typing import Optional

import torch

from ..errors import TargetError
from ..formats import BLOCK_SHAPES

#: Target names accepted by :func:`resolve_target`.
TARGET_ALIASES = {"x86": "x86", "x86_64": "x86", "cpu": "x86", "llvm": "x86", "host": "x86"}
PLANNED: dict = {}
#: Names of the ARM target (``targets/arm.py``); ``"arm:<core>"`` or a core name picks the device.
ARM_ALIASES = ("arm", "aarch64", "arm64", "cortex-a72", "cortex-a76", "neoverse-n1", "neoverse-v1", "graviton2",
               "graviton3")
#: Names of the CUDA target (``targets/cuda.py``); a dict ``{"kind": "cuda", "arch": "sm_90"}`` picks the arch.
CUDA_ALIASES = ("cuda", "gpu", "nvidia")


class CompileTarget:
    """The host x86 CPU (AVX2/AVX-512 picked from the detected CPU by TVM's LLVM backend)."""

    name = "x86"

    def __init__(self):
        self._tvm_target = None
        self._cost_model = None
        #: sparsecc.tune.autotune.TuningDatabase set by compile(..., tuning_db=...): make_linear
        #: then uses its tuned schedules where it has them
        self.tuning_db = None

    def tvm_target(self):
        """The ``tvm.target.Target`` kernels are built for (the detected host CPU)."""
        if self._tvm_target is None:
            from .x86 import host_target

            self._tvm_target = host_target()
        return self._tvm_target

    def describe(self) -> str:
        t = self.tvm_target()
        return f"{self.name} ({t.attrs.get('mcpu', 'generic')})"

    def cache_key(self) -> str:
        import tvm

        return f"{self.name}|{self.tvm_target()}|tvm {tvm.__version__}"

    def make_linear(self, matrix, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None):
        """Kernel module computing ``act(X · Wᵀ + b)`` for ``matrix``: W (N, K) (BSR/CSR or N:M)."""
        from ..formats import NMSparseMatrix
        from ..runtime.kernels import SparseLinear

        if isinstance(matrix, NMSparseMatrix):
            from ..runtime.nm import NMLinear

            return NMLinear(matrix, bias, activation=activation, target=self.tvm_target())
        tuned = None
        if getattr(self, "tuning_db", None) is not None:  # compile(..., tuning_db=...)
            n, k = matrix.shape
            tuned = self.tuning_db.for_layer(matrix.block, n, k, matrix.nnzb, bias is not None, activation,
                                             self.tvm_target())
        return SparseLinear(matrix, bias, activation=activation, target=self.tvm_target(), tuned=tuned)

    def make_conv(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride=1, padding=0,
                  block=(16, 1), activation: Optional[str] = None, residual: bool = False, layout: str = "nhwc",
                  name: str = "conv"):
        """Kernel module computing ``act(conv2d(x, W, b) [+ r])`` for ``weight``: W (C_out, C_in, kh, kw)."""
        from ..runtime.conv import SparseConv2d

        return SparseConv2d(weight, bias, stride, padding, activation, block, layout=layout, residual=residual,
                            target=self.tvm_target(), name=name)

    def cost_model(self):
        """Cost model calibrated on this host (cached on disk after the first run)."""
        if self._cost_model is None:
            from ..tune.calibrate import calibrate

            self._cost_model = calibrate(self)
        return self._cost_model

    def prune_block(self, shapes, density: float, m: int, max_area: int = 16) -> tuple:
        """Block shape to prune to for ``pattern="block"``: the one with least estimated total latency.

        Parameters
        ----------
        shapes : list of (N, K)
            Weight shapes of the layers to prune.
        density : float
            Density they will be pruned to.
        m : int
            Example rows of X.
        max_area : int
            Largest block area considered (larger blocks cost more accuracy).
        """
        cost = self.cost_model()
        best, best_t = (1, 1), float("inf")
        for b in BLOCK_SHAPES:
            if b == (1, 1) or b[0] * b[1] > max_area or not cost.has("bsr", b):
                continue
            fits = [(n, k) for n, k in shapes if n % b[0] == 0 and k % b[1] == 0]
            if not fits:
                continue
            # a layer the block does not divide stays unstructured (CSR) or dense, whichever is faster
            t = sum(cost.estimate_ms("bsr", n, k, m, int(density * n * k / (b[0] * b[1])), b) for n, k in fits)
            t += sum(min(cost.estimate_ms("dense", n, k, m), cost.estimate_ms("csr", n, k, m, int(density * n * k)))
                     for n, k in shapes if (n, k) not in fits)
            if t < best_t:
                best, best_t = b, t
        return best

    def prepare_compile(self, build_only: bool = False, measure: bool = True):
        """Called by :func:`sparsecc.compile` before the passes; returns ``(target, measure)``.

        Raises
        ------
        TargetError
            ``build_only`` on a target that runs here (only ``"cuda"`` has a build-only mode).
        """
        if build_only:
            raise TargetError(f"build_only=True is for target 'cuda' (no GPU needed); target {self.name!r} "
                              "builds and runs on this host")
        return self, measure

    def finish_compile(self, cm):
        """Called by :func:`sparsecc.compile` on the compiled module; returns what ``compile`` returns."""
        return cm

    def __repr__(self) -> str:
        return f"CompileTarget({self.name!r})"


def resolve_target(target) -> CompileTarget:
    """Turn ``"x86"`` (or a :class:`CompileTarget`) into a target object.

    ``"cuda"`` (or ``{"kind": "cuda", "arch": "sm_90", "device": 0}``) gives a
    :class:`~sparsecc.targets.cuda.CudaTarget` (arch: the GPU's own, else sm_80).

    Raises
    ------
    TargetError
        Unknown name, a target that is planned but not built yet, or ``"x86"``
        on a host that is not x86-64.
    """
    if isinstance(target, CompileTarget):
        return target
    if isinstance(target, dict) and str(target.get("kind", "")).lower() == "cuda":
        extra = set(target) - {"kind", "arch", "device"}
        if extra:
            raise TargetError(f"CUDA target keys are 'kind', 'arch', 'device'; unknown: {sorted(extra)}")
        from .cuda import CudaTarget

        return CudaTarget(target.get("arch"), int(target.get("device", 0)))
    if isinstance(target, str) and target.lower() in CUDA_ALIASES:
        from .cuda import CudaTarget

        return CudaTarget()
    if not isinstance(target, str):
        raise TargetError(f"target must be a name such as 'x86', got {type(target).__name__}")
    if target.lower() in ARM_ALIASES or target.lower().startswith(("arm:", "aarch64:")):
        from .arm import ArmTarget

        return ArmTarget(target)
    key = target.lower()
    if key in PLANNED:
        raise TargetError(f"target {target!r} is not supported yet: it arrives with {PLANNED[key]}")
    if key not in TARGET_ALIASES:
        raise TargetError(f"unknown target {target!r}; supported: 'x86', 'cuda', 'arm' or 'arm:<core>' "
                          f"({', '.join(ARM_ALIASES[3:])})")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise TargetError(f"target 'x86' needs an x86-64 host, this is {platform.machine()}")
    return CompileTarget()
