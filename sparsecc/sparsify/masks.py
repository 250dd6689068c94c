"""Keep-masks as ``torch.nn.utils.parametrize`` parametrizations.

While sparsify trains, every prunable weight is registered as
``weight = original ⊙ mask``, so a forward pass, the loss and every optimizer
step see the masked weight: pruned weights get zero gradient and stay zero in
the effective weight whatever the optimizer does to ``original``. The
parametrization also records the *dense* gradient ``∂L/∂(original ⊙ mask)``
(before masking) that impact, movement and RigL's regrowth need.
:func:`strip_masks` bakes the masks in and leaves a plain ``nn.Module`` whose
``state_dict`` has the user's names.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class _MaskFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, mask, owner):
        ctx.save_for_backward(mask)
        ctx.owner = owner
        return w * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        owner = ctx.owner
        if owner.capture:
            owner.dense_grad = g.detach().clone() if owner.dense_grad is None else owner.dense_grad + g.detach()
        return g * mask, None, None


class WeightMask(nn.Module):
    """Parametrization ``w ↦ w ⊙ mask`` that records the dense gradient when ``capture`` is set.

    Attributes
    ----------
    mask : bool-valued float buffer, the weight's shape
    capture : bool
        Accumulate ``∂L/∂w_eff`` into ``dense_grad`` on backward.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32))
        self.capture = False
        self.dense_grad = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _MaskFn.apply(w, self.mask.to(w.dtype), self)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and (non-depthwise) Conv2d modules of ``model`` with float weights, by qualified name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            w = mod.weight
            if w.is_floating_point() and w.numel() > 0:
                out[name] = mod
    return out


def attach_masks(layers: dict[str, nn.Module]) -> dict[str, WeightMask]:
    """Register an all-ones :class:`WeightMask` on every layer's ``weight``; returns them by name."""
    masks = {}
    for name, mod in layers.items():
        wm = WeightMask(torch.ones_like(mod.weight, dtype=torch.float32))
        parametrize.register_parametrization(mod, "weight", wm, unsafe=True)
        masks[name] = wm
    return masks


def original_weight(mod: nn.Module) -> nn.Parameter:
    """The trainable tensor under a parametrized ``weight`` (or ``weight`` itself)."""
    if parametrize.is_parametrized(mod, "weight"):
        return mod.parametrizations.weight.original
    return mod.weight


def set_mask(mod: nn.Module, mask: torch.Tensor) -> None:
    """Replace a layer's keep-mask; also zero the underlying weight where pruned."""
    wm = mod.parametrizations.weight[0]
    wm.mask.copy_(mask.to(wm.mask.dtype))
    with torch.no_grad():
        original_weight(mod).mul_(wm.mask.to(original_weight(mod).dtype))


def strip_masks(layers: dict[str, nn.Module]) -> None:
    """Bake ``original ⊙ mask`` into ``weight`` and remove the parametrizations."""
    for mod in layers.values():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


def set_capture(masks: dict[str, WeightMask], on: bool) -> None:
    """Start (clearing old values) or stop recording dense gradients."""
    for wm in masks.values():
        wm.capture = on
        if on:
            wm.dense_grad = None
