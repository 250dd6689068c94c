"""Analysis and rewrite passes, their infrastructure and the default pipeline (:mod:`.pipeline`)."""

from .attention import ChooseAttention
from .base import DumpGraph, Pass, PassContext, PassInstrument, PassManager, PassResult, PassTiming, PrintAfter
from .choose_format import ChooseFormat
from .conv import ChooseConvFormat, DetectConvSparsity, FoldBatchNorm, LowerSparseConvs
from .detect import DetectSparsity, detect_block_shape
from .lower import ChainSparseLinears, LowerSparseLinears
from .nm import NMPrune
from .pipeline import default_pipeline
from .prune import MagnitudePrune, magnitude_masks

__all__ = ["ChainSparseLinears", "ChooseAttention", "ChooseConvFormat", "ChooseFormat", "DetectConvSparsity", "DetectSparsity",
           "DumpGraph", "FoldBatchNorm", "LowerSparseConvs", "LowerSparseLinears", "MagnitudePrune", "NMPrune", "Pass", "PassContext",
           "PassInstrument", "PassManager", "PassResult", "PassTiming", "PrintAfter", "default_pipeline",
           "detect_block_shape", "magnitude_masks"]
