"""Cost model and calibration, and MetaSchedule autotuning of the sparse kernels, one module per job.

* :mod:`.cost_model` (roofline in M from the format registry, per-target cost model), :mod:`.calibrate`
* :mod:`.space` (workloads and knobs), :mod:`.search` (grid search strategy), :mod:`.measure`
  (in-process builder, runner, timing), :mod:`.database` (the JSON tuning folder),
  :mod:`.tuner` (the tuning loop), :mod:`.lookup` (what ``compile(tuning_db=...)`` reads),
  :mod:`.remote` (timing on a device behind a TVM RPC tracker)

``sparsecc.tune(model, example_inputs, work_dir=...)`` (:func:`sparsecc.api.tune`) tunes a model's
sparse kernels into a database; this package is callable for that (the public API registers the
entry point), so ``sparsecc.tune.cost_model`` etc. stay importable.
"""

import sys as _sys
import types as _types

from .cost_model import M, CostModel, KernelCalibration, cost_model_for

__all__ = ["M", "CostModel", "KernelCalibration", "cost_model_for"]


class _CallablePackage(_types.ModuleType):
    """Lets ``sparsecc.tune(...)`` call the registered entry point while ``sparsecc.tune`` stays the package."""

    entry = None  # set by sparsecc/__init__.py to sparsecc.api.tune

    def __call__(self, *args, **kwargs):
        return type(self).entry(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
