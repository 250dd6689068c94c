"""Cost models and calibration, and MetaSchedule autotuning of the sparse kernels.

``sparsecc.tune(model, example_inputs, work_dir=...)`` tunes a model's sparse
kernels into a database (:func:`sparsecc.tune.tuner.tune`); this package is
callable for that, so ``sparsecc.tune.cost_model`` etc. stay importable.
TVM is imported only when tuning starts.
"""

import sys as _sys
import types as _types

from .cost_model import M, CostModel, KernelCalibration, bytes_expr, candidate_key, flops_expr

__all__ = ["M", "CostModel", "KernelCalibration", "bytes_expr", "candidate_key", "flops_expr", "tune"]


def tune(*args, **kwargs):
    """See :func:`sparsecc.tune.tuner.tune`."""
    from .tuner import tune as _tune

    return _tune(*args, **kwargs)


class _CallablePackage(_types.ModuleType):
    """Lets ``sparsecc.tune(...)`` call :func:`tune` while ``sparsecc.tune`` stays the package."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
