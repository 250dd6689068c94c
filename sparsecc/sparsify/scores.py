"""Importance scores: which weights matter.

The importance interface of the pruning engine (as Torch-Pruning's
``Importance`` callables): each score is a small object; ``accumulate(name,
weight, grad)`` is fed the weight and the gradient of the loss with respect to
the (masked) weight after a backward pass; ``score(name, weight)`` returns one
number per weight, higher meaning more important. Weights are passed in their
own shape (a conv weight (C_out, C_in, kh, kw), a linear weight (C_out, C_in));
scores keep that shape. :data:`SCORES` maps the ``method=`` names of
:func:`sparsecc.sparsify` to the classes.
"""

from __future__ import annotations

import torch


class ImportanceScore:
    """Base class. Subclasses set ``name``, ``needs_grad`` and :meth:`score`."""

    name = "score"
    #: Whether :meth:`accumulate` must be fed gradients before :meth:`score`.
    needs_grad = False
    #: Whether the score needs each layer's input statistics (layer-wise pruning only).
    needs_inputs = False
    #: Whether the gradual schedule forgets the accumulated statistics after every pruning step.
    resets_on_prune = False

    def __init__(self):
        self.acc: dict[str, torch.Tensor] = {}
        self.batches = 0

    def reset(self) -> None:
        """Forget accumulated statistics."""
        self.acc.clear()
        self.batches = 0

    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one batch's statistic for layer ``name`` (no-op for gradient-free scores)."""

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every weight of layer ``name``: a Tensor of ``weight``'s shape, higher = keep."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MagnitudeScore(ImportanceScore):
    """``|w|``.

    Source: Han et al., "Learning both Weights and Connections for Efficient
    Neural Networks" (NeurIPS 2015); Zhu & Gupta, "To prune, or not to prune"
    (2017) use it with gradual pruning.
    """

    name = "magnitude"

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().abs()


class GradientScore(ImportanceScore):
    """Base of scores summing a statistic of ``(w, ∂L/∂w)`` over batches; subclasses set :meth:`statistic`."""

    needs_grad = True

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One batch's contribution, the weight's shape."""
        raise NotImplementedError

    def accumulate(self, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        v = self.statistic(weight.detach(), grad.detach())
        self.acc[name] = self.acc[name] + v if name in self.acc else v.clone()

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The accumulated statistic.

        Raises
        ------
        RuntimeError
            Nothing was accumulated for layer ``name``.
        """
        if name not in self.acc:
            raise RuntimeError(f"{self.name} score of layer {name!r} has no gradients accumulated")
        return self.acc[name]


class ImpactScore(GradientScore):
    """First-order Taylor impact ``Σ_batches |w · ∂L/∂w|``.

    The estimated change of the loss when a weight is set to zero, summed in
    absolute value over calibration batches. Reset after every gradual pruning
    step, so that it measures the impact under the current mask.

    Source: Molchanov et al., "Importance Estimation for Neural Network
    Pruning" (CVPR 2019), first-order Taylor criterion, per weight.
    """

    name = "impact"
    resets_on_prune = True

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return (weight * grad).abs()


class MovementScore(GradientScore):
    """Movement ``S = -Σ_steps w · ∂L/∂w``: weights moving away from zero score high.

    Accumulated over fine-tuning steps (or calibration batches for one-shot).

    Source: Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by
    Fine-Tuning" (NeurIPS 2020), eq. for the score of hard movement pruning.
    """

    name = "movement"

    def statistic(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return -(weight * grad)


class ActivationScore(ImportanceScore):
    """Activation-aware ``|w_ij|² · ||X_j||²``: a weight matters as much as the inputs it multiplies.

    Needs the layer's input statistics, so it only scores inside layer-wise pruning
    (``sparsify(..., schedule="oneshot", method="activation")``, which collects them
    per layer on calibration batches; see :mod:`sparsecc.sparsify.reconstruct`).

    Source: Sun et al., "A Simple and Effective Pruning Approach for Large Language
    Models" (Wanda, ICLR 2024); squared here, the diagonal of the OBS saliency with
    the layer Hessian ``XᵀX`` (Hassibi & Stork 1993; Frantar & Alistarh 2022).
    """

    name = "activation"
    needs_inputs = True

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"the activation score of layer {name!r} needs input statistics: it is only "
                           "available in layer-wise one-shot pruning")


class SparseGPTScore(ActivationScore):
    """Masks chosen by SparseGPT's sequential OBS updates (:func:`~sparsecc.sparsify.reconstruct.sparsegpt_keep`).

    Not a per-weight score: the mask of a column block depends on the error
    compensation of the blocks before it. Like :class:`ActivationScore` it needs
    the layer's input statistics, so it only runs inside layer-wise pruning.

    Source: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
    Accurately Pruned in One-Shot" (ICML 2023).
    """

    name = "sparsegpt"


#: Method names accepted by :func:`sparsecc.sparsify`.
SCORES = {"magnitude": MagnitudeScore, "impact": ImpactScore, "movement": MovementScore,
          "activation": ActivationScore, "sparsegpt": SparseGPTScore}
