"""The pruning engine and the driver that composes scores, schedules, allocations and reconstruction.

:class:`PruningEngine` owns a working copy of the model with keep-masks attached
(:mod:`~sparsecc.sparsify.masks`): it accumulates an importance score
(:mod:`~sparsecc.sparsify.scores`), prunes layers to densities and fine-tunes,
calling a schedule's hooks (:mod:`~sparsecc.sparsify.schedules`) around every
step, as Torch-Pruning's ``MetaPruner`` composes ``Importance`` objects.

:func:`run_sparsify` is the driver::

    allocation.check(problem)
    seed; problem.metric_dense = eval_fn(dense)
    table = allocation.measure(problem)                 # sensitivities, output errors or nothing
    plan = allocation.allocate(problem, table)          # {layer: (pattern, density)}
    outcome = run_plan(problem, plan, ...)              # calibrate, prune, fine-tune, measure

or, without a sparsity, :func:`~sparsecc.sparsify.budget.search_budget` over
the table's options, running :func:`run_plan` once per round. Layer-wise pruning
without a sparsity searches uniform plans first
(:func:`~sparsecc.sparsify.budget.search_uniform_budget`), then per-layer plans from
the layers' output errors (:func:`~sparsecc.sparsify.budget.search_mixed_budget`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import AccuracyBudgetError, InvalidSparsityError
from .budget import SEARCH_SPARSITIES, search_budget, search_mixed_budget, search_uniform_budget
from .data import Batches, first_batches, forward_loss
from .masks import attach_masks, prunable_layers, set_capture, set_mask, strip_masks
from .patterns import UNSTRUCTURED, Pattern, as_matrix, from_matrix, mask_from_scores
from .problem import SparsifyProblem
from .regularizers import regularization_penalty
from .scores import ImportanceScore

__all__ = ["Outcome", "PruningEngine", "Sparsified", "Training", "run_plan", "run_sparsify"]


@dataclass
class Training:
    """Fine-tuning settings.

    Attributes
    ----------
    steps : int
        Optimizer steps (0: prune only).
    lr : float
        Adam's learning rate when ``optimizer`` is None.
    optimizer : callable (params) -> torch.optim.Optimizer, optional
    regularization : {"none", "l1", "group_lasso"}
        Added to the loss with weight ``reg_strength`` (:func:`~sparsecc.sparsify.regularizers.regularization_penalty`).
    reg_strength : float
    """

    steps: int = 0
    lr: float = 1e-4
    optimizer: Optional[Callable] = None
    regularization: str = "none"
    reg_strength: float = 1e-5

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        return self.optimizer(params) if self.optimizer else torch.optim.Adam(params, lr=self.lr)


class PruningEngine:
    """Masks, scores and the fine-tuning loop on a working copy of the model.

    Parameters
    ----------
    model : nn.Module
        Pruned in place: keep-masks are attached to the layers of ``plan`` until :meth:`finish`.
    plan : dict name -> (Pattern, final density)
    score : ImportanceScore
    batches : Batches, optional
        Needed by :meth:`calibrate` for gradient scores and by :meth:`finetune`.
    loss_fn : callable (output, target) -> scalar Tensor, optional
    allocation : Allocation, optional
        Its ``distribute`` turns the densities of every pruning step into per-layer ones
        (a global threshold for :class:`~sparsecc.sparsify.allocation.Global`).
    progress : bool
        Progress bars.
    """

    def __init__(self, model: nn.Module, plan: dict, score: ImportanceScore, batches: Optional[Batches] = None,
                 loss_fn: Optional[Callable] = None, allocation=None, progress: bool = True):
        self.model = model
        self.layers = {n: mod for n, mod in prunable_layers(model).items() if n in plan}
        self.plan = plan
        self.score = score
        self.batches = batches
        self.loss_fn = loss_fn
        self.allocation = allocation
        self.progress = progress
        self.masks = attach_masks(self.layers)
        self.history: list = []

    def final_densities(self) -> dict:
        """``{name: final density}`` of the plan."""
        return {n: d for n, (p, d) in self.plan.items()}

    # -- scores and masks
    def _accumulate(self) -> None:
        for n, wm in self.masks.items():
            if wm.dense_grad is not None:
                self.score.accumulate(n, self.layers[n].weight.detach(), wm.dense_grad)
                wm.dense_grad = None

    def calibrate(self, n_batches: int) -> None:
        """Accumulate gradient-based scores over ``n_batches`` batches (no optimizer step).

        Raises
        ------
        InvalidSparsityError
            A gradient score without data or loss function.
        """
        if not self.score.needs_grad:
            return
        if self.batches is None or self.loss_fn is None:
            raise InvalidSparsityError(f"method {self.score.name!r} needs data and loss_fn for its gradients")
        set_capture(self.masks, True)
        for i in range(n_batches):
            inputs, target = self.batches.next()
            self.model.zero_grad(set_to_none=True)
            forward_loss(self.model, inputs, target, self.loss_fn, f"calibration batch {i}").backward()
            self._accumulate()
        self.model.zero_grad(set_to_none=True)
        set_capture(self.masks, False)

    def masked_scores(self, name: str) -> torch.Tensor:
        """Layer ``name``'s scores (float32, the weight's shape), ``-inf`` where already pruned."""
        sc = self.score.score(name, self.layers[name].weight.detach()).clone().to(torch.float32)
        sc[self.masks[name].mask == 0] = -float("inf")
        return sc

    def prune_to(self, densities: dict) -> None:
        """Set each layer's mask to its density from current scores; pruned weights stay pruned (N:M: regrouped)."""
        for n, d in densities.items():
            pattern = self.plan[n][0]
            mod = self.layers[n]
            keep = from_matrix(mask_from_scores(as_matrix(self.masked_scores(n)), d, pattern), mod.weight.shape)
            set_mask(mod, keep & (self.masks[n].mask > 0) if pattern.kind != "n:m" else keep)

    def prune_to_density(self, densities: dict) -> None:
        """:meth:`prune_to` the densities as the allocation distributes them."""
        if self.allocation is not None:
            densities = self.allocation.distribute(self, densities)
        self.prune_to(densities)

    def density(self) -> float:
        """Kept fraction of the weights of the masked layers."""
        kept = sum(float(wm.mask.sum()) for wm in self.masks.values())
        return kept / max(1, sum(wm.mask.numel() for wm in self.masks.values()))

    # -- fine-tuning
    def finetune(self, training: Training, schedule) -> None:
        """``training.steps`` optimizer steps on the engine's batches, the schedule's hooks around each.

        Every step appends ``{"step", "loss", "density"}`` to :attr:`history`.

        Raises
        ------
        DataError, TrainingError
            A malformed batch; a loss that is NaN or infinite.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = training.make_optimizer(params)
        schedule.start(training.steps)
        from tqdm.auto import tqdm

        self.model.train()
        set_capture(self.masks, self.score.needs_grad or schedule.captures_grad)
        bar = tqdm(range(training.steps), desc=f"fine-tune ({schedule.name})", disable=not self.progress,
                   leave=False)
        for t in bar:
            schedule.before_step(self, t)
            inputs, target = self.batches.next()
            opt.zero_grad(set_to_none=True)
            loss = forward_loss(self.model, inputs, target, self.loss_fn, f"fine-tuning step {t}")
            total = loss
            if training.regularization != "none":
                eff = {n: mod.weight for n, mod in self.layers.items()}
                total = loss + training.reg_strength * regularization_penalty(
                    training.regularization, eff, self.regularization_pattern())
            total.backward()
            schedule.after_backward(self, t, opt)
            self._accumulate()
            opt.step()
            self.history.append({"step": t, "loss": float(loss.detach()), "density": self.density()})
            if t % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", density=f"{self.density():.3f}")
        bar.close()
        set_capture(self.masks, False)
        schedule.finish(self)

    def regularization_pattern(self) -> Pattern:
        """The plan's pattern if all layers share one, else unstructured (the regularizer's groups)."""
        pats = {p for p, _ in self.plan.values()}
        return pats.pop() if len(pats) == 1 else UNSTRUCTURED

    def finish(self) -> dict:
        """Bake masks into the weights; returns the achieved density per layer."""
        dens = {n: float(wm.mask.mean()) for n, wm in self.masks.items()}
        strip_masks(self.layers)
        return dens


# ----------------------------------------------------------------------------------------------
# the driver


@dataclass
class Outcome:
    """One run of a plan: the pruned model (plain module, eval mode), achieved densities, metric, history."""

    model: nn.Module
    densities: dict
    metric: Optional[float]
    history: list


@dataclass
class Sparsified:
    """What :func:`run_sparsify` returns: the plan it ran, its outcome, the allocation's table, budget rounds."""

    plan: dict
    outcome: Outcome
    table: dict
    rounds: list = field(default_factory=list)


def run_plan(problem: SparsifyProblem, plan: dict, schedule, allocation=None, layerwise=None,
             training: Optional[Training] = None, seed: int = 0) -> Outcome:
    """Prune a copy of ``problem.base`` by ``plan``, fine-tune it, measure it.

    Seeds torch's RNG, seeds gradient scores on ``problem.calib_batches`` batches,
    prunes (layer by layer with ``layerwise``, a
    :class:`~sparsecc.sparsify.layerwise.LayerwisePruning`; else the schedule's
    initial pruning), fine-tunes for ``training.steps`` and bakes the masks in.
    """
    training = training or Training()
    work = copy.deepcopy(problem.base)
    torch.manual_seed(seed)
    eng = PruningEngine(work, plan, problem.new_score(), problem.batches, problem.loss_fn, allocation,
                        problem.progress)
    eng.calibrate(problem.calib_batches)
    if layerwise is not None:
        layerwise.prune(eng, eng.final_densities(), problem.base)
    else:
        schedule.prune_initial(eng)
    if training.steps:
        eng.finetune(training, schedule)
    work.eval()
    dens = eng.finish()
    return Outcome(work, dens, problem.measure(work), eng.history)


def run_sparsify(problem: SparsifyProblem, *, schedule, allocation, layerwise=None,
                 training: Optional[Training] = None, accuracy_budget: Optional[float] = None,
                 search_rounds: int = 3, seed: int = 0) -> Sparsified:
    """Allocate densities, then prune, fine-tune and measure; under a budget alone, search.

    Parameters
    ----------
    problem : SparsifyProblem
    schedule : Schedule
    allocation : Allocation
    layerwise : LayerwisePruning, optional
        Prune layer by layer instead of by the schedule's initial pruning.
    training : Training, optional
    accuracy_budget : float, optional
        With ``problem.sparsity``: the largest allowed drop of the metric. Without:
        :func:`~sparsecc.sparsify.budget.search_budget` for the fastest plan within it, or, for
        layer-wise pruning, :func:`~sparsecc.sparsify.budget.search_uniform_budget` and then, with
        ``search_rounds`` > 0, :func:`~sparsecc.sparsify.budget.search_mixed_budget` from its plan.
    search_rounds : int
        Measured rounds of the budget search over per-layer choices (layer-wise pruning: after the
        uniform search; 0 keeps the uniform plan).
    seed : int

    Raises
    ------
    AccuracyBudgetError
        The plan's measured drop exceeds the budget, or no plan meets it.
    InvalidSparsityError
        From the allocation (see its ``check`` and ``allocate``).
    """
    searched_uniform = problem.sparsity is None and layerwise is not None
    if not searched_uniform:
        allocation.check(problem)
    torch.manual_seed(seed)
    problem.metric_dense = problem.measure(problem.base)
    table = {} if searched_uniform else allocation.measure(problem)

    def run(plan: dict) -> Outcome:
        return run_plan(problem, plan, schedule, allocation, layerwise, training, seed)

    if searched_uniform:
        plan, outcome, rounds = search_uniform_budget(problem, accuracy_budget, problem.metric_dense, run)
        if search_rounds > 0 and len(problem.layers) > 1:
            grid = replace(problem, densities=tuple(sorted({round(1.0 - s, 6) for s in SEARCH_SPARSITIES}
                                                          | set(problem.densities), reverse=True)))
            calib = [b[0] for b in first_batches(problem.data, problem.example_inputs, problem.calib_batches)]
            table = layerwise.error_table(problem.base, problem.layers, grid.candidates, calib, problem.new_score())
            plan, outcome, mixed = search_mixed_budget(grid, table, (plan, outcome), accuracy_budget,
                                                       problem.metric_dense, run, search_rounds)
            rounds = rounds + [dict(r, round=len(rounds) + i) for i, r in enumerate(mixed)]
        return Sparsified(plan, outcome, table, rounds)
    if problem.sparsity is None:
        plan, outcome, rounds = search_budget(problem.options(table), accuracy_budget, problem.metric_dense, run,
                                              search_rounds)
        return Sparsified(plan, outcome, table, rounds)
    plan = allocation.allocate(problem, table)
    outcome = run(plan)
    if accuracy_budget is not None and problem.metric_dense - outcome.metric > accuracy_budget + 1e-12:
        raise AccuracyBudgetError(
            f"sparsity {problem.sparsity} costs {problem.metric_dense - outcome.metric:.4f} of the metric "
            f"({problem.metric_dense:.4f} -> {outcome.metric:.4f}), more than accuracy_budget={accuracy_budget}; "
            f"lower the sparsity, raise finetune_steps or the budget")
    return Sparsified(plan, outcome, table, [])
