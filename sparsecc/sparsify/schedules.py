"""Sparsity schedules: when the pruning engine prunes, relative to fine-tuning.

A schedule is a small object with one interface, the hooks that
:meth:`PruningEngine.finetune <sparsecc.sparsify.engine.PruningEngine.finetune>`
calls around every optimizer step:

* :meth:`Schedule.prune_initial`: before fine-tuning (and without it);
* :meth:`Schedule.start`: fine-tuning of ``steps`` steps begins;
* :meth:`Schedule.before_step`: before step ``t``'s forward pass;
* :meth:`Schedule.after_backward`: after step ``t``'s backward pass, before the optimizer step;
* :meth:`Schedule.finish`: after the last step.

:class:`OneShot` prunes once before fine-tuning, :class:`Gradual` follows the
cubic schedule of Zhu & Gupta (2017), :class:`RigL` prunes once and then moves
connections at constant density (Evci et al. 2020). :data:`SCHEDULES` maps the
``schedule=`` names of :func:`sparsecc.sparsify` to the classes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import InvalidSparsityError
from .masks import original_weight, set_mask
from .patterns import Pattern, as_matrix, expand_groups, from_matrix, group_scores


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, start: int = 0,
                   n_steps: int = 10, frequency: int = 1) -> float:
    """Sparsity of the gradual pruning schedule at training step ``step``.

    ``s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))³`` for
    ``t ∈ {t0, t0 + Δt, ..., t0 + n·Δt}``, held constant between pruning
    steps: fast pruning while many redundant weights remain, slowing down near
    the final sparsity.

    Parameters
    ----------
    step : int
        Training step t.
    final, initial : float
        s_f and s_i, sparsities in [0, 1).
    start : int
        t0, the step of the first pruning.
    n_steps : int
        n, the number of pruning steps after t0.
    frequency : int
        Δt, training steps between pruning steps.

    Returns
    -------
    float: the sparsity in force at ``step`` (``initial`` before t0, ``final`` after t0 + n·Δt).

    Raises
    ------
    InvalidSparsityError
        ``n_steps`` or ``frequency`` below 1.

    Source: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
    pruning for model compression" (ICLR workshop 2018, arXiv 2017), eq. (1).
    """
    if n_steps < 1 or frequency < 1:
        raise InvalidSparsityError(f"cubic schedule needs n_steps ≥ 1 and frequency ≥ 1, got {n_steps}, {frequency}")
    if step < start:
        return initial
    k = min((step - start) // frequency, n_steps)
    return final + (initial - final) * (1.0 - k / n_steps) ** 3


def pruning_steps(start: int, n_steps: int, frequency: int) -> list[int]:
    """Training steps at which the cubic schedule prunes: t0, t0 + Δt, ..., t0 + n·Δt."""
    return [start + i * frequency for i in range(n_steps + 1)]


def rigl_drop_fraction(step: int, alpha: float, end: int) -> float:
    """RigL's cosine-decayed update fraction ``α/2 · (1 + cos(π t / T_end))`` (0 after T_end).

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), eq. (1).
    """
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, dense_grad: torch.Tensor, fraction: float,
                pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """One RigL connectivity update of a layer, at constant density.

    Drops the ``k = ⌊fraction · active⌋`` active groups of lowest magnitude and
    grows the ``k`` groups (among those not active after the drop) of highest
    gradient magnitude; grown weights start at zero.

    Parameters
    ----------
    weight : Tensor, the layer weight's shape (C_out, ...)
    mask : Tensor, same shape, 1 kept / 0 pruned
    dense_grad : Tensor, same shape
        ``∂L/∂w`` of the masked weight, *before* masking (pruned weights get one too).
    fraction : float in [0, 1]
    pattern : Pattern
        Unstructured, block or channel (groups are updated as units).

    Returns
    -------
    (new mask, grown): both the weight's shape; ``grown`` is 1 where a weight was regrown.

    Raises
    ------
    InvalidSparsityError
        An N:M pattern (its groups are fixed).

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020), algorithm 1.
    """
    if pattern.kind == "n:m":
        raise InvalidSparsityError("RigL keeps N:M groups fixed; use pattern 'unstructured', 'block' or 'channel'")
    shape = weight.shape
    m = as_matrix(mask.to(torch.float32))
    mag = group_scores(as_matrix(weight.detach().abs()), pattern)
    grad = group_scores(as_matrix(dense_grad.detach().abs()), pattern)
    active = group_scores(m, pattern) > 0.5
    flat_active = active.flatten()
    n_active = int(flat_active.sum())
    k = int(math.floor(fraction * n_active))
    k = min(k, flat_active.numel() - n_active + k)  # cannot grow more than there is room for
    if k <= 0:
        return mask.clone(), torch.zeros_like(mask)
    mag_f = mag.flatten().clone()
    mag_f[~flat_active] = float("inf")
    drop = torch.topk(mag_f, k, largest=False).indices
    after = flat_active.clone()
    after[drop] = False
    grad_f = grad.flatten().clone()
    grad_f[after] = -float("inf")
    grow = torch.topk(grad_f, k).indices
    new = after.clone()
    new[grow] = True
    grown = torch.zeros_like(new)
    grown[grow] = True
    to_full = lambda g: from_matrix(expand_groups(g.reshape(active.shape), pattern, tuple(m.shape)).to(mask.dtype), shape)
    return to_full(new), to_full(grown)


class Schedule:
    """When to prune: hooks called by the pruning engine before, during and after fine-tuning.

    The base class prunes every layer to its final density before fine-tuning and
    does nothing during it. Objects keep the state of the fine-tuning in progress
    (set by :meth:`start`), so one object serves one fine-tuning at a time.
    """

    name = "schedule"
    #: Whether it prunes during fine-tuning (and so needs ``finetune_steps > 0``).
    needs_training = False
    #: Whether fine-tuning must record the dense gradients ``∂L/∂w_eff`` for it.
    captures_grad = False

    def prune_initial(self, engine) -> None:
        """Before fine-tuning: prune every layer of ``engine.plan`` to its final density."""
        engine.prune_to_density(engine.final_densities())

    def start(self, steps: int) -> None:
        """Fine-tuning of ``steps`` optimizer steps begins."""

    def before_step(self, engine, t: int) -> None:
        """Before the forward pass of step ``t`` (0-based)."""

    def after_backward(self, engine, t: int, optimizer: torch.optim.Optimizer) -> None:
        """After the backward pass of step ``t``, before ``optimizer.step()``."""

    def finish(self, engine) -> None:
        """After the last fine-tuning step."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OneShot(Schedule):
    """Prune once to the final densities, then fine-tune (if at all) at those masks.

    Source: Han et al., "Learning both Weights and Connections for Efficient
    Neural Networks" (NeurIPS 2015), one prune-retrain round.
    """

    name = "oneshot"


class Gradual(Schedule):
    """Zhu & Gupta's cubic schedule during fine-tuning (:func:`cubic_sparsity`).

    Over the first ``prune_fraction`` of the ``steps`` fine-tuning steps, every
    layer is pruned ``n = min(prune_events, that many steps)`` times, every
    ``Δt = ⌊that many steps / n⌋`` steps from step 0 on, to the cubic schedule's
    sparsity towards its final one; after the last step, to the final density
    exactly. N:M layers (fixed density) are pruned to N/M at step 0, as NVIDIA's
    ASP does.

    Parameters
    ----------
    prune_events : int
        n, pruning steps after the first.
    prune_fraction : float in (0, 1]
        Fraction of fine-tuning over which the pruning steps are spread.

    Source: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
    pruning for model compression" (ICLR workshop 2018, arXiv 2017).
    """

    name = "gradual"
    needs_training = True

    def __init__(self, prune_events: int = 10, prune_fraction: float = 0.7):
        self.prune_events, self.prune_fraction = prune_events, prune_fraction
        self.n_events, self.frequency, self.events = 1, 1, set()

    def prune_initial(self, engine) -> None:
        """Nothing: the first pruning step is fine-tuning step 0."""

    def start(self, steps: int) -> None:
        prune_end = max(1, int(self.prune_fraction * steps))
        self.n_events = max(1, min(self.prune_events, prune_end))
        self.frequency = max(1, prune_end // self.n_events)
        self.events = set(pruning_steps(0, self.n_events, self.frequency))

    def densities_at(self, plan: dict, t: int) -> dict:
        """Per-layer density in force at step ``t``: ``{name: 1 - s_t}`` (N:M layers at N/M).

        Parameters
        ----------
        plan : dict name -> (Pattern, final density)
        t : int
        """
        return {n: d if p.kind == "n:m" else
                1.0 - cubic_sparsity(t, 1.0 - d, n_steps=self.n_events, frequency=self.frequency)
                for n, (p, d) in plan.items()}

    def before_step(self, engine, t: int) -> None:
        if t in self.events:
            engine.prune_to_density(self.densities_at(engine.plan, t))
            if engine.score.resets_on_prune:
                engine.score.reset()

    def finish(self, engine) -> None:
        """Prune to the final densities, reached even by runs too short for every pruning step."""
        engine.prune_to_density(engine.final_densities())

    def __repr__(self) -> str:
        return f"Gradual(prune_events={self.prune_events}, prune_fraction={self.prune_fraction})"


class RigL(Schedule):
    """RigL dynamic sparse training: prune once, then drop and regrow connections at constant density.

    Every ``every`` steps before ``prune_fraction`` of fine-tuning (not at step 0),
    each layer drops the :func:`rigl_drop_fraction` of its active groups of lowest
    magnitude and regrows as many of highest dense gradient (:func:`rigl_update`);
    regrown weights and their optimizer state start at zero.

    Parameters
    ----------
    alpha : float in [0, 1]
        α, the initial update fraction (cosine-decayed to 0).
    every : int, optional
        ΔT, steps between updates; default a tenth of the update period (at least 1).
    prune_fraction : float in (0, 1]
        T_end as a fraction of the fine-tuning steps.

    Source: Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020).
    """

    name = "rigl"
    needs_training = True
    captures_grad = True

    def __init__(self, alpha: float = 0.3, every: Optional[int] = None, prune_fraction: float = 0.7):
        self.alpha, self.every, self.prune_fraction = alpha, every, prune_fraction
        self.end, self.interval = 1, 1

    def start(self, steps: int) -> None:
        self.end = max(1, int(self.prune_fraction * steps))
        self.interval = self.every or max(1, self.end // 10)

    def after_backward(self, engine, t: int, optimizer: torch.optim.Optimizer) -> None:
        if t > 0 and t % self.interval == 0 and t < self.end:
            self.regrow(engine, rigl_drop_fraction(t, self.alpha, self.end), optimizer)

    @staticmethod
    def regrow(engine, fraction: float, optimizer: torch.optim.Optimizer) -> None:
        """One :func:`rigl_update` of every layer with a recorded dense gradient; zero what regrows.

        Regrown weights, their gradients and their optimizer state (tensors of the
        weight's shape, e.g. Adam's moments) are set to 0.
        """
        for n, mod in engine.layers.items():
            wm = engine.masks[n]
            if wm.dense_grad is None:
                continue
            w = original_weight(mod)
            new, grown = rigl_update(w.detach() * wm.mask, wm.mask, wm.dense_grad, fraction, engine.plan[n][0])
            grown_b = grown > 0
            with torch.no_grad():
                w[grown_b] = 0.0
                if w.grad is not None:
                    w.grad[grown_b] = 0.0
            for v in optimizer.state.get(w, {}).values():  # fresh optimizer state for regrown weights
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    v[grown_b] = 0.0
            set_mask(mod, new > 0)

    def __repr__(self) -> str:
        return f"RigL(alpha={self.alpha}, every={self.every}, prune_fraction={self.prune_fraction})"


#: Schedule names accepted by :func:`sparsecc.sparsify`.
SCHEDULES = {"oneshot": OneShot, "gradual": Gradual, "rigl": RigL}
