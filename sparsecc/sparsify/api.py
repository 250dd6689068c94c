"""``sparsecc.sparsify``: choose what to prune and how much per layer, prune, recover accuracy."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..errors import (AccuracyBudgetError, DataError, InvalidSparsityError, TrainingError, UnknownLayerError)
from ..ir.capture import normalize_inputs
from .masks import attach_masks, original_weight, prunable_layers, set_capture, set_mask, strip_masks
from .patterns import (UNSTRUCTURED, Pattern, as_matrix, check_sparsity_value, from_matrix, global_keep, group_scores, mask_from_scores,
                       parse_pattern)
from .rigl import erk_densities, rigl_update
from .schedule import REGULARIZERS, cubic_sparsity, regularization_penalty, rigl_drop_fraction
from .reconstruct import collect_statistics, layer_keep, output_error, solve_kept
from .scores import SCORES, ImportanceScore
from .select import Option, select_for_sparsity, select_under_budget
from .sensitivity import candidate_key, model_fingerprint, sensitivity_analysis

#: Densities tried per layer by the sensitivity analysis (1.0, dense, is always an option).
CANDIDATE_DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05)
SCHEDULES = ("oneshot", "gradual", "rigl")
ALLOCATIONS = ("uniform", "global", "sensitivity", "error")


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
            key = candidate_key(parse_pattern(c.pattern), c.density) if c.pattern != "dense" else None
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
# inputs and data


def _layer_rows(model: nn.Module, layers: dict, example_inputs) -> dict:
    """M of each layer's GEMM at the example input, found with forward hooks (also checks the model runs)."""
    rows, hooks = {}, []
    for name, mod in layers.items():
        def hook(m, inp, out, name=name):
            if isinstance(m, nn.Conv2d):
                rows[name] = int(out.numel() // out.shape[-3])
            else:
                rows[name] = int(inp[0].numel() // inp[0].shape[-1])
        hooks.append(mod.register_forward_hook(hook))
    args, kwargs = normalize_inputs(example_inputs)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        raise DataError(f"the model failed on example_inputs: {type(e).__name__}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    return rows


def _tensors(x, prefix="input") -> list:
    args, kwargs = normalize_inputs(x)
    out = [(f"{prefix} {i}", t) for i, t in enumerate(args)]
    out += [(f"{prefix} {k!r}", t) for k, t in kwargs.items()]
    return out


def _check_batch(batch, example_inputs, index: int):
    """Split a data batch into (inputs, target) and check it against the example inputs."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise DataError(f"data batch {index}: expected a pair (inputs, target), got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    inputs, target = batch
    try:
        got = _tensors(inputs)
    except Exception as e:
        raise DataError(f"data batch {index}: {e}") from None
    want = _tensors(example_inputs)
    if len(got) != len(want):
        raise DataError(f"data batch {index}: {len(got)} inputs, but example_inputs has {len(want)}")
    for (gname, g), (_, w) in zip(got, want):
        if not isinstance(g, torch.Tensor) or not isinstance(w, torch.Tensor):
            continue
        if g.dim() != w.dim() or g.dtype != w.dtype:
            raise DataError(f"data batch {index}: {gname} is {g.dtype} of shape {tuple(g.shape)}, but the "
                            f"example input is {w.dtype} of shape {tuple(w.shape)}")
        if g.dim() >= 3 and tuple(g.shape[1:]) != tuple(w.shape[1:]):
            raise DataError(f"data batch {index}: {gname} has shape {tuple(g.shape)}, the example input "
                            f"{tuple(w.shape)}: all dims but the batch dim must match")
    return inputs, target


class _Batches:
    """Endless iterator over ``data`` (re-iterated every epoch), checking every batch's structure."""

    def __init__(self, data: Iterable, example_inputs):
        self.data, self.example = data, example_inputs
        self.it, self.index = None, 0

    def next(self):
        for attempt in range(2):
            if self.it is None:
                self.it = iter(self.data)
            try:
                batch = next(self.it)
                break
            except StopIteration:
                self.it = None
                if attempt == 1 or self.index == 0:
                    raise DataError("data yielded no batches") from None
        out = _check_batch(batch, self.example, self.index)
        self.index += 1
        return out


def _first_batches(data: Iterable, example_inputs, n: int) -> list:
    """The first ``max(1, n)`` batches of ``data`` (cycling if it has fewer), checked."""
    it = _Batches(data, example_inputs)
    return [it.next() for _ in range(max(1, n))]


def _forward_loss(model, inputs, target, loss_fn, where: str) -> torch.Tensor:
    args, kwargs = normalize_inputs(inputs)
    try:
        out = model(*args, **kwargs)
    except Exception as e:
        raise DataError(f"{where}: the model failed on this batch: {type(e).__name__}: {e}") from e
    try:
        loss = loss_fn(out, target)
    except Exception as e:
        raise DataError(f"{where}: loss_fn failed: {type(e).__name__}: {e}") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DataError(f"{where}: loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(f"{where}: the loss is {float(loss.detach())}; lower the learning rate or check loss_fn "
                            f"(the user's model is untouched)")
    return loss


# ----------------------------------------------------------------------------------------------
# the pruning engine


def _execution_order(model: nn.Module, names: list, inputs, call) -> list:
    """``names`` in the order their modules first run on ``inputs`` (never-run ones last)."""
    order, hooks = [], []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: order.append(n) if n not in order else None))
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in names if n not in order]


class _Engine:
    """Masks, scores and the fine-tuning loop on a working copy of the model."""

    def __init__(self, model: nn.Module, layer_names: list, plan: dict, score: ImportanceScore,
                 batches: Optional[_Batches], loss_fn, opts: dict):
        self.model = model
        self.layers = {n: mod for n, mod in prunable_layers(model).items() if n in layer_names}
        self.plan = plan  # name -> (Pattern, final density)
        self.score = score
        self.batches = batches
        self.loss_fn = loss_fn
        self.o = opts
        self.masks = attach_masks(self.layers)
        self.history: list = []

    # -- scores and masks
    def _accumulate(self) -> None:
        for n, wm in self.masks.items():
            if wm.dense_grad is not None:
                self.score.accumulate(n, self.layers[n].weight.detach(), wm.dense_grad)
                wm.dense_grad = None

    def calibrate(self, n_batches: int) -> None:
        """Accumulate gradient-based scores over ``n_batches`` batches (no optimizer step)."""
        if not self.score.needs_grad:
            return
        if self.batches is None or self.loss_fn is None:
            raise InvalidSparsityError(f"method {self.score.name!r} needs data and loss_fn for its gradients")
        set_capture(self.masks, True)
        for i in range(n_batches):
            inputs, target = self.batches.next()
            self.model.zero_grad(set_to_none=True)
            _forward_loss(self.model, inputs, target, self.loss_fn, f"calibration batch {i}").backward()
            self._accumulate()
        self.model.zero_grad(set_to_none=True)
        set_capture(self.masks, False)

    def prune_to(self, densities: dict) -> None:
        """Set each layer's mask to its density from current scores; pruned weights stay pruned."""
        for n, d in densities.items():
            pattern = self.plan[n][0]
            mod = self.layers[n]
            w = mod.weight.detach()
            sc = self.score.score(n, w).clone().to(torch.float32)
            sc[self.masks[n].mask == 0] = -float("inf")
            keep = from_matrix(mask_from_scores(as_matrix(sc), d, pattern), w.shape)
            set_mask(mod, keep & (self.masks[n].mask > 0) if pattern.kind != "n:m" else keep)

    def prune_layerwise(self, densities: dict, reference: nn.Module, n_batches: int, refit: bool,
                        damp: float) -> None:
        """Prune layer by layer in execution order; with ``refit``, refit each by least squares to the dense outputs.

        See :mod:`sparsecc.sparsify.reconstruct`. Calibration inputs are the next
        ``n_batches`` data batches (the same ones for every layer); the mask comes from
        :func:`~sparsecc.sparsify.reconstruct.layer_keep` (the engine's score, Wanda for
        ``method="activation"``, SparseGPT for ``method="sparsegpt"``).
        """
        if self.batches is None:
            raise DataError("layer-wise pruning (reconstruct=True or method='activation') needs data= "
                            "(calibration inputs)")
        calib = [self.batches.next()[0] for _ in range(max(1, n_batches))]

        def call(model, inputs):
            args, kwargs = normalize_inputs(inputs)
            return model(*args, **kwargs)

        order = _execution_order(self.model, [n for n in densities], calib[0], call)
        was = self.model.training
        self.model.eval()
        from tqdm.auto import tqdm

        for n in tqdm(order, desc="prune + reconstruct", disable=not self.o["progress"], leave=False):
            mod = self.layers[n]
            stats = collect_statistics(self.model, reference, n, calib, call)
            w = original_weight(mod)
            wm = as_matrix(w.detach())
            sc = None if self.score.needs_inputs else as_matrix(self.score.score(n, w.detach()).to(torch.float32))
            keep = layer_keep(self.score.name, wm, stats, densities[n], self.plan[n][0], sc, damp)
            if refit:
                with torch.no_grad():
                    w.copy_(from_matrix(solve_kept(wm, keep, stats, damp), w.shape))
            set_mask(mod, from_matrix(keep, w.shape))
        self.model.train(was)

    def global_densities(self, density: float) -> dict:
        """Per-layer densities of one score threshold over all layers keeping ``density`` of their weights."""
        scores, areas = {}, {}
        for n, mod in self.layers.items():
            w = mod.weight.detach()
            sc = self.score.score(n, w).clone().to(torch.float32)
            sc[self.masks[n].mask == 0] = -float("inf")
            scores[n] = group_scores(as_matrix(sc), self.plan[n][0])
            areas[n] = w.numel() // scores[n].numel()
        keep = global_keep(scores, areas, density)
        return {n: float(keep[n].sum()) * areas[n] / self.layers[n].weight.numel() for n in scores}

    def prune_to_density(self, densities: dict) -> None:
        """:meth:`prune_to`, or with global allocation one threshold over all layers at their mean density."""
        if self.o.get("allocation") == "global":
            total = sum(self.layers[n].weight.numel() for n in densities)
            overall = sum(d * self.layers[n].weight.numel() for n, d in densities.items()) / total
            densities = self.global_densities(overall)
        self.prune_to(densities)

    def density(self) -> float:
        kept = sum(float(wm.mask.sum()) for wm in self.masks.values())
        return kept / max(1, sum(wm.mask.numel() for wm in self.masks.values()))

    # -- fine-tuning
    def finetune(self, steps: int, schedule: str) -> None:
        o = self.o
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = o["optimizer"](params) if o["optimizer"] else torch.optim.Adam(params, lr=o["lr"])
        finals = {n: d for n, (p, d) in self.plan.items()}
        nm = {n for n, (p, d) in self.plan.items() if p.kind == "n:m"}
        prune_end = max(1, int(o["prune_fraction"] * steps))
        n_events = max(1, min(o["prune_events"], prune_end))
        freq = max(1, prune_end // n_events)
        rigl_every = o["rigl_every"] or max(1, prune_end // 10)
        from tqdm.auto import tqdm

        self.model.train()
        set_capture(self.masks, self.score.needs_grad or schedule == "rigl")
        bar = tqdm(range(steps), desc=f"fine-tune ({schedule})", disable=not o["progress"], leave=False)
        for t in bar:
            if schedule == "gradual" and t % freq == 0 and t // freq <= n_events:
                self.prune_to_density({n: (finals[n] if n in nm else
                                   1.0 - cubic_sparsity(t, 1.0 - finals[n], n_steps=n_events, frequency=freq))
                               for n in finals})
                if self.score.name == "impact":
                    self.score.reset()
            inputs, target = self.batches.next()
            opt.zero_grad(set_to_none=True)
            loss = _forward_loss(self.model, inputs, target, self.loss_fn, f"fine-tuning step {t}")
            total = loss
            if o["regularization"] != "none":
                eff = {n: mod.weight for n, mod in self.layers.items()}
                total = loss + o["reg_strength"] * regularization_penalty(
                    o["regularization"], eff, self._reg_pattern())
            total.backward()
            if schedule == "rigl" and t > 0 and t % rigl_every == 0 and t < prune_end:
                self._rigl_step(t, prune_end, opt)
            self._accumulate()
            opt.step()
            self.history.append({"step": t, "loss": float(loss.detach()), "density": self.density()})
            if t % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", density=f"{self.density():.3f}")
        bar.close()
        set_capture(self.masks, False)
        if schedule == "gradual":  # make sure the final density is reached even for short runs
            self.prune_to_density(finals)

    def _reg_pattern(self) -> Pattern:
        pats = {p for p, _ in self.plan.values()}
        return pats.pop() if len(pats) == 1 else UNSTRUCTURED

    def _rigl_step(self, t: int, end: int, opt) -> None:
        frac = rigl_drop_fraction(t, self.o["rigl_alpha"], end)
        for n, mod in self.layers.items():
            wm = self.masks[n]
            if wm.dense_grad is None:
                continue
            w = original_weight(mod)
            new, grown = rigl_update(w.detach() * wm.mask, wm.mask, wm.dense_grad, frac, self.plan[n][0])
            grown_b = grown > 0
            with torch.no_grad():
                w[grown_b] = 0.0
                if w.grad is not None:
                    w.grad[grown_b] = 0.0
            for v in opt.state.get(w, {}).values():  # fresh optimizer state for regrown weights
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    v[grown_b] = 0.0
            set_mask(mod, new > 0)

    def finish(self) -> dict:
        """Bake masks into the weights; returns the achieved density per layer."""
        dens = {n: float(wm.mask.mean()) for n, wm in self.masks.items()}
        strip_masks(self.layers)
        return dens


# ----------------------------------------------------------------------------------------------
# latency of options


def _latency_fn(tgt, infos: dict) -> Callable[[str, Optional[Pattern], float], float]:
    """ms of a layer at (pattern, density) from the target's cost model (the faster of sparse and dense)."""
    cost = tgt.cost_model()

    def lat(name: str, pattern: Optional[Pattern], density: float) -> float:
        kind, (n, k), m = infos[name]
        dense = cost.estimate_ms("dense", n, k, m)
        if pattern is None or density >= 1.0 or kind != "linear":
            return dense  # sparse convolutions arrive with issue #4: a pruned conv runs dense
        nnz = max(0, int(round(density * n * k)))
        if pattern.kind == "block" and cost.has("bsr", pattern.block):
            b = pattern.block
            return min(dense, cost.estimate_ms("bsr", n, k, m, nnz // (b[0] * b[1]), b))
        if cost.has("csr", (1, 1)):
            return min(dense, cost.estimate_ms("csr", n, k, m, nnz, (1, 1)))
        return dense

    return lat


def _error_table(base: nn.Module, layers: dict, cands: Callable, calib: list, score: ImportanceScore,
                 refit: bool, damp: float, progress: bool) -> dict:
    """Relative output error of each layer at each candidate, pruned alone in the dense model.

    Returns ``{layer: {candidate_key: error}}`` with the error of
    :func:`~sparsecc.sparsify.reconstruct.output_error` on the calibration inputs,
    the mask of the layer-wise method and, with ``refit``, least-squares weights.
    """

    def call(model, inputs):
        args, kwargs = normalize_inputs(inputs)
        return model(*args, **kwargs)

    from tqdm.auto import tqdm

    table = {}
    for n in tqdm(list(layers), desc="output error per density", disable=not progress, leave=False):
        stats = collect_statistics(base, base, n, calib, call)
        wm = as_matrix(layers[n].weight.detach())
        sc = None if score.needs_inputs else as_matrix(score.score(n, layers[n].weight.detach()).float())
        row = {}
        for p, d in cands(n):
            keep = layer_keep(score.name, wm, stats, d, p, sc, damp)
            new = solve_kept(wm, keep, stats, damp) if refit else wm * keep
            row[candidate_key(p, d)] = output_error(wm, new, stats)
        table[n] = row
    return table


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
        target's fastest block shape, per layer.
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
        the predicted budget by how much the measured drop left unused.
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
    # ---- validate everything before any work
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
        raise InvalidSparsityError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if regularization not in REGULARIZERS:
        raise InvalidSparsityError(f"regularization must be one of {REGULARIZERS}, got {regularization!r}")
    if layer_densities not in ("uniform", "erk"):
        raise InvalidSparsityError(f"layer_densities must be 'uniform' or 'erk', got {layer_densities!r}")
    if finetune_steps < 0:
        raise InvalidSparsityError(f"finetune_steps must be ≥ 0, got {finetune_steps}")
    needs_data = finetune_steps > 0 or SCORES[method].needs_grad
    if needs_data and (data is None or loss_fn is None):
        raise DataError(f"method {method!r} with finetune_steps={finetune_steps} needs data= and loss_fn=")
    if schedule in ("gradual", "rigl") and finetune_steps == 0:
        raise InvalidSparsityError(f"schedule {schedule!r} prunes during fine-tuning: set finetune_steps > 0")
    if allocation is None:
        allocation = "sensitivity" if (pattern == "auto" or accuracy_budget is not None) else "uniform"
    if allocation not in ALLOCATIONS:
        raise InvalidSparsityError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    layerwise = bool(reconstruct) or SCORES[method].needs_inputs
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
        raise InvalidSparsityError("per-layer choice by sensitivity (pattern='auto' or a budget) needs eval_fn; "
                                   "give eval_fn or an explicit pattern")
    if not isinstance(model, nn.Module):
        raise InvalidSparsityError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    from ..targets.base import resolve_target

    tgt = resolve_target(target) if isinstance(target, str) else target
    was_training = model.training
    base = copy.deepcopy(model)
    base.eval()
    all_layers = prunable_layers(base)
    if layers is not None:
        unknown = [n for n in layers if n not in all_layers]
        if unknown:
            raise UnknownLayerError(f"no prunable layer named {unknown[0]!r}; prunable layers are: "
                                    f"{', '.join(all_layers) or 'none'}")
        all_layers = {n: all_layers[n] for n in layers}
    if not all_layers:
        raise InvalidSparsityError("the model has no prunable layer (Linear or Conv2d with float weights)")
    rows = _layer_rows(base, all_layers, example_inputs)
    infos = {n: ("conv" if isinstance(mod, nn.Conv2d) else "linear", tuple(as_matrix(mod.weight).shape),
                 rows.get(n, 1)) for n, mod in all_layers.items()}
    latency = _latency_fn(tgt, infos)
    if data is not None:
        _check_batch(next(iter(data)), example_inputs, 0)

    # ---- candidate patterns
    lin_shapes = [infos[n][1] for n in all_layers if infos[n][0] == "linear"]
    lin_rows = max([infos[n][2] for n in all_layers if infos[n][0] == "linear"], default=1)
    if pattern == "auto":
        blk = tgt.prune_block(lin_shapes, 1.0 - (sparsity or 0.8), lin_rows) if lin_shapes else (4, 1)
        patterns = [UNSTRUCTURED] + ([Pattern("block", block=tuple(blk))] if tuple(blk) != (1, 1) else [])
    elif pattern == "block" and block_shape is None:
        patterns = [parse_pattern("block", tgt.prune_block(lin_shapes, 1.0 - (sparsity or 0.8), lin_rows)
                                  if lin_shapes else (4, 1))]
    else:
        patterns = [parse_pattern(pattern, block_shape)]
    fixed = patterns[0].fixed_density
    if fixed is not None and sparsity is not None and abs((1 - fixed) - sparsity) > 1e-9 and allocation == "uniform":
        raise InvalidSparsityError(f"pattern {patterns[0]} has sparsity {1 - fixed:.3f}, not {sparsity}")

    def fit(name: str, p: Pattern) -> bool:
        return p.fits(infos[name][1])

    def cands(name: str) -> list:
        out = []
        for p in patterns:
            if not fit(name, p):
                continue
            out += [(p, p.fixed_density)] if p.fixed_density is not None else [(p, d) for d in densities]
        return out

    torch.manual_seed(seed)
    score = SCORES[method]()
    metric_dense = float(eval_fn(base)) if eval_fn is not None else None
    batches = _Batches(data, example_inputs) if data is not None else None
    opts = dict(lr=lr, optimizer=optimizer, regularization=regularization, reg_strength=reg_strength,
                prune_events=prune_events, prune_fraction=prune_fraction, rigl_alpha=rigl_alpha,
                rigl_every=rigl_every, progress=progress, allocation=allocation)
    names = list(all_layers)

    # ---- sensitivity analysis
    sens: dict = {}
    if allocation == "sensitivity":
        probe = _Engine(copy.deepcopy(base), names, {n: (UNSTRUCTURED, 1.0) for n in names}, score, batches,
                        loss_fn, opts)
        probe.calibrate(calib_batches)
        strip_masks(probe.layers)
        from ..runtime.kernels import cache_root

        root = Path(cache_dir) if cache_dir is not None else cache_root() / "sensitivity"
        key = "%s-%s-%s-%s" % (model_fingerprint(probe.layers), method, metric_dense,
                               "|".join(candidate_key(p, d) for n in names for p, d in cands(n)))
        import hashlib

        path = root / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        probe.model.eval()
        table = sensitivity_analysis(probe.layers, {n: cands(n) for n in names}, score.score,
                                     lambda: eval_fn(probe.model), path, progress)
        sens = table["drop"]
        score.reset()

    def options_of(name: str) -> list:
        n_el = math.prod(infos[name][1])
        opts_ = [Option("dense", latency(name, None, 1.0), 0.0, n_el)]
        for p, d in cands(name):
            k = candidate_key(p, d)
            opts_.append(Option(k, latency(name, p, d), sens.get(name, {}).get(k, 0.0), int(round(d * n_el))))
        return opts_

    def plan_from(choice: dict) -> dict:
        plan = {}
        for n, o in choice.items():
            if o.key == "dense":
                continue
            ptxt, dtxt = o.key.split("@")
            plan[n] = (parse_pattern(ptxt.replace("block ", "")), float(dtxt))
        return plan

    # ---- per-layer plan
    if allocation in ("uniform", "global"):
        if allocation == "global" and patterns[0].kind == "n:m":
            raise InvalidSparsityError("N:M patterns fix every layer's density: use allocation='uniform'")
        plan = {}
        if schedule == "rigl" and layer_densities == "erk":
            dens = erk_densities({n: tuple(all_layers[n].weight.shape) for n in names}, 1.0 - sparsity)
        else:
            dens = {n: fixed if fixed is not None else 1.0 - sparsity for n in names}
        for n in names:
            p = patterns[0]
            if not fit(n, p):
                p = UNSTRUCTURED if p.kind != "n:m" else None  # a block that does not divide: single weights
            if p is not None and dens[n] < 1.0:
                plan[n] = (p, dens[n])
        if not plan and sparsity > 0:
            raise InvalidSparsityError(f"pattern {patterns[0]} fits no prunable layer of the model")
        plans = [plan]
    elif allocation == "error":
        calib = [b[0] for b in _first_batches(data, example_inputs, calib_batches)]
        sens = _error_table(base, all_layers, cands, calib, score, bool(reconstruct), damp, progress)
        plans = [plan_from(select_for_sparsity({n: options_of(n) for n in names}, sparsity))]
    elif sparsity is not None:
        plans = [plan_from(select_for_sparsity({n: options_of(n) for n in names}, sparsity))]
    else:
        plans = None  # budget search below

    def run(plan: dict) -> tuple:
        work = copy.deepcopy(base)
        torch.manual_seed(seed)
        eng = _Engine(work, list(plan), plan, SCORES[method](), batches, loss_fn, opts)
        eng.calibrate(calib_batches)
        if layerwise:
            eng.prune_layerwise({n: d for n, (p, d) in plan.items()}, base, calib_batches, bool(reconstruct), damp)
        elif schedule != "gradual":
            eng.prune_to_density({n: d for n, (p, d) in plan.items()})
        if finetune_steps:
            eng.finetune(finetune_steps, schedule)
        work.eval()
        dens = eng.finish()
        metric = float(eval_fn(work)) if eval_fn is not None else None
        return work, dens, metric, eng.history

    rounds = []
    if plans is not None:
        work, dens, metric, hist = run(plans[0])
        plan = plans[0]
        if accuracy_budget is not None and metric_dense - metric > accuracy_budget + 1e-12:
            raise AccuracyBudgetError(
                f"sparsity {sparsity} costs {metric_dense - metric:.4f} of the metric "
                f"({metric_dense:.4f} -> {metric:.4f}), more than accuracy_budget={accuracy_budget}; "
                f"lower the sparsity, raise finetune_steps or the budget")
    else:
        options = {n: options_of(n) for n in names}
        # search the scale of the predicted budget: the sensitivity drops (one-shot, no fine-tuning) overstate
        # the drop left after fine-tuning, so a larger predicted budget may still meet the measured one
        lo = hi = None  # largest scale known to pass, smallest known to fail
        scale, best, tries, lam = 1.0, None, 0, 0.0

        def penalized(opts: dict, lam_: float) -> dict:
            if lam_ == 0:
                return opts
            return {n: [Option(o.key, o.latency_ms, max(o.drop, 0.0) + lam_ * (1 - o.kept / max(1, os_[0].kept)),
                               o.kept) for o in os_] for n, os_ in opts.items()}

        while len(rounds) < max(1, search_rounds) and tries < 30:
            tries += 1
            choice = select_under_budget(penalized(options, lam), accuracy_budget * scale)
            plan = plan_from(choice)
            pred = sum(o.latency_ms for o in choice.values())
            cost = (round(pred, 9), sum(o.kept for o in choice.values()))  # latency, then fewer weights
            key = {n: candidate_key(*v) for n, v in plan.items()}
            seen = next((r_ for r_ in rounds if r_["plan"] == key), None)
            if not plan:
                if lo is None:
                    least = min(((o.drop, n) for n in names for o in options[n] if o.key != "dense"),
                                default=(float("nan"), None))
                    tried = "; ".join(f"{len(r_['plan'])} layers pruned: drop {r_['drop']:.4f}" for r_ in rounds)
                    raise AccuracyBudgetError(
                        f"accuracy_budget={accuracy_budget} cannot be met: "
                        + (f"measured after fine-tuning: {tried}" if rounds else
                           f"the least sensitive candidate ({least[1]}) drops the metric by {least[0]:.4f}"))
                passed = True
            elif seen is not None:  # same choice as an earlier round: its outcome is known
                passed = seen["drop"] <= accuracy_budget + 1e-12
                if not passed and scale < 1.0:
                    # shrinking the budget keeps choosing layers whose one-shot drop was ≤ 0: charge every
                    # option for its sparsity so that fewer, less aggressive layers fit
                    lam = accuracy_budget / len(names) if lam == 0 else 2 * lam
                    lo, hi, scale = None, None, 1.0
                    continue
            else:
                res = run(plan)
                drop = metric_dense - res[2]
                passed = drop <= accuracy_budget + 1e-12
                rounds.append({"round": len(rounds), "scale": scale, "plan": key, "drop": drop, "pred_ms": pred})
                if passed and (best is None or cost < best[0]):
                    best = (cost, plan, res)
            if passed:
                lo = scale if lo is None else max(lo, scale)
                scale = scale * 2.0 if hi is None else math.sqrt(lo * hi)
            else:
                hi = scale if hi is None else min(hi, scale)
                scale = scale / 2.0 if lo is None else math.sqrt(lo * hi)
            if hi is not None and lo is not None and hi / lo < 1.05:
                break
        if best is None:
            raise AccuracyBudgetError(
                f"accuracy_budget={accuracy_budget} was not met in {len(rounds)} rounds; measured drops: "
                + ", ".join(f"{r_['drop']:.4f}" for r_ in rounds))
        _, plan, (work, dens, metric, hist) = best

    work.train(was_training)
    choices = []
    for n in names:
        p, d = plan.get(n, (None, 1.0))
        real = dens.get(n, 1.0)
        choices.append(LayerChoice(
            name=n, kind=infos[n][0], shape=tuple(all_layers[n].weight.shape), rows=infos[n][2],
            pattern=str(p) if p is not None and real < 1.0 else "dense", density=real,
            sensitivity=sens.get(n, {}), est_dense_ms=latency(n, None, 1.0),
            est_ms=latency(n, p, real)))
    return SparsifyResult(model=work, layers=choices, metric_dense=metric_dense, metric_sparse=metric,
                          method=method, schedule=schedule, target=getattr(tgt, "name", str(tgt)),
                          seconds=time.perf_counter() - t_start, history=hist, rounds=rounds)
