"""Kernel modules for a target, looked up in the format registry, and the compiled result a target returns.

The passes and the calibration never name a module class: they ask for the module of a
storage object (or of a conv weight in a candidate format) on a target, and the factory
registered for that format, target kind and layer kind builds it (registered by
:mod:`sparsecc.runtime.kernels`, :mod:`sparsecc.runtime.nm`, :mod:`sparsecc.runtime.conv`,
:mod:`sparsecc.runtime.cuda_kernels`).
"""

from __future__ import annotations

from typing import Optional

import torch

from sparsecc.formats import Candidate, format_of

__all__ = ["cpu_factory", "finish", "make_conv", "make_linear"]


def cpu_factory(module_class, family: str, name: str):
    """A module factory for CPU targets: ``module_class(matrix, bias, activation, target=<host tvm target>,
    params={regime: target.kernel_params(family, regime)})``, so the module is packed with the target's tiles
    (ARM: NEON tiles, host kernels in ``cm()``) and the exported kernel reads the same arrays."""
    def factory(matrix, bias=None, activation=None, target=None, tuning_db=None):
        return module_class(matrix, bias, activation=activation, target=target.tvm_target(),
                            params={r: target.kernel_params(family, r) for r in ("gemv", "gemm")})

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = module_class.__module__
    return factory


def make_linear(target, matrix, bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                tuning_db=None) -> torch.nn.Module:
    """Kernel module computing ``act(X · Wᵀ + b)`` for ``matrix`` (W: (N, K) in any registered format) on ``target``.

    Raises
    ------
    UnsupportedOpError
        No module of the matrix's format for the target's kind.
    """
    factory = format_of(matrix).module_factory(target.kind, "linear")
    return factory(matrix, bias, activation, target, tuning_db=tuning_db)


def make_conv(target, cand: Candidate, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
              activation: Optional[str] = None, **kw) -> torch.nn.Module:
    """Kernel module computing ``act(conv2d(x, W, b) [+ r])`` with W: (C_out, C_in, kh, kw) stored as ``cand``.

    ``kw``: ``stride``, ``padding``, ``residual``, ``layout``, ``name`` of the conv.

    Raises
    ------
    UnsupportedOpError
        No conv module of that format for the target's kind.
    """
    factory = cand.entry.module_factory(target.kind, "conv2d")
    return factory(weight, bias, activation, target, block=cand.params, **kw)


def finish(cm, target):
    """What :func:`sparsecc.compile` returns for ``target``: a build artifact for build-only targets, else
    ``cm`` with its tensors on the target's device."""
    if target.build_only:
        from sparsecc.runtime.cuda_kernels import CudaBuildArtifact

        return CudaBuildArtifact(cm.graph, target, cm.compile_seconds)
    if target.torch_device != "cpu":
        cm.graph.gm.to(target.torch_device)
    return cm
