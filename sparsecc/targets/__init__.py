"""Compile targets: the :class:`~sparsecc.targets.base.Target` contract and its x86, ARM and CUDA implementations.

Each target module holds its schedule rules, tile parameters and build: :mod:`.x86`
(+ :mod:`.x86_nm`, :mod:`.x86_conv`), :mod:`.arm` (+ :mod:`.toolchain`, :mod:`.qemu`),
:mod:`.cuda`.
"""

from sparsecc.targets.base import Target, apply_rules, resolve_target

__all__ = ["Target", "apply_rules", "resolve_target"]
