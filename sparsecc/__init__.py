"""sparsecc: a compiler for sparse neural networks.

>>> cm = sparsecc.compile(model, example_inputs, target="x86", sparsity=0.9, pattern="block")
>>> y = cm(x)
>>> print(cm.report())
"""

from .api import compile, prune
from .sparsify import SparsifyResult, sparsify
from .sparsify.structured import StructuredResult, prune_channels
from .sparsify.structured import model_channel_groups as channel_groups
from .errors import (AccuracyBudgetError, ArtifactError, CacheWarning, CaptureError, DataError, DatasetError,
                     InputDtypeError, InputShapeError, InvalidArgumentError, InvalidSparsityError, KernelBuildError,
                     PassError, PatternWarning, SparseccError, SparseccWarning, StructureError, TargetError,
                     TrainingError, TrainModeWarning, UnknownLayerError, UnsupportedOpError)
from .runtime.compiled import CompiledModule


def load(path):
    """Load a host artifact folder written by ``cm.export(path)`` (see :func:`sparsecc.runtime.export.load`)."""
    from .runtime.export import load as _load

    return _load(path)

from . import tune  # callable: sparsecc.tune(model, example_inputs, work_dir=...)
from .api import tune as _tune_model

type(tune).entry = staticmethod(_tune_model)

__version__ = "0.1.0"

__all__ = ["compile", "prune", "load", "tune", "sparsify", "SparsifyResult", "prune_channels", "channel_groups",
           "StructuredResult", "CompiledModule", "SparseccError", "StructureError",
           "AccuracyBudgetError", "ArtifactError", "CaptureError", "DataError", "DatasetError", "InputDtypeError",
           "InputShapeError", "InvalidArgumentError", "InvalidSparsityError", "KernelBuildError", "PassError",
           "TargetError", "TrainingError", "UnknownLayerError", "UnsupportedOpError", "SparseccWarning",
           "CacheWarning", "PatternWarning", "TrainModeWarning", "__version__"]
