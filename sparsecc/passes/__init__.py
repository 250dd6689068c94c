"""Analysis and rewrite passes, and the default pipeline.

The default pipeline, in order (see :func:`default_pipeline`):

1. ``magnitude_prune`` (rewrite, only when a sparsity is given)
2. ``detect_sparsity`` (analysis)
3. ``choose_format`` (analysis)
4. ``lower_sparse_linears`` (rewrite)
"""

from .base import Pass, PassContext, PassManager, PassResult
from .choose_format import ChooseFormat
from .detect import DetectSparsity, detect_block_shape
from .lower import LowerSparseLinears
from .prune import MagnitudePrune, magnitude_masks

__all__ = ["Pass", "PassContext", "PassManager", "PassResult", "ChooseFormat", "DetectSparsity",
           "detect_block_shape", "LowerSparseLinears", "MagnitudePrune", "magnitude_masks",
           "default_pipeline"]


def default_pipeline(sparsity=None, pattern: str = "auto", block=(1, 1), measure: bool = True) -> list:
    """The passes ``sparsecc.compile`` runs, in order."""
    passes = []
    if sparsity is not None:
        passes.append(MagnitudePrune(sparsity, block=block))
    passes += [DetectSparsity(), ChooseFormat(pattern, measure=measure), LowerSparseLinears()]
    return passes
