"""The user's data as sparsify reads it: checked batches, forward passes, the loss.

A data batch is a pair ``(inputs, target)`` whose inputs have the structure of
the ``example_inputs`` given to :func:`sparsecc.sparsify` (same number of
tensors, same dtypes and ranks; for rank ≥ 3 the same shape but for the batch
dim). Every failure names the batch or step it happened in.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import DataError, TrainingError
from ..ir.capture import normalize_inputs

__all__ = ["Batches", "check_batch", "first_batches", "forward_loss", "layer_rows", "run_model"]


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs`` (a Tensor, a tuple of positional inputs or a dict of keyword inputs)."""
    args, kwargs = normalize_inputs(inputs)
    return model(*args, **kwargs)


def layer_rows(model: nn.Module, layers: dict, example_inputs) -> dict:
    """M, the rows of each layer's GEMM at the example input, found with forward hooks.

    Parameters
    ----------
    model : nn.Module
    layers : dict name -> nn.Module
        Linear or Conv2d modules of ``model``.
    example_inputs : Tensor, tuple or dict

    Returns
    -------
    dict name -> int
        ``batch · tokens`` for a linear, ``batch · H_out · W_out`` for a conv; layers that
        did not run are missing.

    Raises
    ------
    DataError
        The model fails on ``example_inputs`` (so this also checks that it runs).
    """
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


def check_batch(batch, example_inputs, index: int) -> tuple:
    """Split a data batch into ``(inputs, target)`` and check it against the example inputs.

    Raises
    ------
    DataError
        Not a pair, another number of inputs, another dtype or rank, or (rank ≥ 3) another
        shape but for the batch dim; the message names batch ``index``.
    """
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


class Batches:
    """Endless iterator over ``data`` (re-iterated every epoch), checking every batch's structure.

    Parameters
    ----------
    data : iterable of (inputs, target)
    example_inputs : Tensor, tuple or dict
        What every batch's inputs must look like (see :func:`check_batch`).
    """

    def __init__(self, data: Iterable, example_inputs):
        self.data, self.example = data, example_inputs
        self.it, self.index = None, 0

    def next(self) -> tuple:
        """The next checked ``(inputs, target)``.

        Raises
        ------
        DataError
            ``data`` yields no batch at all, or a malformed one.
        """
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
        out = check_batch(batch, self.example, self.index)
        self.index += 1
        return out


def first_batches(data: Iterable, example_inputs, n: int) -> list:
    """The first ``max(1, n)`` batches of ``data`` (cycling if it has fewer), checked."""
    it = Batches(data, example_inputs)
    return [it.next() for _ in range(max(1, n))]


def forward_loss(model: nn.Module, inputs, target, loss_fn: Callable, where: str) -> torch.Tensor:
    """``loss_fn(model(inputs), target)``, a finite scalar tensor.

    Raises
    ------
    DataError
        The model or ``loss_fn`` fails, or the loss is not a scalar tensor.
    TrainingError
        The loss is NaN or infinite.
    """
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
