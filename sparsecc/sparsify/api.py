"""``sparsecc.sparsify``: the keyword API over the pruning engine, and its result.

:func:`sparsify` checks its arguments, builds the engine's objects from them (an
importance score of :mod:`~sparsecc.sparsify.scores`, a schedule of
:mod:`~sparsecc.sparsify.schedules`, an allocation of
:mod:`~sparsecc.sparsify.allocation`, optionally layer-wise pruning of
:mod:`~sparsecc.sparsify.layerwise`) and calls the driver
:func:`~sparsecc.sparsify.engine.run_sparsify`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from torch import nn

from ..errors import AccuracyBudgetError, DataError, InvalidSparsityError
from ..ir.capture import check_model
from .allocation import ALLOCATIONS, NEEDS_EVAL_FN, Allocation, Error, Global, Sensitivity, Uniform
from .engine import Sparsified, Training, run_sparsify
from .layerwise import LayerwisePruning
from .patterns import check_sparsity_value, parse_pattern
from .problem import SparsifyProblem, build_problem
from .regularizers import REGULARIZERS
from .schedules import SCHEDULES, Gradual, OneShot, RigL, Schedule
from .scores import SCORES
from .sensitivity import option_key

#: Densities tried per layer by the sensitivity analysis (1.0, dense, is always an option).
CANDIDATE_DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)


@dataclass
class LayerChoice:
    """What sparsify did to one layer (one row of :meth:`SparsifyResult.report`).

    Attributes
    ----------
    name : str
        Qualified module name in the user's model.
    kind : {"linear", "conv"}
    shape : tuple
        Weight shape, e.g. (C_out, C_in) or (C_out, C_in, kh, kw).
    rows : int
        M, rows of the layer's GEMM at the example input (batch · tokens or batch · H_out · W_out).
    pattern : str
    density : float
        Fraction of nonzero weights after sparsify.
    sensitivity : dict candidate key -> metric drop, or empty
    est_dense_ms, est_ms : float
        Cost-model latency dense and with the chosen pattern and density (min with dense: a
        layer whose sparse kernel loses runs dense when compiled).
    """

    name: str
    kind: str
    shape: tuple
    rows: int
    pattern: str = "dense"
    density: float = 1.0
    sensitivity: dict = field(default_factory=dict)
    est_dense_ms: float = float("nan")
    est_ms: float = float("nan")

    @property
    def speedup(self) -> float:
        return self.est_dense_ms / self.est_ms if self.est_ms > 0 else float("nan")


@dataclass
class SparsifyResult:
    """Result of :func:`sparsify`.

    Attributes
    ----------
    model : nn.Module
        A pruned copy of the user's model: a plain torch module whose pruned weights are
        zeros, with the user's parameter names; hand it to :func:`sparsecc.compile`.
    layers : list of LayerChoice
    metric_dense, metric_sparse : float or None
        ``eval_fn`` of the dense and of the returned model.
    history : list of dict
        Per fine-tuning step: step, loss, sparsity; per budget search round: its choice and drop.
    """

    model: nn.Module
    layers: list
    metric_dense: Optional[float]
    metric_sparse: Optional[float]
    method: str
    schedule: str
    target: str
    seconds: float = 0.0
    history: list = field(default_factory=list)
    rounds: list = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the prunable layers (1 - kept / total weights)."""
        total = sum(math.prod(c.shape) for c in self.layers)
        kept = sum(c.density * math.prod(c.shape) for c in self.layers)
        return 1.0 - kept / total if total else 0.0

    @property
    def est_speedup(self) -> float:
        """Cost-model estimate: Σ dense ms / Σ chosen ms over the prunable layers."""
        return sum(c.est_dense_ms for c in self.layers) / max(1e-12, sum(c.est_ms for c in self.layers))

    def report(self) -> str:
        """Per-layer table: sensitivity, chosen pattern and density, estimated speed-up; metric before/after."""
        head = f"{'layer':<40} {'shape':<18} {'M':>6} {'pattern':<14} {'density':>7} {'drop@choice':>11} " \
               f"{'est ms':>8} {'dense ms':>8} {'speedup':>7}"
        lines = [head, "-" * len(head)]
        for c in self.layers:
            key = option_key(parse_pattern(c.pattern), c.density) if c.pattern != "dense" else None
            drop = c.sensitivity.get(key) if key else 0.0
            drop_s = "-" if drop is None else f"{drop:+.4f}"
            lines.append(f"{c.name:<40} {'x'.join(map(str, c.shape)):<18} {c.rows:>6} {c.pattern:<14} "
                         f"{c.density:>7.3f} {drop_s:>11} {c.est_ms:>8.3f} {c.est_dense_ms:>8.3f} "
                         f"{c.speedup:>6.2f}x")
        lines.append(f"overall sparsity {self.sparsity:.3f} (method {self.method}, schedule {self.schedule}, "
                     f"target {self.target}); estimated speed-up of these layers {self.est_speedup:.2f}x")
        if self.metric_dense is not None:
            lines.append(f"metric: dense {self.metric_dense:.4f} -> sparse {self.metric_sparse:.4f} "
                         f"(drop {self.metric_dense - self.metric_sparse:+.4f})")
        lines.append(f"sparsify took {self.seconds:.1f} s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparsifyResult(sparsity={self.sparsity:.3f}, metric {self.metric_dense} -> {self.metric_sparse})"



# ----------------------------------------------------------------------------------------------
# from keywords to objects


def _validate(model, *, sparsity, accuracy_budget, pattern, method, schedule, data, loss_fn, eval_fn,
              finetune_steps, regularization, allocation, layer_densities, reconstruct, damp) -> tuple:
    """Check the keyword arguments before any work; returns (sparsity, allocation name, layer-wise?)."""
    if sparsity is None and accuracy_budget is None:
        raise InvalidSparsityError("give sparsity=, accuracy_budget= or both")
    if sparsity is not None:
        sparsity = check_sparsity_value(sparsity, "the model")
    if accuracy_budget is not None:
        if not isinstance(accuracy_budget, (int, float)) or not (accuracy_budget >= 0):
            raise AccuracyBudgetError(f"accuracy_budget must be a number ≥ 0, got {accuracy_budget!r}")
        if eval_fn is None:
            raise AccuracyBudgetError("accuracy_budget needs eval_fn to measure the metric")
    if method not in SCORES:
        raise InvalidSparsityError(f"method must be one of {tuple(SCORES)}, got {method!r}")
    if schedule not in SCHEDULES:
        raise InvalidSparsityError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    if regularization not in REGULARIZERS:
        raise InvalidSparsityError(f"regularization must be one of {REGULARIZERS}, got {regularization!r}")
    if layer_densities not in ("uniform", "erk"):
        raise InvalidSparsityError(f"layer_densities must be 'uniform' or 'erk', got {layer_densities!r}")
    if finetune_steps < 0:
        raise InvalidSparsityError(f"finetune_steps must be ≥ 0, got {finetune_steps}")
    needs_data = finetune_steps > 0 or SCORES[method].needs_grad
    if needs_data and (data is None or loss_fn is None):
        raise DataError(f"method {method!r} with finetune_steps={finetune_steps} needs data= and loss_fn=")
    if SCHEDULES[schedule].needs_training and finetune_steps == 0:
        raise InvalidSparsityError(f"schedule {schedule!r} prunes during fine-tuning: set finetune_steps > 0")
    layerwise = bool(reconstruct) or SCORES[method].needs_inputs
    if allocation is None:  # layer-wise pruning under a budget alone searches uniform plans
        allocation = "uniform" if layerwise else (
            "sensitivity" if (pattern == "auto" or accuracy_budget is not None) else "uniform")
    if allocation not in ALLOCATIONS:
        raise InvalidSparsityError(f"allocation must be one of {tuple(ALLOCATIONS)}, got {allocation!r}")
    what = "reconstruct=True" if reconstruct else "method=" + repr(method)
    if layerwise and schedule != "oneshot":
        raise InvalidSparsityError(f"{what} prunes once, layer by layer: use schedule='oneshot' (got {schedule!r})")
    if layerwise and allocation not in ("uniform", "error"):
        raise InvalidSparsityError(f"{what} needs allocation='uniform' or 'error' and an explicit pattern "
                                   f"(got allocation={allocation!r})")
    if allocation == "error" and not layerwise:
        raise InvalidSparsityError("allocation='error' measures each layer's output error on calibration inputs: "
                                   "it needs layer-wise pruning (reconstruct=True, or method 'activation' or "
                                   "'sparsegpt')")
    if allocation == "error" and (sparsity is None or SCORES[method].needs_grad or pattern == "auto"):
        raise InvalidSparsityError("allocation='error' needs sparsity=, an explicit pattern and a method without "
                                   f"gradients (got sparsity={sparsity}, pattern={pattern!r}, method={method!r})")
    if layerwise and data is None:
        raise DataError(f"layer-wise pruning ({what}) needs data= (calibration inputs)")
    if not (damp > 0):
        raise InvalidSparsityError(f"damp must be > 0, got {damp!r}")
    if allocation == "sensitivity" and eval_fn is None:
        raise InvalidSparsityError(NEEDS_EVAL_FN)
    if not isinstance(model, nn.Module):
        raise InvalidSparsityError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sparsity, allocation, layerwise


def _make_schedule(name: str, *, prune_events: int, prune_fraction: float, rigl_alpha: float,
                   rigl_every: Optional[int]) -> Schedule:
    if name == "gradual":
        return Gradual(prune_events, prune_fraction)
    if name == "rigl":
        return RigL(rigl_alpha, rigl_every, prune_fraction)
    return OneShot()


def _make_allocation(name: str, *, erk: bool, cache_dir, layerwise: Optional[LayerwisePruning]) -> Allocation:
    if name == "sensitivity":
        return Sensitivity(cache_dir)
    if name == "error":
        return Error(layerwise)
    return (Global if name == "global" else Uniform)(erk=erk)


def _layer_choices(problem: SparsifyProblem, done: Sparsified) -> list:
    """One :class:`LayerChoice` per prunable layer: the plan, the achieved density, the latencies."""
    choices = []
    for n in problem.names:
        p, d = done.plan.get(n, (None, 1.0))
        real = done.outcome.densities.get(n, 1.0)
        kind, _, rows = problem.infos[n]
        choices.append(LayerChoice(
            name=n, kind=kind, shape=tuple(problem.layers[n].weight.shape), rows=rows,
            pattern=str(p) if p is not None and real < 1.0 else "dense", density=real,
            sensitivity=done.table.get(n, {}), est_dense_ms=problem.latency(n, None, 1.0),
            est_ms=problem.latency(n, p, real)))
    return choices


# ----------------------------------------------------------------------------------------------
# public entry point


def sparsify(model: nn.Module, example_inputs: Any, *, target="x86", sparsity: Union[None, float] = None,
             accuracy_budget: Optional[float] = None, pattern: str = "auto", block_shape: Optional[tuple] = None,
             method: str = "magnitude", schedule: str = "gradual", data: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None, eval_fn: Optional[Callable[[nn.Module], float]] = None,
             finetune_steps: int = 0, lr: float = 1e-4, optimizer: Optional[Callable] = None,
             regularization: str = "none", reg_strength: float = 1e-5, allocation: Optional[str] = None,
             densities: tuple = CANDIDATE_DENSITIES, layer_densities: str = "uniform",
             calib_batches: int = 4, prune_events: int = 10, prune_fraction: float = 0.7,
             rigl_alpha: float = 0.3, rigl_every: Optional[int] = None, layers: Optional[list] = None,
             search_rounds: int = 3, cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
             reconstruct: bool = False, damp: float = 0.01, seed: int = 0) -> SparsifyResult:
    """Prune a copy of ``model`` and recover its accuracy; choose per-layer pattern and density.

    The keyword layer over the pruning engine: the strings name an importance score
    (:data:`~sparsecc.sparsify.scores.SCORES`), a schedule
    (:data:`~sparsecc.sparsify.schedules.SCHEDULES`) and an allocation
    (:data:`~sparsecc.sparsify.allocation.ALLOCATIONS`), composed by
    :func:`~sparsecc.sparsify.engine.run_sparsify`.

    Parameters
    ----------
    model : nn.Module
        Never modified: sparsify works on a deep copy.
    example_inputs : Tensor, tuple or dict
        An example call, as for :func:`sparsecc.compile`; gives each layer's GEMM rows M
        for latency estimates and the structure every data batch must have.
    target : str or target object
        Whose cost model predicts latencies (``"x86"``).
    sparsity : float in [0, 1), optional
        Overall sparsity of the prunable layers (Linear, Conv2d with groups=1).
    accuracy_budget : float, optional
        Largest allowed drop of ``eval_fn`` (same units, e.g. 0.005 for half a point of an
        accuracy in [0, 1]). Alone: minimize predicted latency within the budget. With
        ``sparsity``: reach the sparsity and raise if the drop exceeds the budget.
    pattern : {"auto", "unstructured", "block", "<r>x<c>", "N:M", "channel"}
        "auto" lets sensitivity and the target's latency choose among unstructured and the
        target's fastest block shape, per layer. "channel" removes whole channels, attention
        heads and FFN neurons of every dependency group (``sparsity`` of each group's units,
        or a dict per kind ``{"heads": 0.5, "neurons": 0.5}``; see
        :mod:`sparsecc.sparsify.structured`) and returns a physically smaller model; the
        method picks the group importance (magnitude; impact/movement: Taylor;
        activation/sparsegpt: activation) and ``reconstruct`` refits the linears that lost inputs.
    block_shape : (rows, cols), optional
        For ``pattern="block"``; default the target's choice.
    method : {"magnitude", "impact", "movement", "activation", "sparsegpt"}
        Importance score (see :mod:`sparsecc.sparsify.scores`). "activation" (Wanda) and
        "sparsegpt" (SparseGPT's sequential OBS mask selection) need each layer's inputs, so
        they prune layer by layer (``schedule="oneshot"``, allocation "uniform" or "error").
    schedule : {"oneshot", "gradual", "rigl"}
        One-shot pruning then fine-tuning; the cubic gradual schedule of Zhu & Gupta (2017)
        during fine-tuning; or RigL dynamic sparse training at constant density (Evci et
        al. 2020). N:M layers are pruned at the start in every schedule (as NVIDIA's ASP).
    data : iterable of (inputs, target)
        Training batches, re-iterated as needed; inputs shaped like ``example_inputs``.
    loss_fn : callable (model output, target) -> scalar Tensor
    eval_fn : callable (model) -> float
        Metric on a calibration split, higher is better; needed by sensitivity analysis
        and budgets.
    finetune_steps : int
        Optimizer steps of fine-tuning (0: prune only).
    lr : float
        Adam learning rate (when ``optimizer`` is None).
    optimizer : callable (params) -> torch.optim.Optimizer, optional
    regularization : {"none", "l1", "group_lasso"}
        Added to the loss during fine-tuning with weight ``reg_strength``.
    allocation : {"uniform", "global", "sensitivity", "error"}, optional
        How a global sparsity is spread over layers: every layer to it ("uniform", as Zhu &
        Gupta 2017); one score threshold over all layers at every pruning step ("global",
        as in Blalock et al., "What is the State of Neural Network Pruning?", MLSys 2020);
        per layer from the sensitivity analysis and the target's latency ("sensitivity");
        or, for layer-wise pruning, the per-layer densities (among ``densities`` and dense)
        minimizing the sum of the layers' relative output errors, each layer pruned alone
        on ``calib_batches`` batches, at the overall sparsity ("error"; the layer-wise
        error objective of OBC's non-uniform compression, Frantar & Alistarh 2022). Default
        "sensitivity" when ``pattern="auto"`` or a budget is given, else "uniform".
    densities : tuple of float
        Per-layer candidate densities of the sensitivity analysis and of
        ``allocation="error"``.
    layer_densities : {"uniform", "erk"}
        For ``schedule="rigl"`` with uniform allocation: same density per layer, or ERK.
    calib_batches : int
        Batches whose gradients seed impact and movement scores before the first pruning.
    prune_events, prune_fraction : int, float
        Gradual schedule: pruning steps, spread over the first ``prune_fraction`` of fine-tuning.
    rigl_alpha, rigl_every : float, int
        RigL's initial update fraction and steps between updates (updates stop at
        ``prune_fraction`` of training).
    layers : list of str, optional
        Restrict pruning to these layer names.
    search_rounds : int
        Budget-only mode: rounds of select → prune → fine-tune → measure, each round scaling
        the predicted budget by how much the measured drop left unused. With layer-wise
        pruning, the rounds of the per-layer search that follows the uniform one (patterns and
        densities per layer from each layer's output error; 0 keeps the uniform plan).
    cache_dir : path, optional
        Where sensitivity tables are cached (default ``$SPARSECC_CACHE_DIR/sensitivity``).
    progress : bool
        Progress bars for sensitivity sweeps and fine-tuning.
    reconstruct : bool
        One-shot only: prune layer by layer in execution order and refit each layer's
        kept weights by least squares so that, on ``calib_batches`` batches of ``data``,
        it reproduces the dense model's output from its (already pruned) inputs
        (Optimal Brain Compression / SparseGPT, Frantar & Alistarh 2022, 2023; see
        :mod:`sparsecc.sparsify.reconstruct`). Fine-tuning, if any, starts from there.
    damp : float
        Dampening of the reconstruction's least squares, a fraction of the mean diagonal
        of the layer's input Gram matrix.
    seed : int
        Seeds torch's RNG for reproducible fine-tuning.

    Returns
    -------
    SparsifyResult
        ``.model`` (plain torch model with zeros), ``.report()``.

    Raises
    ------
    InvalidSparsityError
        Bad sparsity, pattern, method, schedule or regularization; a pattern that no layer fits.
    UnknownLayerError
        A name in ``layers`` that is not a prunable layer.
    DataError
        ``data`` yields batches of the wrong structure, shape or dtype, or the model fails on them.
    TrainingError
        The loss became NaN or infinite.
    AccuracyBudgetError
        The budget cannot be met (with the drops measured).
    """
    t_start = time.perf_counter()
    check_model(model, "sparsify")
    if pattern == "channel":  # structured: a physically smaller model (sparsecc.sparsify.structured)
        from .structured import sparsify_channels

        if sparsity is None or accuracy_budget is not None:
            raise InvalidSparsityError("pattern='channel' takes sparsity= (the fraction of every group's channels, "
                                       "heads and neurons removed) and no accuracy_budget")
        if not isinstance(sparsity, dict):
            sparsity = check_sparsity_value(sparsity, "the model")
        return sparsify_channels(model, example_inputs, sparsity=sparsity, method=method, data=data,
                                 loss_fn=loss_fn, eval_fn=eval_fn,
                                 training=Training(finetune_steps, lr, optimizer), calib_batches=calib_batches,
                                 reconstruct=reconstruct, damp=damp, progress=progress, seed=seed, target=target)
    sparsity, allocation, layerwise = _validate(
        model, sparsity=sparsity, accuracy_budget=accuracy_budget, pattern=pattern, method=method,
        schedule=schedule, data=data, loss_fn=loss_fn, eval_fn=eval_fn, finetune_steps=finetune_steps,
        regularization=regularization, allocation=allocation, layer_densities=layer_densities,
        reconstruct=reconstruct, damp=damp)
    lw = LayerwisePruning(bool(reconstruct), damp, calib_batches, progress) if layerwise else None
    sched = _make_schedule(schedule, prune_events=prune_events, prune_fraction=prune_fraction,
                           rigl_alpha=rigl_alpha, rigl_every=rigl_every)
    alloc = _make_allocation(allocation, erk=schedule == "rigl" and layer_densities == "erk", cache_dir=cache_dir,
                             layerwise=lw)
    was_training = model.training
    problem = build_problem(model, example_inputs, target=target, sparsity=sparsity, pattern=pattern,
                            block_shape=block_shape, densities=densities, importance=SCORES[method], layers=layers,
                            data=data, loss_fn=loss_fn, eval_fn=eval_fn, calib_batches=calib_batches,
                            progress=progress)
    training = Training(finetune_steps, lr, optimizer, regularization, reg_strength)
    done = run_sparsify(problem, schedule=sched, allocation=alloc, layerwise=lw, training=training,
                        accuracy_budget=accuracy_budget, search_rounds=search_rounds, seed=seed)
    work = done.outcome.model
    work.train(was_training)
    return SparsifyResult(model=work, layers=_layer_choices(problem, done), metric_dense=problem.metric_dense,
                          metric_sparse=done.outcome.metric, method=method, schedule=schedule,
                          target=problem.target_name, seconds=time.perf_counter() - t_start,
                          history=done.outcome.history, rounds=done.rounds)
