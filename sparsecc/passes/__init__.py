"""Analysis and rewrite passes, and the default pipeline.

The default pipeline, in order (see :func:`default_pipeline`):

1. ``magnitude_prune`` (rewrite, only when a sparsity is given)
2. ``detect_sparsity`` (analysis)
3. ``choose_format`` (analysis)
4. ``lower_sparse_linears`` (rewrite)
5. ``fold_batchnorm``, ``detect_conv_sparsity``, ``choose_conv_format``, ``lower_sparse_convs``
   (convolutions, :mod:`sparsecc.passes.conv`)
"""

from .base import Pass, PassContext, PassManager, PassResult
from .choose_format import ChooseFormat
from .conv import ChooseConvFormat, DetectConvSparsity, FoldBatchNorm, LowerSparseConvs
from .detect import DetectSparsity, detect_block_shape
from .lower import LowerSparseLinears
from .nm import NMPrune
from .prune import MagnitudePrune, magnitude_masks

__all__ = ["Pass", "PassContext", "PassManager", "PassResult", "ChooseFormat", "DetectSparsity",
           "detect_block_shape", "LowerSparseLinears", "MagnitudePrune", "magnitude_masks",
           "default_pipeline", "NMPrune", "FoldBatchNorm", "DetectConvSparsity", "ChooseConvFormat", "LowerSparseConvs"]


def default_pipeline(sparsity=None, pattern: str = "auto", block=(1, 1), measure: bool = True) -> list:
    """The passes ``sparsecc.compile`` runs, in order."""
    from .choose_format import NM_PATTERN_NAMES

    passes = []
    if pattern in NM_PATTERN_NAMES:  # N:M prunes every linear (or the layers named in a sparsity dict)
        passes.append(NMPrune(*NM_PATTERN_NAMES[pattern], layers=list(sparsity) if isinstance(sparsity, dict) else None))
    elif sparsity is not None:
        passes.append(MagnitudePrune(sparsity, block=block))
    passes += [DetectSparsity(), ChooseFormat(pattern, measure=measure), LowerSparseLinears()]
    # convolutions (passes/conv.py): BN folded after pruning (sparsecc.prune prunes unfolded weights)
    passes += [FoldBatchNorm(), DetectConvSparsity(), ChooseConvFormat(pattern, measure=measure), LowerSparseConvs()]
    return passes
