"""The tuning loop: autotune sparse kernel workloads into a database (``sparsecc.tune`` for a whole model is
:func:`sparsecc.api.tune`, which finds its workloads and calls :func:`tune_workloads`).

How one workload (:class:`~sparsecc.tune.space.Workload`) is tuned (:func:`tune_one`; :func:`tune_workloads` for many):

1. One MetaSchedule task (``TuneContext``) per register tile ``m_tile``
   (:func:`~sparsecc.tune.space.m_tile_choices`), each with a ``ScheduleFn``
   space whose design spaces are the knob points of the x86 rules
   (:func:`~sparsecc.tune.space.space_fn`; the hand schedule first).
2. :class:`~sparsecc.tune.search.GridSearch` measures those points without
   repetition, in a seeded order, within the trial and time budgets; tasks
   share the trials round-robin. Builds and runs happen in this process
   (:mod:`sparsecc.tune.measure`), or, for a device behind a TVM RPC tracker, candidates are
   cross-built here and timed there (:class:`~sparsecc.tune.measure.RemoteBench`).
3. Every trial goes to ``work_dir``'s JSON database (``database_*.json``,
   :mod:`sparsecc.tune.database`).
4. The best :data:`FINALISTS` points of every task and the hand schedule are
   timed again, interleaved (:func:`~sparsecc.tune.measure.compare`); the
   fastest wins (by a margin of :data:`KEEP_HAND_MARGIN`). All measurements
   call the kernels as the runtime does
   (:class:`~sparsecc.tune.measure.Measurement`). If the hand schedule wins,
   the index says so and compile keeps it. A winning tuned record is copied to
   the ``best/`` database, then the index ``sparsecc_tuning.json`` is
   rewritten atomically: an interrupted run leaves the previous index intact
   and at most one unfinished line at the end of a database file, which
   :func:`~sparsecc.tune.database.open_json_database` drops.

``compile(..., tuning_db=work_dir)`` reads the result through
:class:`sparsecc.tune.lookup.TuningDatabase`.

MetaSchedule: Shao et al., "Tensor Program Optimization with Probabilistic
Programs" (NeurIPS 2022).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from sparsecc.errors import TuningError
from sparsecc.targets import x86
from sparsecc.tune import space
from sparsecc.tune.database import BEST_DIR, normalize_mod, open_json_database, read_index, target_key, write_index
from sparsecc.tune.measure import (InProcessBuilder, InProcessRunner, Measurement, RemoteBench, RemoteBuilder,
                                   RemoteRunner, compare, drop_artifacts, pool_wakeup_ms, runnable)
from sparsecc.tune.search import GridSearch
from sparsecc.tune.space import Workload

__all__ = ["WorkloadResult", "tune_one", "tune_workloads"]

#: A tuned schedule replaces the hand one only when at least this much faster in the final comparison.
KEEP_HAND_MARGIN = 0.03
#: Candidates per register tile (best by their tuning measurement) timed again against the hand schedule.
FINALISTS = 3


@contextlib.contextmanager
def _without_tensor_intrin():
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` (59 s here; tensorization intrinsics the
    sparse space never uses). Stand in an empty module while contexts are made, then remove it."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
            if getattr(tvm.s_tir, "tensor_intrin", None) is stub:
                delattr(tvm.s_tir, "tensor_intrin")


@dataclass
class WorkloadResult:
    """Outcome of tuning one workload (also the index entry, see :meth:`as_entry`).

    Attributes
    ----------
    workload : Workload
    trials : int
        Candidates measured (at most the trials asked for; fewer when the space is smaller).
    space_size : int
        Knob points over all register tiles.
    best_ms, hand_ms : float
        Final interleaved 10th percentiles of the chosen schedule and of the hand schedule (ms).
    choice : {"tuned", "hand"}
        What compile uses; "hand" when the hand schedule was at least as fast.
    params : dict
        Knob values of the chosen schedule.
    seconds : float
        Wall time spent on this workload.
    requested : int
        Trials asked for.
    complete : bool
        False when the time budget ran out before ``trials`` candidates were measured.
    skipped : bool
        Already in the database with enough trials (nothing measured now).
    extra : dict
        ``"candidates_ms"`` (knob values as JSON -> final ms of every finalist) and
        ``"pool_wakeup_ms"``; not stored in the index.
    """

    workload: Workload
    trials: int
    space_size: int
    best_ms: float
    hand_ms: float
    choice: str
    params: dict
    seconds: float
    requested: int = 0
    complete: bool = True
    skipped: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Chosen kernel time / hand schedule time (≤ 1)."""
        return min(self.best_ms, self.hand_ms) / self.hand_ms if self.hand_ms else 1.0

    def as_entry(self) -> dict:
        """The index entry (JSON-able dict) of this result; :meth:`from_entry` reads it back."""
        return {"workload": self.workload.as_dict(), "trials": self.trials, "requested": self.requested,
                "space_size": self.space_size, "complete": self.complete, "best_ms": self.best_ms,
                "hand_ms": self.hand_ms, "choice": self.choice, "params": self.params,
                "seconds": round(self.seconds, 2)}

    @classmethod
    def from_entry(cls, e: dict, skipped: bool = False) -> "WorkloadResult":
        """The result stored as index entry ``e`` (entries without newer keys: complete, as requested)."""
        return cls(Workload.from_dict(e["workload"]), int(e["trials"]), int(e["space_size"]),
                   float(e["best_ms"]), float(e["hand_ms"]), e["choice"], dict(e["params"]),
                   float(e.get("seconds", 0.0)), int(e.get("requested", e["trials"])),
                   bool(e.get("complete", True)), skipped)


def _params_dict(p) -> dict:
    return {"m_tile": p.m_tile, "m_outer": bool(p.m_outer), "row_group": p.row_group, "k_unroll": p.k_unroll,
            "parallel": bool(p.parallel)}


def _is_done(entry: Optional[dict], trials: int) -> bool:
    if not entry:
        return False
    if entry.get("complete", True) and (entry["trials"] >= trials or entry["trials"] >= entry["space_size"]):
        return True
    return False


def tune_one(wl: Workload, target, work_dir: Path, db, best_db, trials: int, deadline, seed: int,
             on_trial=None, per_iter: int = 8, session=None) -> WorkloadResult:
    """Tune ``wl`` (steps 1-4 of the module docstring); the winning tuned record goes to ``best_db``.

    Parameters
    ----------
    wl : Workload
    target : tvm.target.Target
    work_dir : Path
        MetaSchedule's ``work_dir`` (its logs).
    db, best_db : SparseJSONDatabase
        Every trial / the winning tuned record.
    trials : int
        Candidates to measure over all register tiles.
    deadline : float or None
        ``time.monotonic()`` (s) after which no new candidates are handed out.
    seed : int
        Order of the knob points and seed of the arguments.
    on_trial : callable(), optional
        Called once per measured candidate.
    per_iter : int
        Candidates per MetaSchedule iteration.
    session : sparsecc.tune.remote.RemoteSession, optional
        Build for ``target`` (a remote device's) and time there (:class:`~sparsecc.tune.measure.RemoteBench`)
        instead of in this process.

    Returns
    -------
    WorkloadResult
        Not yet in the index (:func:`tune_workloads` writes it).
    """
    t0 = time.monotonic()
    hand = space.hand_params(wl, target)
    m_tiles = space.m_tile_choices(wl, hand)
    sizes = {mt: len(space.grid(wl, mt, seed, hand)) for mt in m_tiles}
    cap = max(1, math.ceil(trials / len(m_tiles)))
    funcs = {mt: space.workload_func(wl, mt) for mt in m_tiles}
    hand_sch = tvm.s_tir.Schedule(funcs[hand.m_tile], enable_check=False)  # the runtime's hand kernel
    space.apply_params(hand_sch, wl.block, wl.regime, hand)
    if session is None:
        def build(mod):
            return runnable(x86.build(mod, target))["main"]

        fns = {hand: build(hand_sch.mod)}
        meas = Measurement(wl, seed)
        meas.calibrate(fns[hand])
        builder, runner = InProcessBuilder(), InProcessRunner(meas, on_result=on_trial)
    else:
        bench = RemoteBench(wl, target, session, seed)
        build = bench.build
        fns = {hand: build(hand_sch.mod)}
        builder, runner = RemoteBuilder(bench), RemoteRunner(bench, on_result=on_trial)
    with _without_tensor_intrin():
        tasks = [ms.TuneContext(
            mod=normalize_mod(funcs[mt]), target=target,
            space_generator=ms.space_generator.ScheduleFn(space.space_fn(wl, mt, seed, hand), sch_rules=[],
                                                         postprocs=[], mutator_probs={}),
            search_strategy=GridSearch(deadline, ArgInfo.from_prim_func(space.specialized_func(wl, mt))),
            task_name=f"{wl.key()}|mt{mt}", rand_state=seed,
            num_threads=1, logger=None) for mt in m_tiles]
    ms.tune_tasks(tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=str(work_dir),
                  max_trials_global=int(trials), max_trials_per_task=cap, num_trials_per_iter=per_iter,
                  builder=builder, runner=runner,
                  database=db, cost_model=ms.cost_model.RandomModel(seed=seed),
                  measure_callbacks=[ms.measure_callback.AddToDatabase()], task_scheduler="round-robin")
    drop_artifacts()
    measured = sum(min(cap, sizes[mt]) for mt in m_tiles)

    # final pick: the best three of every task and the hand schedule, timed again together
    cands: dict = {}
    n_measured = 0
    for mt in m_tiles:
        wkl = db.commit_workload(normalize_mod(funcs[mt]))
        top = [r for r in db.get_top_k(wkl, 64) if r.run_secs]
        n_measured += len(top)
        for r in top[:FINALISTS]:
            p = space.params_from_trace(r.trace, mt)
            if p != hand and p not in cands:
                cands[p] = r
    for p, r in cands.items():
        s = tvm.s_tir.Schedule(funcs[p.m_tile], enable_check=False)
        r.trace.apply_to_schedule(s, remove_postproc=True)
        fns[p] = build(s.mod)
    if session is None:
        timed = {p: float(v) for p, v in compare(fns, meas, rounds=21).items()}
        wake = pool_wakeup_ms(target)
    else:
        timed = {p: float(v) for p, v in bench.compare(fns).items()}
        bench.close()
        wake = None  # no wake-up figure of the device: serial and parallel candidates compete as timed
    # a serial kernel beats the pool for sure only when it takes less than twice the wake-up: with the
    # second core free, the parallel kernel takes about t_serial / 2 + wake-up (a serial win on a big
    # kernel means the other core was busy while tuning, and reverses when it is free: FFN-up at M=128
    # ran serially in 0.94x of the hand time during tuning and in 1.48x of it minutes later)
    tuned = [p for p in timed
             if p != hand and (wake is None or p.parallel or not hand.parallel or timed[p] < 2.0 * wake)]
    best = min(tuned, key=timed.get) if tuned else hand
    if timed[best] > timed[hand] * (1.0 - KEEP_HAND_MARGIN):  # not clearly faster than the hand one: keep it
        best = hand
    choice = "tuned" if best != hand else "hand"
    if choice == "tuned":
        r = cands[best]
        wkl = best_db.commit_workload(normalize_mod(funcs[best.m_tile]))
        best_db.commit_tuning_record(ms.database.TuningRecord(
            r.trace, wkl, [timed[best] / 1e3], target,
            ArgInfo.from_prim_func(space.specialized_func(wl, best.m_tile))))
    complete = n_measured >= min(measured, int(trials))
    return WorkloadResult(wl, n_measured, sum(sizes.values()),
                          timed[best], timed[hand], choice, _params_dict(best), time.monotonic() - t0,
                          requested=int(trials), complete=bool(complete),
                          extra={"candidates_ms": {json.dumps(_params_dict(p)): round(v, 5)
                                                   for p, v in timed.items()}, "pool_wakeup_ms": wake})


def tune_workloads(workloads, work_dir, *, target=None, trials: int = 64, time_budget_s: Optional[float] = None,
                   progress: bool = True, seed: int = 0, rpc=None) -> list:
    """Tune each distinct workload not yet tuned to ``trials`` in ``work_dir``; return every result.

    Parameters
    ----------
    workloads : iterable of Workload
        Duplicates are tuned once.
    work_dir : path
        Database folder (created). Reused across runs and models.
    target : tvm.target.Target, optional
        Default: the host (:func:`sparsecc.targets.x86.host_target`).
    trials : int
        Candidates measured per workload (all register tiles together).
    time_budget_s : float, optional
        Stop handing out candidates after this many seconds; unfinished workloads are
        marked incomplete and resumed by the next call.
    progress : bool
        tqdm bar over the trials.
    seed : int
        Order in which each task's knob points are tried.
    rpc : sparsecc.tune.remote.RPCDevice, optional
        Time on this remote device (one session for the whole run); ``target`` is then its target.

    Returns
    -------
    list of WorkloadResult, in input order (``skipped=True`` for those already tuned)

    Raises
    ------
    TuningError
        ``trials < 1`` or an unreadable database.
    RPCError
        ``rpc`` cannot be reached.
    """
    if int(trials) < 1:
        raise TuningError(f"trials must be ≥ 1, got {trials}")
    target = target or x86.host_target()
    tkey = target_key(target)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    unique = list(dict.fromkeys(workloads))
    index = read_index(work_dir)
    entries = index["entries"].setdefault(tkey, {})
    todo = [wl for wl in unique if not _is_done(entries.get(wl.key()), trials)]
    results: dict = {wl.key(): WorkloadResult.from_entry(entries[wl.key()], skipped=True)
                     for wl in unique if wl not in todo}
    if todo:
        db = open_json_database(work_dir)
        best_db = open_json_database(work_dir / BEST_DIR)
        deadline = None if time_budget_s is None else time.monotonic() + float(time_budget_s)
        total = 0
        for wl in todo:
            hand = space.hand_params(wl, target)
            total += min(trials, sum(len(space.grid(wl, mt, hand=hand)) for mt in space.m_tile_choices(wl, hand)))
        session = rpc.session() if rpc is not None else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="tuning", unit="trial", leave=True)
        try:
            for wl in todo:
                if deadline is not None and time.monotonic() > deadline:
                    break
                if bar is not None:
                    bar.set_postfix_str(wl.key())
                res = tune_one(wl, target, work_dir, db, best_db, int(trials), deadline, seed,
                               on_trial=(lambda: bar.update(1)) if bar is not None else None, session=session)
                index = read_index(work_dir)  # another process may have added entries meanwhile
                index["entries"].setdefault(tkey, {})[wl.key()] = res.as_entry()
                write_index(work_dir, index)
                results[wl.key()] = res
        finally:
            if bar is not None:
                bar.close()
            if session is not None:
                session.close()
    return [results[wl.key()] for wl in unique if wl.key() in results]
