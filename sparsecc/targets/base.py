"""The target contract: what every compile target (x86, ARM, CUDA) declares and does.

A :class:`Target` describes a machine to the layers above it: which formats it can
build for each layer kind, whether kernels can be timed on this host, where the
compiled module's tensors live, its schedule rules and how it builds and links a
kernel. It knows nothing of runtime modules, passes or the cost model (those layers
import targets, never the reverse): the runtime's module factories are registered per
target :attr:`~Target.kind` on each format (:mod:`sparsecc.formats.base`), the cost
model is calibrated by :mod:`sparsecc.tune.cost_model` or built from
:meth:`Target.roofline`, and the pass pipeline is composed from the capabilities by
:func:`sparsecc.passes.pipeline.default_pipeline` (as Relax's per-target default pipelines).

Capabilities are class attributes a target overrides (as tinygrad's renderers declare
``has_local``/``has_shared``); nothing is probed with ``hasattr``.

Schedule rules share one signature, ``rule(func, target, params) -> Schedule | None``
(None: the rule does not apply to that template), and :func:`apply_rules` tries them in
order, as TVM dlight's ``ScheduleRule.apply`` under ``ApplyDefaultSchedule``.
"""

from __future__ import annotations

import platform
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

from sparsecc.errors import KernelBuildError, TargetError

__all__ = ["Target", "apply_rules", "resolve_target"]


class Target(ABC):
    """A compile target.

    Attributes
    ----------
    name : str
        What ``compile(target=...)`` was given, normalized (``"x86"``, ``"arm:neoverse-n1"``, ``"cuda"``).
    kind : str
        ``"x86"``, ``"arm"`` or ``"cuda"``: runtime module factories are registered per kind.
    layer_formats : dict layer kind -> frozenset of format names
        Formats the target builds kernels for (``"linear"``, ``"conv2d"``); dense is always possible.
    can_time_kernels : bool
        Kernels run on this host, so formats may be chosen by measurement and the cost model calibrated.
    supports_build_only : bool
        ``compile(..., build_only=True)`` builds kernels without running them.
    build_only : bool
        This target object builds only (set by :func:`resolve_target`).
    torch_device : str
        Device the compiled module's tensors live on.
    rules : tuple of callables
        Schedule rules in the order they are tried.
    """

    name: str = ""
    kind: str = ""
    layer_formats: dict = {}
    can_time_kernels: bool = False
    supports_build_only: bool = False
    build_only: bool = False
    torch_device: str = "cpu"
    rules: tuple = ()

    def supports(self, layer_kind: str, fmt: str) -> bool:
        """Whether the target builds ``fmt`` kernels for ``layer_kind`` layers (dense: always)."""
        return fmt == "dense" or fmt in self.layer_formats.get(layer_kind, ())

    @abstractmethod
    def tvm_target(self):
        """The ``tvm.target.Target`` the compiled module's kernels are built for (they run in this process)."""

    def deploy_tvm_target(self):
        """The ``tvm.target.Target`` an exported artifact is built for (default: :meth:`tvm_target`)."""
        return self.tvm_target()

    #: Architecture of an exported artifact (``platform.machine()`` names; "aarch64" for ARM).
    @property
    def deploy_arch(self) -> str:
        return platform.machine()

    @abstractmethod
    def describe(self) -> str:
        """One line for reports: name and CPU/GPU."""

    @abstractmethod
    def cache_key(self) -> str:
        """What a cached calibration or kernel of this target depends on."""

    def roofline(self) -> Optional[dict]:
        """Static cost constants ``{Candidate: (GFLOP/s gemv, GFLOP/s gemm, GB/s, overhead ms)}``, or None.

        None (targets that can time kernels) means: calibrate by measuring on this host.
        """
        return None

    def kernel_params(self, family: str, regime: str, **shape):
        """Schedule knobs of a kernel family (``"linear"``, ``"nm"``, ``"conv"``) in a regime on this target.

        Raises
        ------
        KernelBuildError
            The target has no kernels of that family.
        """
        raise KernelBuildError(f"target {self.name!r} has no {family!r} kernels")

    def build(self, mod):
        """``tvm.compile`` a scheduled kernel for :meth:`tvm_target`; errors become KernelBuildError."""
        raise KernelBuildError(f"target {self.name!r} does not build kernels here")

    def export_library(self, lib, path) -> None:
        """Write a built module as a shared library at ``path`` (cross-linked where the target needs it)."""
        lib.export_library(str(path))

    def check_available(self) -> None:
        """Raise :class:`~sparsecc.errors.TargetUnavailableError` when the compiled module cannot run here."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def apply_rules(rules: Sequence[Callable], func, target, params):
    """The schedule of the first rule in ``rules`` that applies to the template ``func``.

    Raises
    ------
    KernelBuildError
        No rule applies (the message names the template's kind).
    """
    for rule in rules:
        sch = rule(func, target, params)
        if sch is not None:
            return sch
    attrs = func.attrs if hasattr(func, "attrs") else func.mod["main"].attrs
    what = {k: str(attrs[k]) for k in attrs.keys() if str(k).startswith("sparsecc.")}
    raise KernelBuildError(f"no schedule rule of {target!r} applies to the template {what} ({params})")


#: Names of the x86 host target.
X86_ALIASES = ("x86", "x86_64", "cpu", "llvm", "host")
#: Names of the ARM target; ``"arm:<core>"`` or a core name picks the device.
ARM_ALIASES = ("arm", "aarch64", "arm64", "cortex-a72", "cortex-a76", "neoverse-n1", "neoverse-v1", "graviton2",
               "graviton3")
#: Names of the CUDA target; a dict ``{"kind": "cuda", "arch": "sm_90"}`` picks the arch.
CUDA_ALIASES = ("cuda", "gpu", "nvidia")


def resolve_target(target, *, build_only: bool = False) -> Target:
    """Turn a name (``"x86"``, ``"arm:neoverse-n1"``, ``"cuda"``) or a dict into a :class:`Target`.

    ``"cuda"`` (or ``{"kind": "cuda", "arch": "sm_90", "device": 0}``) gives a
    :class:`~sparsecc.targets.cuda.CudaTarget` (arch: the GPU's own, else sm_80).

    Raises
    ------
    TargetError
        Unknown name, ``build_only`` on a target without that mode, or ``"x86"`` on a host that is not x86-64.
    """
    if isinstance(target, Target):
        tgt = target
    elif isinstance(target, dict) and str(target.get("kind", "")).lower() == "cuda":
        extra = set(target) - {"kind", "arch", "device"}
        if extra:
            raise TargetError(f"CUDA target keys are 'kind', 'arch', 'device'; unknown: {sorted(extra)}")
        from sparsecc.targets.cuda import CudaTarget

        tgt = CudaTarget(target.get("arch"), int(target.get("device", 0)), build_only=build_only)
    elif not isinstance(target, str):
        raise TargetError(f"target must be a name such as 'x86', got {type(target).__name__}")
    elif target.lower() in CUDA_ALIASES:
        from sparsecc.targets.cuda import CudaTarget

        tgt = CudaTarget(build_only=build_only)
    elif target.lower() in ARM_ALIASES or target.lower().startswith(("arm:", "aarch64:")):
        from sparsecc.targets.arm import ArmTarget

        tgt = ArmTarget(target)
    elif target.lower() in X86_ALIASES:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise TargetError(f"target 'x86' needs an x86-64 host, this is {platform.machine()}")
        from sparsecc.targets.x86 import X86Target

        tgt = X86Target()
    else:
        raise TargetError(f"unknown target {target!r}; supported: 'x86', 'cuda', 'arm' or 'arm:<core>' "
                          f"({', '.join(ARM_ALIASES[3:])})")
    if build_only and not tgt.supports_build_only:
        raise TargetError(f"build_only=True is for target 'cuda' (no GPU needed); target {tgt.name!r} "
                          + ("builds and runs on this host" if tgt.can_time_kernels
                             else "is compiled as usual; call cm.export(path) for the deployable artifact"))
    return tgt
