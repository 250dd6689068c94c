"""Compile-time use of a tuning database: ``compile(..., tuning_db=work_dir)``.

Layers are looked up by workload key (not by model or layer name) through
:class:`TuningDatabase`; the best trace of a workload is replayed onto the
symbolic template (:func:`~sparsecc.tune.space.schedule_from_trace`) and
built with :func:`sparsecc.runtime.kernels.load_or_build`, so the tuned
kernel serves every ``M`` and ``nnzb``. :class:`TunedKernels` picks, per call,
the kernel tuned at the nearest ``M`` of the regime.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from sparsecc.errors import TuningError
from sparsecc.targets import x86
from sparsecc.tune import space
from sparsecc.tune.database import BEST_DIR, INDEX_NAME, normalize_mod, open_json_database, read_index, target_key
from sparsecc.tune.space import Workload

__all__ = ["TunedKernels", "TuningDatabase"]


class TuningDatabase:
    """Read side of a tuning ``work_dir``: which workloads have a tuned schedule, and their kernels.

    Parameters
    ----------
    work_dir : path
        A folder written by :func:`sparsecc.tune.tuner.tune_workloads` / :func:`sparsecc.tune`.

    Raises
    ------
    TuningError
        The folder or its index does not exist or cannot be read.
    """

    def __init__(self, work_dir):
        self.work_dir = Path(work_dir)
        if not (self.work_dir / INDEX_NAME).exists():
            raise TuningError(f"no tuning database in {self.work_dir} (missing {INDEX_NAME}); "
                              "run sparsecc.tune(model, example_inputs, work_dir=...) first")
        self.index = read_index(self.work_dir)
        self._best_db = None
        self._kernels: dict = {}

    @property
    def best_db(self):
        """The ``best/`` :class:`~sparsecc.tune.database.SparseJSONDatabase`, loaded on first use."""
        if self._best_db is None:
            self._best_db = open_json_database(self.work_dir / BEST_DIR)
        return self._best_db

    def entries(self, target) -> dict:
        """Index entries of ``target``: workload key -> entry (empty when none)."""
        return self.index["entries"].get(target_key(target), {})

    def record(self, wl: Workload, m_tile: int, target):
        """The best ``TuningRecord`` of ``wl`` at register tile ``m_tile``, or None."""
        mod = normalize_mod(space.workload_func(wl, m_tile))
        if not self.best_db.has_workload(mod):
            return None
        top = self.best_db.get_top_k(self.best_db.commit_workload(mod), 1)
        return top[0] if top else None

    def for_layer(self, block, n: int, k: int, nnzb: int, bias: bool, activation, target) -> "Optional[TunedKernels]":
        """Tuned entries of a layer, at any M (None when there are none).

        Parameters
        ----------
        block : (int, int)
            Block shape ``(br, bc)`` of the layer's format.
        n, k : int
            Weight ``W: (N, K)``.
        nnzb : int
            Stored blocks.
        bias : bool
        activation : str or None
        target : tvm.target.Target

        Returns
        -------
        TunedKernels or None
        """
        found = {}
        ents = self.entries(target)
        for regime_m in sorted({int(e["workload"]["m"]) for e in ents.values()}):
            wl = Workload.for_layer(block, n, k, nnzb, regime_m, bias, activation)
            e = ents.get(wl.key())
            if e is not None:
                found[wl.m] = (wl, e)
        return TunedKernels(self, found, target) if found else None

    def schedule(self, wl: Workload, entry: dict, target):
        """``(schedule, m_tile)``: the tuned trace of ``wl`` replayed onto the symbolic template (any M, any
        nnzb), or None where tuning kept the hand schedule."""
        if entry.get("choice") != "tuned":
            return None
        mt = int(entry["params"]["m_tile"])
        rec = self.record(wl, mt, target)
        if rec is None:
            return None
        return space.schedule_from_trace(rec.trace, wl.block, bias=wl.bias, activation=wl.activation,
                                         m_tile=mt, k=wl.k), mt

    def kernel(self, wl: Workload, entry: dict, target):
        """``(fn, m_tile)`` of the tuned kernel of ``wl`` built for ``target``, or None to use the hand one."""
        key = (wl, target_key(target))
        if key not in self._kernels:
            from sparsecc.formats import block_candidate
            from sparsecc.runtime.kernels import load_or_build

            tuned = self.schedule(wl, entry, target)
            if tuned is None:
                self._kernels[key] = None
            else:
                sch, mt = tuned
                name = block_candidate(wl.block).kernel_name("linear", wl.regime, wl.bias, wl.activation) + "_tuned"
                self._kernels[key] = (load_or_build(sch, name, target), mt)
        return self._kernels[key]


class TunedKernels:
    """The tuned kernels of one layer, chosen per call by rows ``M`` (nearest tuned M of the regime).

    ``kernel(regime, m)`` returns ``(fn, m_tile)`` or None (use the hand schedule).

    Parameters
    ----------
    db : TuningDatabase
    found : dict
        M bucket -> ``(Workload, index entry)`` of the layer.
    target : tvm.target.Target
    """

    def __init__(self, db: TuningDatabase, found: dict, target):
        self.db = db
        self.found = found  # m bucket -> (Workload, entry)
        self.target = target
        self._by_m: dict = {}

    @property
    def tuned_ms(self) -> list:
        """M buckets whose tuned schedule won (sorted)."""
        return sorted(m for m, (_, e) in self.found.items() if e.get("choice") == "tuned")

    @property
    def tag(self) -> str:
        """``"tuned(M=1,128)"`` / ``"hand-kept(M=16)"``: shown in the kernel column of the report."""
        tuned = self.tuned_ms
        kept = sorted(m for m in self.found if m not in tuned)
        parts = []
        if tuned:
            parts.append("tuned(M=" + ",".join(map(str, tuned)) + ")")
        if kept:
            parts.append("hand-kept(M=" + ",".join(map(str, kept)) + ")")
        return "+".join(parts)

    def kernel(self, regime: str, m: int):
        """``(fn, m_tile)`` for a call with ``m`` rows in ``regime`` (``"gemv"``/``"gemm"``), or None.

        The entry tuned at the M bucket nearest to ``m`` in log2 among those of ``regime``
        (ties: the smaller M); None when there is none or it kept the hand schedule.
        """
        key = (regime, space.m_bucket(m))
        if key not in self._by_m:
            found = self.nearest(regime, m)
            self._by_m[key] = self.db.kernel(*found, self.target) if found is not None else None
        return self._by_m[key]

    def nearest(self, regime: str, m: int):
        """``(Workload, index entry)`` tuned at the M bucket of ``regime`` nearest to ``m`` in log2 (ties: the
        smaller M), or None."""
        ms_ = [mb for mb in self.found if x86.regime_for(mb) == regime]
        if not ms_:
            return None
        return self.found[min(ms_, key=lambda v: (abs(math.log2(v) - math.log2(max(m, 1))), v))]

    def schedule(self, regime: str, m: int):
        """``(schedule, m_tile)`` of the tuned entry :meth:`kernel` would use, unbuilt (an export builds it
        into its own library), or None."""
        found = self.nearest(regime, m)
        return self.db.schedule(*found, self.target) if found is not None else None
