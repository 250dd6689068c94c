"""Structured pruning: remove whole channels, attention heads and FFN neurons, and return a smaller model.

The coupled channels come from the dependency groups of the captured graph
(:mod:`sparsecc.ir.channels`). Each group's units are scored by an
importance aggregated over all its members, the least important are removed
from every member at once, and the result is a copy of the user's model with
physically smaller weights (no masks) and the same input and output shapes.
The removal is checked: the smaller model is captured again, and every node of
its graph must have the shape the groups predict, or :class:`StructureError`
names the node.

Importance of a group unit (Torch-Pruning's group importance, Fang et al.,
CVPR 2023, sums per-member scores the same way):

* ``"magnitude"``: Σ over members of the squared L2 norm of the unit's slice,
  each member normalised by its mean over the units (so a batch norm and a conv
  weigh the same);
* ``"taylor"``: Σ over members of ``(Σ_slice w · ∂L/∂w)²`` per batch, the
  first-order Taylor estimate of the loss change when the unit goes (Molchanov
  et al., "Importance Estimation for Neural Network Pruning", CVPR 2019);
* ``"activation"``: Σ over the layers that *read* the unit of
  ``‖X[:, k]‖² · ‖W[:, k]‖²``, the output energy it contributes (the structured
  form of Wanda, Sun et al. 2023, as in FLAP, An et al. 2024); groups no layer
  reads fall back to magnitude.

Reconstruction (optional): each linear whose inputs shrank is refitted, with
its bias, by least squares to reproduce the dense model's output of that layer
from the smaller model's inputs, layer by layer in execution order (the bias
compensation of FLAP and the layer-wise objective of ZipLM, Kurtic et al. 2023).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidSparsityError, StructureError
from ..ir.capture import capture, check_model
from ..ir.channels import ChannelGroups, channel_groups
from .data import first_batches, forward_loss, run_model

__all__ = ["IMPORTANCES", "StructuredResult", "group_importance", "keep_global", "keep_lowest_removed",
           "model_channel_groups", "prune_channels", "reconstruct_linears", "remove_channels"]

IMPORTANCES = ("magnitude", "taylor", "activation")


def model_channel_groups(model: nn.Module, example_inputs: Any, unknown: str = "error") -> ChannelGroups:
    """Capture ``model`` (a copy; the model is not modified) and return its dependency groups.

    Parameters
    ----------
    model : nn.Module
    example_inputs : Tensor, tuple or dict
        As for :func:`sparsecc.compile`.
    unknown : {"error", "keep"}
        See :func:`sparsecc.ir.channels.channel_groups`.

    Raises
    ------
    CaptureError, UnsupportedOpError
    """
    check_model(model, "channel_groups")
    return channel_groups(capture(model, example_inputs), unknown=unknown)


# ---------------------------------------------------------------------------------------------- importance


def _tensor(model: nn.Module, target: str) -> torch.Tensor:
    mod_path, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(mod_path) if mod_path else model, attr)


def _per_unit(values: torch.Tensor, dim: int, unit_of: np.ndarray, size: int) -> np.ndarray:
    """Sum ``values`` over all dims but ``dim``, then over the entries of each unit."""
    v = values.detach().double()
    per_index = v.transpose(0, dim).reshape(v.shape[dim], -1).sum(1).numpy() if v.dim() > 1 else v.numpy()
    out = np.zeros(size)
    np.add.at(out, unit_of, per_index)
    return out


def _normalised_sum(parts: list, size: int) -> np.ndarray:
    total = np.zeros(size)
    for p in parts:
        m = p.mean()
        total += p / m if m > 0 else p
    return total


def group_importance(model: nn.Module, groups: ChannelGroups, method: str = "magnitude",
                     data: Optional[Iterable] = None, loss_fn: Optional[Callable] = None, batches: int = 4,
                     example_inputs: Any = None) -> dict:
    """Importance of every unit of every group, higher = keep.

    Parameters
    ----------
    model : nn.Module
        The model the groups were found on (its parameter names); not modified.
    groups : ChannelGroups
    method : {"magnitude", "taylor", "activation"}
        See the module docstring.
    data : iterable of (inputs, target), optional
        Needed by "taylor" (with ``loss_fn``) and "activation"; ``batches`` of them are used.
    example_inputs : optional
        The structure every batch must have (checked).

    Returns
    -------
    dict group id -> numpy array (size,)

    Raises
    ------
    InvalidArgumentError
        An unknown method, or "taylor"/"activation" without data (or "taylor" without ``loss_fn``).
    DataError
        A malformed batch.
    """
    if method not in IMPORTANCES:
        raise InvalidArgumentError(f"importance must be one of {IMPORTANCES}, got {method!r}")
    if method != "magnitude" and data is None:
        raise InvalidArgumentError(f"importance={method!r} needs data")
    if method == "taylor" and loss_fn is None:
        raise InvalidArgumentError("importance='taylor' needs loss_fn")
    magnitude = {}
    for g in groups:
        parts = [_per_unit(_tensor(model, m.target).detach().pow(2), m.dim, m.unit_of, g.size)
                 for m in g.members if m.is_parameter]
        magnitude[g.id] = _normalised_sum(parts, g.size)
    if method == "magnitude":
        return magnitude
    sample = first_batches(data, example_inputs, batches) if example_inputs is not None else \
        [b for _, b in zip(range(batches), data)]
    if method == "taylor":
        return _taylor(model, groups, sample, loss_fn)
    return _activation(model, groups, sample, magnitude)


def _taylor(model: nn.Module, groups: ChannelGroups, sample: list, loss_fn: Callable) -> dict:
    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    acc = {g.id: [np.zeros(g.size) for m in g.members if m.is_parameter] for g in groups}
    for i, (inputs, target) in enumerate(sample):
        work.zero_grad(set_to_none=True)
        forward_loss(work, inputs, target, loss_fn, f"taylor importance batch {i}").backward()
        for g in groups:
            for slot, m in enumerate([m for m in g.members if m.is_parameter]):
                p = _tensor(work, m.target)
                if p.grad is not None:
                    acc[g.id][slot] += _per_unit(p.detach() * p.grad, m.dim, m.unit_of, g.size) ** 2
    return {gid: _normalised_sum(parts, groups[gid].size) for gid, parts in acc.items()}


def _activation(model: nn.Module, groups: ChannelGroups, sample: list, magnitude: dict) -> dict:
    readers = {}  # layer -> [(group, member)] for members that are a layer's input dim
    for g in groups:
        for m in g.members:
            if m.dim == 1 and m.target.endswith(".weight"):
                mod = model.get_submodule(m.layer)
                if isinstance(mod, nn.Linear) or (isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1):
                    readers.setdefault(m.layer, []).append((g, m))
    energy = {name: None for name in readers}
    hooks = []
    for name in readers:
        def hook(mod, inp, name=name):
            x = inp[0].detach().double()
            e = x.pow(2).sum(dim=tuple(range(x.dim() - 1))) if isinstance(mod, nn.Linear) else \
                x.pow(2).sum(dim=tuple(d for d in range(x.dim()) if d != 1))
            energy[name] = e if energy[name] is None else energy[name] + e
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for inputs, _ in sample:
                run_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    parts: dict = {}
    for name, pairs in readers.items():
        w = model.get_submodule(name).weight.detach().double()
        col = w.pow(2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)  # ‖W[:, k]‖² (conv: over taps too)
        for g, m in pairs:
            per_k = (energy[name] * col).numpy() if energy[name] is not None else np.zeros(w.shape[1])
            out = np.zeros(g.size)
            np.add.at(out, m.unit_of, per_k)
            parts.setdefault(g.id, []).append(out)
    return {g.id: _normalised_sum(parts[g.id], g.size) if g.id in parts else magnitude[g.id] for g in groups}


# ---------------------------------------------------------------------------------------------- removal


def _every_member_keeps_one(keep: dict, groups: ChannelGroups, importance: dict) -> dict:
    """Give back, in a member that would lose all its entries (one input of a concatenation), its most
    important unit."""
    for g in groups:
        k = keep[g.id]
        for m in g.members:
            units = np.unique(m.unit_of)
            if not bool(k[torch.as_tensor(units)].any()):
                k[int(units[np.argmax(importance[g.id][units])])] = True
    return keep


def keep_lowest_removed(importance: dict, groups: ChannelGroups, sparsity: Union[float, dict],
                        round_to: int = 1) -> dict:
    """Keep-masks removing the ``sparsity`` fraction of least important units of every group.

    Parameters
    ----------
    importance : dict group id -> array (size,)
    sparsity : float in [0, 1) or dict kind -> float
        Fraction of units removed per group; a dict gives it per group kind (``{"heads": 0.5, "neurons": 0.5}``;
        kinds it does not name are kept whole).
    round_to : int
        The kept count is rounded up to a multiple of it (vector width), within the group size.

    Returns
    -------
    dict group id -> bool Tensor (size,)
    """
    keep = {}
    for g in groups:
        s = sparsity.get(g.kind, 0.0) if isinstance(sparsity, dict) else sparsity
        if not 0.0 <= s < 1.0:
            raise InvalidSparsityError(f"channel sparsity must be in [0, 1), got {s} for {g.kind}")
        n_keep = max(1, g.size - int(round(s * g.size)))
        if round_to > 1:
            n_keep = min(g.size, -(-n_keep // round_to) * round_to)
        order = np.argsort(-importance[g.id], kind="stable")[:n_keep]
        mask = torch.zeros(g.size, dtype=torch.bool)
        mask[torch.as_tensor(np.sort(order))] = True
        keep[g.id] = mask
    return _every_member_keeps_one(keep, groups, importance)


def keep_global(importance: dict, groups: ChannelGroups, sparsity: Union[float, dict], round_to: int = 1,
                min_keep: float = 0.1) -> dict:
    """Keep-masks removing, per group kind, the ``sparsity`` fraction of units with the lowest importance pooled
    over all groups of that kind (one threshold per kind, as global magnitude pruning does for weights), keeping
    at least ``min_keep`` of every group.

    Importance must be comparable across groups: the activation importance is (each unit's output energy); the
    magnitude and Taylor scores are normalised per member, hence roughly so.
    """
    keep = {}
    kinds: dict = {}
    for g in groups:
        kinds.setdefault(g.kind, []).append(g)
    for kind, gs in kinds.items():
        s = sparsity.get(kind, 0.0) if isinstance(sparsity, dict) else sparsity
        if not 0.0 <= s < 1.0:
            raise InvalidSparsityError(f"channel sparsity must be in [0, 1), got {s} for {kind}")
        total = sum(g.size for g in gs)
        n_remove = int(round(s * total))
        floor = {g.id: max(1, int(np.ceil(min_keep * g.size))) for g in gs}
        order = sorted(((float(importance[g.id][u]), g.id, u) for g in gs for u in range(g.size)))
        left = {g.id: g.size for g in gs}
        masks = {g.id: torch.ones(g.size, dtype=torch.bool) for g in gs}
        removed = 0
        for _, gid, u in order:
            if removed >= n_remove:
                break
            if left[gid] > floor[gid]:
                masks[gid][u] = False
                left[gid] -= 1
                removed += 1
        if round_to > 1:  # give back the most important removed units up to a multiple of round_to
            for g in gs:
                m = masks[g.id]
                want = min(g.size, -(-int(m.sum()) // round_to) * round_to)
                gone = [u for u in np.argsort(-importance[g.id], kind="stable") if not m[u]]
                for u in gone[:want - int(m.sum())]:
                    m[u] = True
        keep.update(masks)
    return _every_member_keeps_one(keep, groups, importance)


def _owners(model: nn.Module) -> dict:
    """id(tensor) -> [(module, attribute)] of every parameter and buffer (tied tensors have several)."""
    owners: dict = {}
    for mod in model.modules():
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                owners.setdefault(id(t), []).append((mod, attr))
    return owners


def _update_attributes(model: nn.Module) -> None:
    """Make the modules' size attributes agree with their (sliced) weights."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            c_out, c_in_g = mod.weight.shape[:2]
            if mod.groups > 1 and c_in_g == 1 and mod.groups == mod.in_channels:  # depthwise
                mod.groups = mod.in_channels = c_out
            else:
                mod.in_channels = c_in_g * mod.groups
            mod.out_channels = c_out
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = (mod.weight if mod.weight is not None else mod.running_mean).shape[0]
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = mod.weight.shape[1]
        # Hugging Face attention modules keep their head count beside their projections
        q = getattr(mod, "query", None)
        if isinstance(q, nn.Linear) and isinstance(getattr(mod, "attention_head_size", None), int):
            mod.all_head_size = q.weight.shape[0]
            if hasattr(mod, "num_attention_heads"):
                mod.num_attention_heads = q.weight.shape[0] // mod.attention_head_size


def remove_channels(model: nn.Module, groups: ChannelGroups, keep: dict, example_inputs: Any,
                    check: bool = True) -> nn.Module:
    """A copy of ``model`` with the units ``keep`` marks False removed from every member of their group.

    Parameters
    ----------
    model : nn.Module
        The model the groups were found on; not modified.
    groups : ChannelGroups
    keep : dict group id -> bool Tensor (size,)
        Groups not in it are kept whole.
    example_inputs : Tensor, tuple or dict
        For the check.
    check : bool
        Capture the smaller model and compare every node's shape with the prediction (default on).

    Returns
    -------
    nn.Module
        Same class as ``model``, smaller weights, in eval mode.

    Raises
    ------
    StructureError
        A group would lose all its units, or the smaller model's graph is not the one predicted (names the node).
    """
    small = copy.deepcopy(model).eval()
    owners = _owners(small)
    done = set()
    for g in groups:
        if g.id not in keep:
            continue
        k = keep[g.id]
        if k.shape != (g.size,):
            raise InvalidArgumentError(f"keep[{g.id}] has shape {tuple(k.shape)}, the group has {g.size} units")
        if not bool(k.any()):
            raise StructureError(f"{g.describe()[:120]}: every unit would be removed")
        if bool(k.all()):
            continue
        for m in g.members:
            if not bool(k[torch.as_tensor(np.unique(m.unit_of))].any()):
                raise StructureError(f"{m.target}: every entry along dim {m.dim} would be removed (group {g.id})")
        for m in g.members:
            if (m.target, m.dim) in done:
                continue
            done.add((m.target, m.dim))
            old = _tensor(small, m.target)
            idx = torch.as_tensor(np.nonzero(k.numpy()[m.unit_of])[0], dtype=torch.long)
            new = old.detach().index_select(m.dim, idx).clone()
            for mod, attr in owners.get(id(old), []):
                if attr in mod._parameters:
                    mod._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
                else:
                    mod._buffers[attr] = new
            owners[id(_tensor(small, m.target))] = owners.pop(id(old), [])
    _update_attributes(small)
    if check:
        check_removal(small, groups, keep, example_inputs)
    return small


def check_removal(small: nn.Module, groups: ChannelGroups, keep: dict, example_inputs: Any) -> None:
    """Capture ``small`` and check that its graph is the groups' graph with the predicted sizes.

    Raises
    ------
    StructureError
        Another op sequence, or a node whose shape differs from the prediction (the message names it).
    """
    from ..ir.channels import _shape

    new_sizes: dict = {}
    for g in groups:
        if g.id in keep:
            k = keep[g.id].numpy()
            for vert, unit_of in g.vertices.items():
                new_sizes[vert] = int(k[unit_of].sum())
    try:
        graph = capture(small, example_inputs)
    except Exception as err:  # noqa: BLE001 - the smaller model must run where the model did
        raise StructureError(f"the model with channels removed no longer runs: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
    old_nodes = [n for n in groups.gm.graph.nodes if n.op != "get_attr"]
    new_nodes = [n for n in graph.gm.graph.nodes if n.op != "get_attr"]
    if [str(n.target) for n in old_nodes] != [str(n.target) for n in new_nodes]:
        raise StructureError("the model with channels removed traces to another graph (its forward depends on "
                             "the sizes it was built with)")
    for a, b in zip(old_nodes, new_nodes):
        sa, sb = _shape(a), _shape(b)
        if sa is None:
            continue
        want = tuple(new_sizes.get((a.name, d), s) for d, s in enumerate(sa))
        if sb != want:
            raise StructureError(f"node {a.name!r} ({a.target}) has shape {sb} after removing channels, the "
                                 f"dependency groups predict {want}: a size in the model's code or attributes "
                                 f"did not follow the weights")


# ---------------------------------------------------------------------------------------------- reconstruction


class _Seen(Exception):
    pass


def reconstruct_linears(dense: nn.Module, small: nn.Module, batches: list, damp: float = 0.01,
                        layers: Optional[list] = None, out_rows: Optional[dict] = None) -> list:
    """Refit ``nn.Linear`` layers of ``small`` (weight and bias, by least squares) to the dense outputs, in place.

    For each layer in execution order, with ``X`` its input in ``small`` (rows, K') and ``Y`` the dense
    layer's output in ``dense`` (rows, N) restricted to the rows ``small`` kept: ``[W b] = argmin ‖[X 1]·[W b]ᵀ
    - Y‖² + λ‖W‖²``, ``λ`` = ``damp`` · mean of ``diag(XᵀX)``. Later layers see the earlier ones refitted. A fit
    that does not lower the layer's error is not applied.

    Parameters
    ----------
    dense, small : nn.Module
        The model before and after :func:`remove_channels` (same module names).
    batches : list of inputs
        Calibration inputs (as the models are called).
    layers : list of str, optional
        The layers to refit; default: those whose inputs shrank.
    out_rows : dict layer -> LongTensor, optional
        For layers that lost output features, the dense rows they kept (:meth:`StructuredResult.kept_rows`).

    Returns
    -------
    list of (layer name, relative output error before, after)
    """
    out_rows = out_rows or {}
    names = [n for n, m in small.named_modules() if isinstance(m, nn.Linear)
             and (n in layers if layers is not None else m.in_features < dense.get_submodule(n).in_features)]
    for n in names:
        if small.get_submodule(n).out_features != dense.get_submodule(n).out_features and n not in out_rows:
            raise InvalidArgumentError(f"reconstruction of {n!r}: it lost output features; give its kept rows in "
                                       f"out_rows")
    from .layerwise import execution_order

    if not names:
        return []
    names = execution_order(small, names, batches[0])
    report = []
    for name in names:
        mod, ref = small.get_submodule(name), dense.get_submodule(name)
        k = mod.in_features + 1
        A = torch.zeros(k, k, dtype=torch.float64)
        B = torch.zeros(k, mod.out_features, dtype=torch.float64)
        yy = 0.0
        seen: dict = {}

        rows = out_rows.get(name)

        def ref_hook(m, inp, out):
            y = out.detach().reshape(-1, out.shape[-1]).double()
            seen["y"] = y if rows is None else y[:, rows]
            raise _Seen

        def mod_hook(m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            seen["x"] = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            raise _Seen

        h1, h2 = ref.register_forward_hook(ref_hook), mod.register_forward_pre_hook(mod_hook)
        try:
            with torch.no_grad():
                for b in batches:
                    for net in (dense, small):
                        try:
                            run_model(net, b)
                        except _Seen:
                            pass
                    x, y = seen.pop("x"), seen.pop("y")
                    A.addmm_(x.T, x)
                    B.addmm_(x.T, y)
                    yy += float(y.pow(2).sum())
        finally:
            h1.remove()
            h2.remove()
        W0 = torch.cat([mod.weight.detach().double(), mod.bias.detach().double()[:, None]
                        if mod.bias is not None else torch.zeros(mod.out_features, 1, dtype=torch.float64)], 1)
        lam = damp * float(A.diagonal()[:-1].mean()) or 1.0
        reg = lam * torch.eye(k, dtype=torch.float64)
        reg[-1, -1] = 0.0 if mod.bias is not None else 1e12
        sol = torch.linalg.solve(A + reg, B).T  # (N, K'+1)

        def err(W):  # ‖XWᵀ - Y‖² from the accumulated moments
            return float((W @ A @ W.T).trace() - 2 * (W * B.T).sum() + yy) / max(yy, 1e-30)

        before, after = err(W0), err(sol)
        if after < before:
            with torch.no_grad():
                mod.weight.copy_(sol[:, :-1].to(mod.weight.dtype))
                if mod.bias is not None:
                    mod.bias.copy_(sol[:, -1].to(mod.bias.dtype))
        report.append((name, before, min(before, after)))
    return report


# ---------------------------------------------------------------------------------------------- the entry point


@dataclass
class StructuredResult:
    """What :func:`prune_channels` did.

    Attributes
    ----------
    model : nn.Module
        The smaller model (a copy of the user's, same class, same input and output shapes).
    groups : ChannelGroups
    keep : dict group id -> bool Tensor
    reconstruction : list of (layer, relative error before, after)
    """

    model: nn.Module
    groups: ChannelGroups
    keep: dict
    reconstruction: list = field(default_factory=list)

    def kept_rows(self) -> dict:
        """For every layer that lost output features (weight dim 0), the indices of the dense rows it kept."""
        rows = {}
        for g in self.groups:
            k = self.keep.get(g.id)
            if k is None:
                continue
            for m in g.members:
                if m.dim == 0 and m.target.endswith(".weight"):
                    rows[m.layer] = torch.as_tensor(np.nonzero(k.numpy()[m.unit_of])[0], dtype=torch.long)
        return rows

    @property
    def removed(self) -> dict:
        """Units removed per group kind: ``{"heads": (removed, total), ...}``."""
        out: dict = {}
        for g in self.groups:
            r, t = out.get(g.kind, (0, 0))
            k = self.keep.get(g.id)
            out[g.kind] = (r + (0 if k is None else int((~k).sum())), t + g.size)
        return out

    def summary(self) -> str:
        parts = [f"{r}/{t} {kind}" for kind, (r, t) in self.removed.items()]
        dense_n = sum(p.numel() for p in self.groups.gm.parameters())
        small_n = sum(p.numel() for p in self.model.parameters())
        return f"removed {', '.join(parts)}; parameters {dense_n} -> {small_n} ({small_n / dense_n:.3f}x)"


def prune_channels(model: nn.Module, example_inputs: Any, sparsity: Union[float, dict] = 0.5, *,
                   importance: str = "magnitude", data: Optional[Iterable] = None,
                   loss_fn: Optional[Callable] = None, batches: int = 4, reconstruct: Union[bool, str] = False,
                   damp: float = 0.01, round_to: int = 1, allocation: str = "uniform",
                   unknown: str = "error") -> StructuredResult:
    """Remove the least important channels, heads and neurons of ``model``: a physically smaller copy.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    example_inputs : Tensor, tuple or dict
        An example call, as for :func:`sparsecc.compile`.
    sparsity : float in [0, 1) or dict kind -> float
        Fraction of the units of every dependency group removed; a dict sets it per kind
        (``"channels"``, ``"heads"``, ``"neurons"``) and keeps the kinds it does not name.
    importance : {"magnitude", "taylor", "activation"}
        How units are scored (module docstring).
    data : iterable of (inputs, target), optional
        For "taylor", "activation" and ``reconstruct``; ``batches`` of them are used.
    loss_fn : callable (output, target) -> scalar Tensor
        For "taylor".
    reconstruct : bool or "all"
        Refit the linears whose inputs shrank (True), or every linear in execution order ("all"), by least squares
        to the dense model's outputs (:func:`reconstruct_linears`) on ``batches`` batches of ``data``.
    round_to : int
        Round kept counts up to a multiple of this.
    allocation : {"uniform", "global"}
        ``sparsity`` of every group (uniform), or of all the groups of a kind pooled, with one importance
        threshold per kind and at least 10% of every group kept (:func:`keep_global`).
    unknown : {"error", "keep"}
        An op the analysis does not know: refuse, or keep its channels whole.

    Returns
    -------
    StructuredResult

    Raises
    ------
    UnsupportedOpError
        An op the analysis does not know touches prunable channels (the message names the node).
    StructureError
        The smaller model is not what the groups predict.
    InvalidSparsityError, InvalidArgumentError, DataError
    """
    check_model(model, "prune_channels")
    if reconstruct not in (False, True, "all"):
        raise InvalidArgumentError(f"reconstruct must be True, False or 'all', got {reconstruct!r}")
    if allocation not in ("uniform", "global"):
        raise InvalidArgumentError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    if reconstruct and data is None:
        raise InvalidArgumentError("reconstruct needs data")
    groups = model_channel_groups(model, example_inputs, unknown=unknown)
    was_training = model.training
    ref = copy.deepcopy(model).eval()
    scores = group_importance(ref, groups, importance, data=data, loss_fn=loss_fn, batches=batches,
                              example_inputs=example_inputs)
    choose = keep_lowest_removed if allocation == "uniform" else keep_global
    keep = choose(scores, groups, sparsity, round_to=round_to)
    small = remove_channels(ref, groups, keep, example_inputs)
    result = StructuredResult(small, groups, keep)
    if reconstruct:
        calib = [inputs for inputs, _ in first_batches(data, example_inputs, batches)]
        layers = [n for n, m in small.named_modules() if isinstance(m, nn.Linear)] if reconstruct == "all" else None
        result.reconstruction = reconstruct_linears(ref, small, calib, damp=damp, layers=layers,
                                                    out_rows=result.kept_rows())
    small.train(was_training)
    return result


#: sparsify's ``method=`` names -> the group importance they become for ``pattern="channel"``
METHOD_IMPORTANCE = {"magnitude": "magnitude", "impact": "taylor", "movement": "taylor",
                     "activation": "activation", "sparsegpt": "activation"}


def sparsify_channels(model: nn.Module, example_inputs: Any, *, sparsity, method: str, data, loss_fn, eval_fn,
                      training, calib_batches: int, reconstruct: bool, damp: float, progress: bool, seed: int,
                      target: str):
    """``sparsify(pattern="channel")``: remove whole channels/heads/neurons, then fine-tune the smaller model.

    Returns a :class:`~sparsecc.sparsify.api.SparsifyResult` whose ``model`` is physically smaller; each layer's
    ``density`` is its kept fraction of weights.
    """
    import time

    from tqdm.auto import tqdm

    from .api import LayerChoice, SparsifyResult
    from .data import Batches

    t0 = time.perf_counter()
    if method not in METHOD_IMPORTANCE:
        raise InvalidSparsityError(f"method must be one of {tuple(METHOD_IMPORTANCE)}, got {method!r}")
    importance = METHOD_IMPORTANCE[method]
    if (importance != "magnitude" or reconstruct or training.steps) and data is None:
        raise InvalidArgumentError(f"pattern='channel' with method={method!r}, reconstruct={reconstruct} and "
                                   f"finetune_steps={training.steps} needs data=")
    if (importance == "taylor" or training.steps) and loss_fn is None:
        raise InvalidArgumentError("pattern='channel' needs loss_fn= for gradients (Taylor importance or "
                                   "fine-tuning)")
    was_training = model.training
    metric_dense = eval_fn(copy.deepcopy(model).eval()) if eval_fn is not None else None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        res = prune_channels(model, example_inputs, sparsity, importance=importance, data=data, loss_fn=loss_fn,
                             batches=calib_batches, reconstruct=reconstruct, damp=damp)
        small = res.model
        history = []
        if training.steps:
            params = [p for p in small.parameters()]
            for p in params:
                p.requires_grad_(True)
            opt = training.make_optimizer(params)
            batches = Batches(data, example_inputs)
            small.train()
            for t in tqdm(range(training.steps), desc="fine-tune (channel)", disable=not progress, leave=False):
                inputs, tgt = batches.next()
                opt.zero_grad(set_to_none=True)
                loss = forward_loss(small, inputs, tgt, loss_fn, f"fine-tuning step {t}")
                loss.backward()
                opt.step()
                history.append({"step": t, "loss": float(loss.detach())})
        small.eval()
    metric = eval_fn(small) if eval_fn is not None else None
    small.train(was_training)
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            new = small.get_submodule(name).weight
            layers.append(LayerChoice(name, "linear" if isinstance(mod, nn.Linear) else "conv",
                                      tuple(mod.weight.shape), 0, "channel" if new.shape != mod.weight.shape
                                      else "dense", new.numel() / mod.weight.numel()))
    return SparsifyResult(model=small, layers=layers, metric_dense=metric_dense, metric_sparse=metric,
                          method=method, schedule="oneshot", target=str(target),
                          seconds=time.perf_counter() - t0, history=history)
