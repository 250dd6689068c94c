"""MetaSchedule autotuning of the sparse linear kernels, with a persistent JSON database.

How one workload (:class:`~sparsecc.tune.space.Workload`) is tuned:

1. One MetaSchedule task (``TuneContext``) per register tile ``m_tile``
   (:func:`~sparsecc.tune.space.m_tile_choices`), each with a ``ScheduleFn``
   space whose design spaces are the knob points of the x86 rules
   (:func:`~sparsecc.tune.space.space_fn`; the hand schedule first).
2. :class:`GridSearch` measures those points without repetition, in a seeded
   order, within the trial and time budgets; tasks share the trials
   round-robin. Builds and runs happen in this process
   (:class:`InProcessBuilder`, :class:`InProcessRunner`): each TVM worker
   process would spend seconds importing TVM on a 2-core machine, and the
   runner must see a valid sparse structure (:func:`~sparsecc.tune.space.make_args`).
3. Every trial goes to ``work_dir``'s ``JSONDatabase`` (``database_*.json``).
4. The best three points of every task and the hand schedule are timed again,
   interleaved (:func:`compare`); the fastest wins (by a margin of
   :data:`KEEP_HAND_MARGIN`). All measurements call the kernels as the runtime
   does (:class:`Measurement`). If the hand schedule wins,
   the index says so and compile keeps it. A winning tuned record is copied to
   the ``best/`` JSONDatabase, then the index ``sparsecc_tuning.json`` is
   rewritten atomically: an interrupted run leaves the previous index intact
   and at most one unfinished line at the end of a database file, which
   :func:`open_json_database` drops.

``compile(..., tuning_db=work_dir)`` looks layers up by workload key (not by
model or layer name) through :class:`TuningDatabase`, replays the best trace
onto the symbolic template and builds it with
:func:`sparsecc.runtime.kernels.load_or_build`.

MetaSchedule: Shao et al., "Tensor Program Optimization with Probabilistic
Programs" (NeurIPS 2022).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.database import PyDatabase
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult
from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate, PySearchStrategy

from sparsecc.errors import KernelBuildError, TuningError
from sparsecc.fileio import atomic_path
from sparsecc.targets import x86
from sparsecc.tune import space
from sparsecc.tune.space import Workload

__all__ = [
    "GridSearch",
    "InProcessBuilder",
    "InProcessRunner",
    "SparseJSONDatabase",
    "TunedKernels",
    "TuningDatabase",
    "WorkloadResult",
    "compare",
    "open_json_database",
    "tune_workloads",
]

INDEX_NAME = "sparsecc_tuning.json"
BEST_DIR = "best"
_INDEX_VERSION = 1
#: A tuned schedule replaces the hand one only when at least this much faster in the final comparison.
KEEP_HAND_MARGIN = 0.03
#: Candidates per register tile (best by their tuning measurement) timed again against the hand schedule.
FINALISTS = 3
_ARTIFACTS: dict = {}
_TOKENS = itertools.count()


def _target_key(target) -> str:
    return str(target)


# -- MetaSchedule plumbing ------------------------------------------------------------

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


def _runnable(lib):
    """The runtime module of a ``tvm.compile`` result (an ``Executable`` in TVM 0.27)."""
    return lib.jit() if hasattr(lib, "jit") else lib


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds candidates in this process with :func:`sparsecc.targets.x86.build`; the artifact is a
    token for :class:`InProcessRunner` (no shared library written)."""

    def build(self, build_inputs):
        results = []
        for bi in build_inputs:
            try:
                lib = x86.build(bi.mod, bi.target)
            except KernelBuildError as e:
                results.append(BuilderResult(None, str(e)))
                continue
            token = f"sparsecc-inprocess://{next(_TOKENS)}"
            _ARTIFACTS[token] = _runnable(lib)
            results.append(BuilderResult(token, None))
        return results


@derived_object
class _DoneFuture(PyRunnerFuture):
    def __init__(self, result) -> None:
        super().__init__()
        self._result = result

    def done(self) -> bool:
        return True

    def result(self):
        return self._result


@derived_object
class InProcessRunner(PyRunner):
    """Times each built candidate as the runtime calls it (see :class:`Measurement`).

    Parameters
    ----------
    meas : Measurement
        Arguments of a valid sparse instance of the workload and the burst length.
    repeat : int
        Bursts per candidate; the fastest is reported (on a shared machine noise only adds time).
    on_result : callable(), optional
        Called once per measured candidate (progress bars).
    """

    def __init__(self, meas, repeat: int = 5, on_result=None) -> None:
        super().__init__()
        self.meas = meas
        self.repeat = int(repeat)
        self.on_result = on_result

    def run(self, runner_inputs):
        out = []
        for ri in runner_inputs:
            lib = _ARTIFACTS.pop(str(ri.artifact_path), None)
            if lib is None:
                res = RunnerResult(None, f"no built artifact {ri.artifact_path}")
            else:
                try:
                    fn = lib["main"]
                    self.meas.burst_ms(fn)  # warm-up
                    res = RunnerResult([min(self.meas.burst_ms(fn) for _ in range(self.repeat)) / 1e3], None)
                except Exception as e:  # noqa: BLE001 - a failing candidate is a failed trial
                    res = RunnerResult(None, f"run failed: {e}")
            if self.on_result is not None:
                self.on_result()
            out.append(_DoneFuture(res))
        return out


@derived_object
class GridSearch(PySearchStrategy):
    """Measures the design spaces of a ``ScheduleFn`` in order, each once (no repeats).

    The space is small (tens of points per task), so it is enumerated rather
    than sampled: MetaSchedule's replay strategies draw with replacement and
    its evolutionary search mutates decisions that here change loop structure.

    Parameters
    ----------
    deadline : float, optional
        ``time.monotonic()`` after which no new candidates are handed out.
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


# -- databases ------------------------------------------------------------------------

def _drop_partial_last_line(path: Path) -> None:
    """Remove a last line that is not valid JSON (a write cut short); earlier lines are kept."""
    if not path.exists():
        return
    raw = path.read_bytes()
    if not raw:
        return
    lines = raw.split(b"\n")
    tail = [i for i, ln in enumerate(lines) if ln.strip()]
    if not tail:
        return
    last = tail[-1]
    try:
        json.loads(lines[last])
        if raw.endswith(b"\n"):
            return
        keep = raw + b"\n"
    except ValueError:
        keep = b"\n".join(lines[:last]) + (b"\n" if last else b"")
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_bytes(keep)


def _append_line(path: Path, obj) -> None:
    """Append one JSON line and flush it to disk (a crash can cut only this line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _record_from_json(obj, workload):
    """A ``TuningRecord`` from its JSON (``[trace, run_secs, target, args_info]``), trace replayed unchecked."""
    from tvm.s_tir.schedule import Trace

    trace_json, run_secs, target_json, args_json = obj
    sch = tvm.s_tir.Schedule(workload.mod, enable_check=False)
    Trace.apply_json_to_schedule(trace_json, sch)
    return ms.database.TuningRecord(
        sch.trace, workload, [float(v) for v in run_secs] if run_secs is not None else None,
        tvm.target.Target(target_json) if target_json is not None else None,
        [ArgInfo.from_json(a) for a in args_json] if args_json is not None else None)


@derived_object
class SparseJSONDatabase(PyDatabase):
    """MetaSchedule database stored as TVM's ``JSONDatabase`` files, loadable for sparse templates.

    ``folder/database_workload.json`` and ``folder/database_tuning_record.json``
    hold one JSON line per workload / record, in the format of
    ``tvm.s_tir.meta_schedule.database.JSONDatabase`` (written with TVM's own
    ``Workload.as_json`` / ``TuningRecord.as_json``), appended and fsynced as
    MetaSchedule commits them. TVM's own loader cannot read these records back:
    it replays every trace with schedule checks on, and the vectorize check
    refuses the sparse templates' reduction block (its accumulator is zeroed
    by a separate "init" block; the x86 rules schedule with checks off). This
    class replays them with checks off, and drops a last line cut short by a
    crash. Lookups go to an in-memory ``MemoryDatabase``.

    Parameters
    ----------
    folder : path
        Created if missing.

    Raises
    ------
    TuningError
        A line other than the last is not valid, or a record names a missing workload.
    """

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path_workload = self.folder / "database_workload.json"
        self.path_record = self.folder / "database_tuning_record.json"
        self._mem = ms.database.MemoryDatabase(module_equality="structural")
        self._index: dict = {}  # structural hash -> [(line, Workload)]
        self._count = 0
        self._load()

    def _line_of(self, workload) -> Optional[int]:
        for i, w in self._index.get(tvm_ffi.structural_hash(workload.mod), []):
            if w.same_as(workload) or tvm_ffi.structural_equal(w.mod, workload.mod):
                return i
        return None

    def _load(self) -> None:
        for path in (self.path_workload, self.path_record):
            _drop_partial_last_line(path)
            path.touch()
        lines = [ln for ln in self.path_workload.read_text().splitlines() if ln.strip()]
        workloads = []
        try:
            for i, ln in enumerate(lines):
                w = self._mem.commit_workload(ms.database.Workload.from_json(json.loads(ln)).mod)
                workloads.append(w)
                self._index.setdefault(tvm_ffi.structural_hash(w.mod), []).append((i, w))
            for ln in self.path_record.read_text().splitlines():
                if not ln.strip():
                    continue
                idx, rec = json.loads(ln)
                if not 0 <= int(idx) < len(workloads):
                    raise TuningError(f"{self.path_record}: record names workload {idx}, "
                                      f"{self.path_workload} has {len(workloads)}")
                self._mem.commit_tuning_record(_record_from_json(rec, workloads[int(idx)]))
                self._count += 1
        except TuningError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise TuningError(f"cannot load the tuning database in {self.folder}: {e}") from e
        self._n_workloads = len(workloads)

    def has_workload(self, mod) -> bool:
        return self._mem.has_workload(mod)

    def commit_workload(self, mod):
        if self._mem.has_workload(mod):
            return self._mem.commit_workload(mod)
        w = self._mem.commit_workload(mod)
        _append_line(self.path_workload, list(w.as_json()))
        self._index.setdefault(tvm_ffi.structural_hash(w.mod), []).append((self._n_workloads, w))
        self._n_workloads += 1
        return w

    def commit_tuning_record(self, record) -> None:
        idx = self._line_of(record.workload)
        if idx is None:
            idx = self._line_of(self.commit_workload(record.workload.mod))
        self._mem.commit_tuning_record(record)
        _append_line(self.path_record, [idx, _to_py(record.as_json())])
        self._count += 1

    def get_top_k(self, workload, top_k: int):
        return self._mem.get_top_k(self._mem.commit_workload(workload.mod), top_k)

    def get_all_tuning_records(self):
        return self._mem.get_all_tuning_records()

    def query_tuning_record(self, mod, target, workload_name=None):
        return self._mem.query_tuning_record(mod, target, workload_name or "main")

    def query_schedule(self, mod, target, workload_name=None):
        return self._mem.query_schedule(mod, target, workload_name or "main")

    def query_ir_module(self, mod, target, workload_name=None):
        return self._mem.query_ir_module(mod, target, workload_name or "main")

    def __len__(self) -> int:
        return self._count


def _to_py(obj):
    """TVM FFI containers (Array, Map, String, FloatImm) as plain JSON-able Python values."""
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(k): _to_py(v) for k, v in obj.items()}
    if hasattr(obj, "value"):
        return obj.value
    try:
        return [_to_py(v) for v in obj]
    except TypeError:
        return str(obj)


def open_json_database(folder) -> SparseJSONDatabase:
    """The tuning database in ``folder`` (created if missing), see :class:`SparseJSONDatabase`."""
    return SparseJSONDatabase(folder)


def _normalize(func) -> tvm.IRModule:
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


def read_index(work_dir) -> dict:
    """The index ``{"version", "entries": {target: {workload key: entry}}}`` of ``work_dir``."""
    path = Path(work_dir) / INDEX_NAME
    if not path.exists():
        return {"version": _INDEX_VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise TuningError(f"tuning index {path} is not valid JSON: {e}") from e
    if data.get("version") != _INDEX_VERSION:
        raise TuningError(f"tuning index {path} has version {data.get('version')}, expected {_INDEX_VERSION}")
    return data


def _write_index(work_dir, index: dict) -> None:
    with atomic_path(Path(work_dir) / INDEX_NAME, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1, sort_keys=True))


# -- measurement ----------------------------------------------------------------------

class Measurement:
    """Times kernels of one workload the way :class:`~sparsecc.runtime.kernels.SparseLinear` calls them.

    Arguments are 64-byte aligned torch tensors of a valid sparse instance
    (:func:`sparsecc.tune.space.make_args`), and every call gets a freshly
    allocated output, as at run time. Both matter: ``time_evaluator`` reuses
    one output buffer, and there a serial schedule of the MiniLM FFN-up layer
    at M = 128 looked 3% faster than the parallel hand schedule, while through
    the runtime, where the first touch of a new output page faults (once per
    thread, so a serial kernel takes all the faults), it was 10% slower.
    A sample is a burst of ``n`` calls (the same ``n`` for every candidate:
    the first call of a burst pays the thread-pool wake-up).

    Parameters
    ----------
    wl : Workload
    seed : int
    sample_ms : float
        Target burst length, set from one call of the hand schedule.
    """

    def __init__(self, wl: Workload, seed: int = 0, sample_ms: float = 5.0):
        import torch

        from sparsecc.runtime.kernels import _aligned

        self.torch = torch
        arrays = space.make_args(wl, seed)
        self.ins = [_aligned(torch.from_numpy(a)) for a in arrays[:-1]]
        self.y_shape = tuple(arrays[-1].shape)
        self.sample_ms = float(sample_ms)
        self.n = 1

    def calibrate(self, fn) -> None:
        """Burst length ``n`` from a few calls of ``fn`` (the hand schedule)."""
        for _ in range(2):
            self.call(fn)
        t0 = time.perf_counter()
        for _ in range(3):
            self.call(fn)
        per_call = (time.perf_counter() - t0) * 1e3 / 3
        self.n = max(1, min(1000, int(self.sample_ms / max(per_call, 1e-3))))

    def call(self, fn) -> None:
        from sparsecc.runtime.kernels import _aligned_empty

        y = self.torch.empty(self.y_shape, dtype=self.torch.float32)
        if y.data_ptr() % 64:
            y = _aligned_empty(self.y_shape)
        fn(*self.ins, y)

    def burst_ms(self, fn) -> float:
        """ms per call over one burst of ``n`` calls."""
        t0 = time.perf_counter()
        for _ in range(self.n):
            self.call(fn)
        return (time.perf_counter() - t0) * 1e3 / self.n


def compare(fns: dict, meas: Measurement, rounds: int = 21) -> dict:
    """Time of each kernel in ms, measured in interleaved rounds of :meth:`Measurement.burst_ms`.

    The order rotates from round to round (on this machine the first kernel after a pause ran
    slower: TVM's workers sleep at once, ``TVM_THREAD_POOL_SPIN_COUNT=0``).

    Parameters
    ----------
    fns : dict name -> packed function ``main`` of a built kernel
    meas : Measurement
    rounds : int

    Returns
    -------
    dict name -> ms
        The 10th percentile over rounds (with other jobs on the cores, a kernel that waits for a
        descheduled pool thread takes several times longer: the medians of one kernel timed
        twice differed by up to 2.9x here; the 10th percentiles by at most 1.05x).
    """
    for f in fns.values():  # warm-up
        meas.burst_ms(f)
    times: dict = {k: [] for k in fns}
    names = list(fns)
    for r in range(int(rounds)):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate: no kernel always runs first
            times[k].append(meas.burst_ms(fns[k]))
    return {k: sorted(v)[len(v) // 10] for k, v in times.items()}


_WAKEUP: dict = {}


def pool_wakeup_ms(target) -> float:
    """Extra ms a parallel kernel pays for TVM's thread pool, measured once per process and target.

    The hand schedule of a tiny workload (16x1 blocks, W: (64, 16), M = 1) built parallel and
    serial, timed as in :func:`compare` over 41 rounds; the difference of their 10th percentiles
    (the fast end approximates a machine whose other cores are free).
    """
    key = _target_key(target)
    if key not in _WAKEUP:
        wl = Workload((16, 1), 64, 16, 0.25, 1, False, None)
        hand = x86.default_params((16, 1), "gemv")
        fns = {}
        for par in (True, False):
            sch = tvm.s_tir.Schedule(space.workload_func(wl, hand.m_tile), enable_check=False)
            space.apply_params(sch, wl.block, wl.regime, x86.ScheduleParams(hand.m_tile, parallel=par))
            fns[par] = _runnable(x86.build(sch.mod, target))["main"]
        meas = Measurement(wl, 0, sample_ms=2.0)
        meas.calibrate(fns[True])
        t = compare(fns, meas, rounds=41)
        _WAKEUP[key] = max(0.0, float(t[True] - t[False]))
    return _WAKEUP[key]


# -- tuning ---------------------------------------------------------------------------

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
        Final interleaved medians of the best tuned point and of the hand schedule (ms).
    choice : {"tuned", "hand"}
        What compile uses; "hand" when the hand schedule was at least as fast.
    params : dict
        Knob values of the chosen schedule.
    seconds : float
        Wall time spent on this workload.
    skipped : bool
        Already in the database with enough trials (nothing measured now).
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
        return {"workload": self.workload.as_dict(), "trials": self.trials, "requested": self.requested,
                "space_size": self.space_size, "complete": self.complete, "best_ms": self.best_ms,
                "hand_ms": self.hand_ms, "choice": self.choice, "params": self.params,
                "seconds": round(self.seconds, 2)}

    @classmethod
    def from_entry(cls, e: dict, skipped: bool = False) -> "WorkloadResult":
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


def _tune_one(wl: Workload, target, work_dir: Path, db, best_db, trials: int, deadline, seed: int,
              on_trial=None, per_iter: int = 8) -> WorkloadResult:
    """Tune ``wl`` (see the module docstring); returns the result, writes the ``best/`` record."""
    t0 = time.monotonic()
    m_tiles = space.m_tile_choices(wl)
    sizes = {mt: len(space.grid(wl, mt, seed)) for mt in m_tiles}
    cap = max(1, math.ceil(trials / len(m_tiles)))
    funcs = {mt: space.workload_func(wl, mt) for mt in m_tiles}
    hand = x86.default_params(tuple(wl.block), wl.regime)
    hand_sch = tvm.s_tir.Schedule(funcs[hand.m_tile], enable_check=False)  # the runtime's hand kernel
    space.apply_params(hand_sch, wl.block, wl.regime, hand)
    fns = {hand: _runnable(x86.build(hand_sch.mod, target))["main"]}
    meas = Measurement(wl, seed)
    meas.calibrate(fns[hand])
    with _without_tensor_intrin():
        tasks = [ms.TuneContext(
            mod=_normalize(funcs[mt]), target=target,
            space_generator=ms.space_generator.ScheduleFn(space.space_fn(wl, mt, seed), sch_rules=[],
                                                         postprocs=[], mutator_probs={}),
            search_strategy=GridSearch(deadline, ArgInfo.from_prim_func(space.specialized_func(wl, mt))),
            task_name=f"{wl.key()}|mt{mt}", rand_state=seed,
            num_threads=1, logger=None) for mt in m_tiles]
    ms.tune_tasks(tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=str(work_dir),
                  max_trials_global=int(trials), max_trials_per_task=cap, num_trials_per_iter=per_iter,
                  builder=InProcessBuilder(), runner=InProcessRunner(meas, on_result=on_trial),
                  database=db, cost_model=ms.cost_model.RandomModel(seed=seed),
                  measure_callbacks=[ms.measure_callback.AddToDatabase()], task_scheduler="round-robin")
    _ARTIFACTS.clear()
    measured = sum(min(cap, sizes[mt]) for mt in m_tiles)

    # final pick: the best three of every task and the hand schedule, timed again together
    cands: dict = {}
    n_measured = 0
    for mt in m_tiles:
        wkl = db.commit_workload(_normalize(funcs[mt]))
        top = [r for r in db.get_top_k(wkl, 64) if r.run_secs]
        n_measured += len(top)
        for r in top[:FINALISTS]:
            p = space.params_from_trace(r.trace, mt)
            if p != hand and p not in cands:
                cands[p] = r
    for p, r in cands.items():
        s = tvm.s_tir.Schedule(funcs[p.m_tile], enable_check=False)
        r.trace.apply_to_schedule(s, remove_postproc=True)
        fns[p] = _runnable(x86.build(s.mod, target))["main"]
    timed = {p: float(v) for p, v in compare(fns, meas, rounds=21).items()}
    wake = pool_wakeup_ms(target)
    # a serial kernel beats the pool for sure only when it takes less than twice the wake-up: with the
    # second core free, the parallel kernel takes about t_serial / 2 + wake-up (a serial win on a big
    # kernel means the other core was busy while tuning, and reverses when it is free: FFN-up at M=128
    # ran serially in 0.94x of the hand time during tuning and in 1.48x of it minutes later)
    tuned = [p for p in timed if p != hand and (p.parallel or not hand.parallel or timed[p] < 2.0 * wake)]
    best = min(tuned, key=timed.get) if tuned else hand
    if timed[best] > timed[hand] * (1.0 - KEEP_HAND_MARGIN):  # not clearly faster than the hand one: keep it
        best = hand
    choice = "tuned" if best != hand else "hand"
    if choice == "tuned":
        r = cands[best]
        wkl = best_db.commit_workload(_normalize(funcs[best.m_tile]))
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
                   progress: bool = True, seed: int = 0) -> list:
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

    Returns
    -------
    list of WorkloadResult, in input order (``skipped=True`` for those already tuned)

    Raises
    ------
    TuningError
        ``trials < 1`` or an unreadable database.
    """
    if int(trials) < 1:
        raise TuningError(f"trials must be ≥ 1, got {trials}")
    target = target or x86.host_target()
    tkey = _target_key(target)
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
        total = sum(min(trials, sum(len(space.grid(wl, mt)) for mt in space.m_tile_choices(wl))) for wl in todo)
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
                res = _tune_one(wl, target, work_dir, db, best_db, int(trials), deadline, seed,
                                on_trial=(lambda: bar.update(1)) if bar is not None else None)
                index = read_index(work_dir)  # another process may have added entries meanwhile
                index["entries"].setdefault(tkey, {})[wl.key()] = res.as_entry()
                _write_index(work_dir, index)
                results[wl.key()] = res
        finally:
            if bar is not None:
                bar.close()
    return [results[wl.key()] for wl in unique if wl.key() in results]


# -- use of the database by compile ---------------------------------------------------

class TuningDatabase:
    """Read side of a tuning ``work_dir``: which workloads have a tuned schedule, and their kernels.

    Parameters
    ----------
    work_dir : path
        A folder written by :func:`tune_workloads` / :func:`sparsecc.tune`.

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
        if self._best_db is None:
            self._best_db = open_json_database(self.work_dir / BEST_DIR)
        return self._best_db

    def entries(self, target) -> dict:
        return self.index["entries"].get(_target_key(target), {})

    def record(self, wl: Workload, m_tile: int, target):
        """The best ``TuningRecord`` of ``wl`` at register tile ``m_tile``, or None."""
        mod = _normalize(space.workload_func(wl, m_tile))
        if not self.best_db.has_workload(mod):
            return None
        top = self.best_db.get_top_k(self.best_db.commit_workload(mod), 1)
        return top[0] if top else None

    def for_layer(self, block, n: int, k: int, nnzb: int, bias: bool, activation, target) -> "Optional[TunedKernels]":
        """Tuned entries of a layer, at any M (None when there are none)."""
        found = {}
        ents = self.entries(target)
        for regime_m in sorted({int(e["workload"]["m"]) for e in ents.values()}):
            wl = Workload.for_layer(block, n, k, nnzb, regime_m, bias, activation)
            e = ents.get(wl.key())
            if e is not None:
                found[wl.m] = (wl, e)
        return TunedKernels(self, found, target) if found else None

    def kernel(self, wl: Workload, entry: dict, target):
        """``(fn, m_tile)`` of the tuned kernel of ``wl`` (any M, any nnzb), or None to use the hand one."""
        if entry.get("choice") != "tuned":
            return None
        key = (wl, _target_key(target))
        if key not in self._kernels:
            from sparsecc.runtime.kernels import kernel_name, load_or_build

            mt = int(entry["params"]["m_tile"])
            rec = self.record(wl, mt, target)
            if rec is None:
                self._kernels[key] = None
            else:
                sch = space.schedule_from_trace(rec.trace, wl.block, bias=wl.bias, activation=wl.activation,
                                                m_tile=mt, k=wl.k)
                name = kernel_name(wl.block, wl.regime, wl.bias, wl.activation) + "_tuned"
                self._kernels[key] = (load_or_build(sch, name, target), mt)
        return self._kernels[key]


class TunedKernels:
    """The tuned kernels of one layer, chosen per call by rows ``M`` (nearest tuned M of the regime).

    ``kernel(regime, m)`` returns ``(fn, m_tile)`` or None (use the hand schedule).
    """

    def __init__(self, db: TuningDatabase, found: dict, target):
        self.db = db
        self.found = found  # m bucket -> (Workload, entry)
        self.target = target
        self._by_m: dict = {}

    @property
    def tuned_ms(self) -> list:
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
        key = (regime, space.m_bucket(m))
        if key in self._by_m:
            return self._by_m[key]
        ms_ = [mb for mb in self.found if x86.regime_for(mb) == regime]
        out = None
        if ms_:
            mb = min(ms_, key=lambda v: (abs(math.log2(v) - math.log2(max(m, 1))), v))
            wl, entry = self.found[mb]
            out = self.db.kernel(wl, entry, self.target)
        self._by_m[key] = out
        return out
