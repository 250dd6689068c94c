"""``sparsecc.tune``: find a model's sparse kernel workloads and autotune them into a database."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from sparsecc.errors import TuningError

__all__ = ["TuningSummary", "model_workloads", "tune"]


@dataclass
class TuningSummary:
    """What :func:`tune` did, per distinct workload.

    Attributes
    ----------
    results : list of sparsecc.tune.autotune.WorkloadResult
    layers : dict workload key -> list of layer names using it
    work_dir : str
    """

    results: list
    layers: dict = field(default_factory=dict)
    work_dir: str = ""

    def rows(self) -> list:
        """One dict per workload: key, layers, trials, best/hand ms, ratio, choice, skipped."""
        return [{"workload": r.workload.key(), "layers": self.layers.get(r.workload.key(), []),
                 "trials": r.trials, "space_size": r.space_size, "best_ms": float(r.best_ms),
                 "hand_ms": float(r.hand_ms), "ratio": float(r.ratio), "choice": r.choice,
                 "params": r.params, "seconds": float(r.seconds), "skipped": r.skipped,
                 "complete": r.complete} for r in self.results]

    def to_json(self) -> str:
        return json.dumps({"work_dir": self.work_dir, "workloads": self.rows()}, indent=1)

    def __str__(self) -> str:
        head = ("workload", "layers", "trials", "hand ms", "best ms", "ratio", "choice", "")
        lines = [head]
        for row in self.rows():
            lines.append((row["workload"], str(len(row["layers"])), f'{row["trials"]}/{row["space_size"]}',
                          f'{row["hand_ms"]:.4f}', f'{row["best_ms"]:.4f}', f'{row["ratio"]:.2f}', row["choice"],
                          "resumed (already tuned)" if row["skipped"] else
                          ("" if row["complete"] else "incomplete (time budget)")))
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


def model_workloads(cm, rows=None) -> tuple:
    """The kernel workloads of a compiled module's sparse linears.

    Parameters
    ----------
    cm : CompiledModule
    rows : sequence of int, optional
        Rows ``M`` of X to tune every layer at; default: each layer's example M.

    Returns
    -------
    (list of Workload, dict workload key -> layer names)
    """
    from sparsecc.ir.annotations import get_annotation
    from sparsecc.passes.choose_format import example_rows
    from sparsecc.runtime.kernels import SparseLinear
    from sparsecc.tune.space import Workload

    gm = cm.graph.gm
    workloads, layers = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not SparseLinear:  # N:M and conv kernels have no tuning space yet
            continue
        ann = get_annotation(node)
        n, k = mod.shape
        nnzb = int(mod.indptr[-1])
        for m in (rows if rows else [example_rows(node)]):
            wl = Workload.for_layer(mod.block, n, k, nnzb, int(m), mod.bias is not None, mod.activation)
            workloads.append(wl)
            layers.setdefault(wl.key(), []).append(ann.name if ann is not None else str(node.target))
    return list(dict.fromkeys(workloads)), layers


def tune(model, example_inputs: Any, *, target: str = "x86", sparsity=None, pattern: str = "auto",
         trials: int = 64, work_dir, time_budget_s: Optional[float] = None, progress: bool = True,
         rows=None, dynamic_shapes=None, block_shape=None, seed: int = 0) -> TuningSummary:
    """Autotune the sparse kernels ``sparsecc.compile`` would use for ``model`` into ``work_dir``.

    Runs compile's analysis (capture, pruning, format choice by the cost model
    without timing, so the same layers are tuned on every run; lowering with the
    hand schedules) with the same arguments, collects each sparse linear's
    workload (format and block, ``W: (N, K)``, density bucket, M bucket, bias,
    activation, target) and tunes every distinct one with MetaSchedule (see
    :mod:`sparsecc.tune.autotune`). Workloads already tuned to ``trials`` in
    ``work_dir`` are skipped, so an interrupted run resumes, and a database
    tuned on one model serves any model with the same layer shapes and patterns.
    Pass the folder to ``sparsecc.compile(..., tuning_db=work_dir)``.

    Parameters
    ----------
    model, example_inputs, target, sparsity, pattern, dynamic_shapes, block_shape
        As for :func:`sparsecc.compile`.
    trials : int
        Candidates measured per workload (all register tiles together; a space
        smaller than this is measured whole).
    work_dir : path
        Database folder (created if missing).
    time_budget_s : float, optional
        Stop after about this many seconds (the workload in progress ends at
        its next batch of 8 candidates and is marked incomplete).
    progress : bool
        tqdm progress bar.
    rows : sequence of int, optional
        Rows ``M`` of X to tune at (e.g. ``[1, 16, 128]``); default: the example's.
    seed : int
        Order in which each task's knob points are tried.

    Returns
    -------
    TuningSummary
        Per workload: trials, best tuned ms, hand-schedule ms, ratio, choice.

    Raises
    ------
    TuningError
        A target other than x86, ``trials < 1``, or an unreadable database.
    """
    from sparsecc.api import compile as sc_compile

    if isinstance(target, str) and target.lower() not in ("x86", "x86_64", "cpu", "llvm", "host"):
        raise TuningError(f"autotuning supports the x86 target only, got {target!r}")
    if int(trials) < 1:
        raise TuningError(f"trials must be ≥ 1, got {trials}")
    cm = sc_compile(model, example_inputs, target=target, sparsity=sparsity, pattern=pattern,
                    dynamic_shapes=dynamic_shapes, block_shape=block_shape, measure=False)
    if getattr(cm.target, "name", "x86") != "x86":
        raise TuningError(f"autotuning supports the x86 target only, got {cm.target!r}")
    workloads, layers = model_workloads(cm, rows)
    from sparsecc.tune.autotune import tune_workloads

    results = tune_workloads(workloads, work_dir, target=cm.target.tvm_target(), trials=trials,
                             time_budget_s=time_budget_s, progress=progress, seed=seed)
    return TuningSummary(results, layers, str(work_dir))
