"""On-disk tuning database of a ``work_dir``: MetaSchedule JSON records and the sparsecc index.

A tuning ``work_dir`` holds

* ``database_workload.json`` and ``database_tuning_record.json``: every trial,
  in the line format of TVM's ``JSONDatabase`` (:class:`SparseJSONDatabase`);
* ``best/``: the same two files with one record per workload whose tuned
  schedule won the final comparison (:data:`BEST_DIR`);
* ``sparsecc_tuning.json``: the index (:data:`INDEX_NAME`,
  :func:`read_index`, :func:`write_index`), one entry per target and
  workload key, rewritten atomically.

Records are appended and fsynced one line at a time, so a crash leaves at
most one unfinished line at the end of a file; loading drops it. The line
format is that of ``tvm.s_tir.meta_schedule.database.JSONDatabase`` (TVM 0.27).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.database import PyDatabase

from sparsecc.errors import CacheWarning, TuningError
from sparsecc.fileio import atomic_path

__all__ = [
    "BEST_DIR",
    "INDEX_NAME",
    "SparseJSONDatabase",
    "normalize_mod",
    "open_json_database",
    "read_index",
    "target_key",
    "write_index",
]

#: File name of the index in a tuning ``work_dir``.
INDEX_NAME = "sparsecc_tuning.json"
#: Subfolder of a tuning ``work_dir`` with the winning tuned record of each workload.
BEST_DIR = "best"
_INDEX_VERSION = 1


def target_key(target) -> str:
    """Key of ``target`` in the index and in per-target caches.

    Parameters
    ----------
    target : tvm.target.Target or str

    Returns
    -------
    str
        ``str(target)``, e.g. ``"llvm -keys=cpu -mcpu=znver3"``.
    """
    return str(target)


def normalize_mod(func) -> tvm.IRModule:
    """The module MetaSchedule tunes for ``func``, as the databases key workloads.

    Parameters
    ----------
    func : tvm.tir.PrimFunc or tvm.IRModule
        A kernel template (:func:`sparsecc.tune.space.workload_func`).

    Returns
    -------
    tvm.IRModule
        ``func`` as the function ``main`` of a module, as ``TuneContext`` normalizes it.
    """
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


# -- JSON lines -----------------------------------------------------------------------

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


# -- MetaSchedule database ------------------------------------------------------------

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

    A line other than the last that does not load (or a record of a workload that did not) is skipped with a
    :class:`~sparsecc.errors.CacheWarning`: the layers it would have served keep their hand schedules.
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
        workloads: list = []  # None for a line that does not load (its records are skipped too)
        skipped = []
        for i, ln in enumerate(lines):
            try:
                w = self._mem.commit_workload(ms.database.Workload.from_json(json.loads(ln)).mod)
            except Exception as e:  # noqa: BLE001 - a damaged line is skipped, the rest is used
                workloads.append(None)
                skipped.append(f"{self.path_workload.name} line {i + 1} ({type(e).__name__})")
                continue
            workloads.append(w)
            self._index.setdefault(tvm_ffi.structural_hash(w.mod), []).append((i, w))
        for j, ln in enumerate(self.path_record.read_text().splitlines()):
            if not ln.strip():
                continue
            try:
                idx, rec = json.loads(ln)
                if not 0 <= int(idx) < len(workloads):
                    raise TuningError(f"record names workload {idx}, {self.path_workload.name} has {len(workloads)}")
                if workloads[int(idx)] is None:
                    raise TuningError(f"its workload (line {int(idx) + 1}) did not load")
                self._mem.commit_tuning_record(_record_from_json(rec, workloads[int(idx)]))
                self._count += 1
            except Exception as e:  # noqa: BLE001
                skipped.append(f"{self.path_record.name} line {j + 1} ({e if isinstance(e, TuningError) else type(e).__name__})")
        if skipped:  # the layers they would have served keep their hand schedules
            warnings.warn(f"tuning database {self.folder}: skipped {len(skipped)} damaged entries: "
                          + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""), CacheWarning, stacklevel=3)
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


def open_json_database(folder) -> SparseJSONDatabase:
    """The tuning database in ``folder`` (created if missing), see :class:`SparseJSONDatabase`.

    Raises
    ------
    TuningError
        As :class:`SparseJSONDatabase`.
    """
    return SparseJSONDatabase(folder)


# -- index ----------------------------------------------------------------------------

def read_index(work_dir) -> dict:
    """The index of ``work_dir``: what was tuned, per target and workload key.

    Parameters
    ----------
    work_dir : path
        A tuning folder; it need not exist yet.

    Returns
    -------
    dict
        ``{"version": 1, "entries": {target key: {workload key: entry}}}`` (entries as
        :meth:`sparsecc.tune.tuner.WorkloadResult.as_entry`); an empty index when the file
        is missing.

    Raises
    ------
    TuningError
        The index is not valid JSON or has another version.
    """
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


def write_index(work_dir, index: dict) -> None:
    """Replace the index of ``work_dir`` with ``index`` atomically (an interruption keeps the old one).

    Parameters
    ----------
    work_dir : path
    index : dict
        As returned by :func:`read_index`.
    """
    with atomic_path(Path(work_dir) / INDEX_NAME, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1, sort_keys=True))
