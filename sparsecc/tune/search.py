"""Search strategy of the sparse kernel tuning: every design space once, within a deadline.

MetaSchedule: Shao et al., "Tensor Program Optimization with Probabilistic
Programs" (NeurIPS 2022).
"""

from __future__ import annotations

import time
from typing import Optional

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate, PySearchStrategy

__all__ = ["GridSearch"]


@derived_object
class GridSearch(PySearchStrategy):
    """Measures the design spaces of a ``ScheduleFn`` in order, each once (no repeats).

    The space is small (tens of points per task), so it is enumerated rather
    than sampled: MetaSchedule's replay strategies draw with replacement and
    its evolutionary search mutates decisions that here change loop structure.

    Parameters
    ----------
    deadline : float, optional
        ``time.monotonic()`` (s) after which no new candidates are handed out.
    args_info : list of ArgInfo, optional
        Arguments of the measured instance (the tuned function has symbolic shapes, so the
        static shapes of :func:`sparsecc.tune.space.specialized_func` come from outside);
        default: those of the task's ``main``.
    """

    def __init__(self, deadline: Optional[float] = None, args_info=None) -> None:
        super().__init__()
        self.deadline = deadline
        self.fixed_args_info = args_info
        self.spaces: list = []
        self.pos = 0
        self.per_iter = 1
        self.args_info = None

    def _initialize_with_tune_context(self, context) -> None:
        # the tuned function has symbolic shapes: the measured instance's shapes come from outside
        self.args_info = self.fixed_args_info or ArgInfo.from_prim_func(context.mod["main"])

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
        self.spaces = list(design_spaces)[:int(max_trials)]
        self.per_iter = max(1, int(num_trials_per_iter))
        self.pos = 0

    def post_tuning(self) -> None:
        self.spaces = []

    def generate_measure_candidates(self):
        if self.pos >= len(self.spaces) or (self.deadline is not None and time.monotonic() > self.deadline):
            return None
        batch = self.spaces[self.pos:self.pos + self.per_iter]
        self.pos += len(batch)
        return [MeasureCandidate(s, self.args_info) for s in batch]

    def notify_runner_results(self, measure_candidates, results) -> None:
        pass

    def clone(self):
        return GridSearch(self.deadline, self.fixed_args_info)
