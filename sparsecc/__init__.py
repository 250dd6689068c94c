"""sparsecc: a compiler for sparse neural networks.

>>> cm = sparsecc.compile(model, example_inputs, target="x86", sparsity=0.9, pattern="block")
>>> y = cm(x)
>>> print(cm.report())

Names are imported on first use (PEP 562), so ``import sparsecc`` alone pulls neither torch nor TVM, and
``sparsecc.load`` (:func:`sparsecc.runtime.deploy.load`) runs an exported artifact with TVM and numpy only.
"""

import importlib as _importlib
import sys as _sys
import types as _types

from .errors import (AccuracyBudgetError, ArtifactError, CacheWarning, CalibrationWarning, CaptureError, DataError, DatasetError,
                     FallbackWarning, MlirError, NotPicklableError,
                     InputDtypeError, InputShapeError, InvalidArgumentError, InvalidSparsityError, KernelBuildError,
                     PassError, PatternWarning, SparseccError, SparseccWarning, StructureError, TargetError,
                     TrainingError, TrainModeWarning, UnknownLayerError, UnsupportedOpError)

__version__ = "0.1.0"

__all__ = ["compile", "prune", "load", "tune", "sparsify", "SparsifyResult", "prune_channels", "channel_groups",
           "StructuredResult", "CompiledModule", "SparseccError", "StructureError",
           "AccuracyBudgetError", "ArtifactError", "CaptureError", "DataError", "DatasetError", "InputDtypeError",
           "InputShapeError", "InvalidArgumentError", "InvalidSparsityError", "KernelBuildError", "PassError",
           "TargetError", "TrainingError", "UnknownLayerError", "UnsupportedOpError", "SparseccWarning",
           "CacheWarning", "CalibrationWarning", "PatternWarning", "TrainModeWarning", "FallbackWarning", "MlirError", "NotPicklableError",
           "__version__"]

#: public name -> (module, attribute) imported on first access
_LAZY = {
    "compile": (".api", "compile"),
    "prune": (".api", "prune"),
    "sparsify": (".sparsify", "sparsify"),
    "SparsifyResult": (".sparsify", "SparsifyResult"),
    "prune_channels": (".sparsify.structured", "prune_channels"),
    "StructuredResult": (".sparsify.structured", "StructuredResult"),
    "channel_groups": (".sparsify.structured", "model_channel_groups"),
    "CompiledModule": (".runtime.compiled", "CompiledModule"),
}


def load(path, threads=None):
    """Load a host artifact folder written by ``cm.export(path)`` (see :func:`sparsecc.runtime.deploy.load`).

    Torch-free: needs the TVM runtime and numpy only. ``threads``: CPU threads (default: every CPU this process
    may use, unless ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` is set).
    """
    from .runtime.deploy import load as _load

    return _load(path, threads=threads)


def _tune_entry(*args, **kwargs):
    """``sparsecc.tune(model, example_inputs, work_dir=...)``: :func:`sparsecc.api.tune`."""
    from .api import tune as _tune_model

    return _tune_model(*args, **kwargs)


class _Package(_types.ModuleType):
    """Keeps ``sparsecc.sparsify`` the function when its subpackage is imported, and registers the
    ``sparsecc.tune(...)`` entry point whenever the ``sparsecc.tune`` package is bound here
    (by ``import sparsecc.tune``, by another module's import of it, or by :func:`__getattr__`)."""

    def __setattr__(self, name, value):
        if name == "sparsify" and isinstance(value, _types.ModuleType) and hasattr(value, "sparsify"):
            value = value.sparsify  # the import of the subpackage binds it here: keep the function
        super().__setattr__(name, value)
        if name == "tune" and isinstance(value, _types.ModuleType) and hasattr(type(value), "entry") \
                and type(value).entry is None:
            type(value).entry = staticmethod(_tune_entry)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(_importlib.import_module(mod, __name__), attr)
        globals()[name] = value
        return value
    if name == "tune":
        return _importlib.import_module(".tune", __name__)  # bound (and made callable) by _Package.__setattr__
    if not name.startswith("_"):  # subpackages: sparsecc.zoo, sparsecc.runtime, ...
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
