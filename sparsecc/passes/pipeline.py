"""The default pass pipeline of a target, composed from shared pieces by the target's capabilities.

As Relax's ``backend.get_default_pipeline(target)``: one function lists the passes
in order, reading top to bottom; what differs between targets comes from their
capability attributes (:class:`sparsecc.targets.base.Target`), not from flags.

1. ``nm_prune`` (``pattern`` an N:M name) or ``magnitude_prune`` (a ``sparsity`` given)
2. ``detect_sparsity``, ``choose_format``, ``lower_sparse_linears``
3. ``fold_batchnorm``, ``detect_conv_sparsity``, ``choose_conv_format``, ``lower_sparse_convs``
   (for targets with conv kernels the last two lower; for the others they annotate convs dense)

Formats are chosen by measurement only on targets that can time kernels on this host.
"""

from __future__ import annotations

from .choose_format import NM_PATTERN_NAMES, ChooseFormat
from .conv import ChooseConvFormat, DetectConvSparsity, FoldBatchNorm, LowerSparseConvs
from .detect import DetectSparsity
from .attention import ChooseAttention
from .lower import ChainSparseLinears, LowerSparseLinears
from .nm import NMPrune
from .prune import MagnitudePrune
from .routing import CalibrateGates, FindMLPBlocks, MoEfyBlocks, RouteActivations

__all__ = ["default_pipeline", "routing_pipeline"]


def default_pipeline(target, sparsity=None, pattern: str = "auto", block=(1, 1), measure: bool = True) -> list:
    """The passes ``sparsecc.compile`` runs for ``target``, in order."""
    measure = measure and target.can_time_kernels
    passes = []
    if pattern in NM_PATTERN_NAMES:  # N:M prunes every linear (or the layers named in a sparsity dict)
        passes.append(NMPrune(*NM_PATTERN_NAMES[pattern],
                              layers=list(sparsity) if isinstance(sparsity, dict) else None))
    elif sparsity is not None:
        passes.append(MagnitudePrune(sparsity, block=block))
    passes += [DetectSparsity(), ChooseFormat(pattern, measure=measure), LowerSparseLinears(), ChainSparseLinears()]
    # convolutions: BN folded after pruning (sparsecc.prune prunes unfolded weights)
    passes += [FoldBatchNorm(), DetectConvSparsity(), ChooseConvFormat(pattern, measure=measure)]
    if target.layer_formats.get("conv2d"):
        passes.append(LowerSparseConvs())
    if measure:  # the attention form is chosen by timing both on this host
        passes.append(ChooseAttention())
    return passes


def routing_pipeline(densities, calibration, measure: bool = True, gate: str = "down", moe=None,
                     bias_correction: bool = True) -> list:
    """The activation-routing passes, run after :func:`default_pipeline` (layers it lowered to sparse weight
    kernels are not routed): find the feed-forward blocks, then calibrate their gates and route them, or
    (``moe=(experts, top_k)``) MoE-fy them."""
    if moe is not None:
        return [FindMLPBlocks(), MoEfyBlocks(*moe, calibration)]
    return [FindMLPBlocks(gate), CalibrateGates(densities, calibration, bias_correction=bias_correction),
            RouteActivations(measure=measure)]
