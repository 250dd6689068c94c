"""Activation routing (contextual sparsity): find feed-forward blocks, calibrate their gates, run them gated.

Three passes:

1. :class:`FindMLPBlocks` (analysis) marks the down projection of every feed-forward block, ``linear →
   activation → linear`` or the gated form ``(act(linear_g(x)) · linear_u(x)) → linear`` (SwiGLU / GeGLU), in
   ``node.meta["sparsecc.routing"]``; with ``gate="both"`` also its up projection(s), whose input is gated too.
2. :class:`CalibrateGates` (analysis) runs the graph on calibration inputs, records the magnitudes of every marked
   linear's input (for a down projection, the block's intermediate activation) and writes per level the threshold that keeps
   the target fraction of them (the (1 - density) quantile of ``|h|``; TEAL, Liu et al. 2024, calibrates its
   magnitude thresholds the same way, without training). A density of 1 gives threshold 0: only exact zeros are
   skipped, so a ReLU block's natural sparsity is used without changing its output.
3. :class:`RouteActivations` (rewrite) replaces each marked linear that is faster gated than dense at
   the example's token count (timed here) by a :class:`sparsecc.runtime.gated.GatedLinear` holding every level.

:class:`MoEfyBlocks` (rewrite) is the other routing: the block's neurons grouped into experts by co-activation
and a router picking the top-k experts per token (MoEfication), run by :class:`sparsecc.runtime.moe.MoEFFN`.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..errors import DataError, InvalidArgumentError, RoutingError
from ..ir.annotations import ROUTING_META_KEY, annotate, get_annotation
from ..ir.graph import SparseGraph, as_call
from ..ir.rewrite import delete_unused_attrs, fresh_attr, val_shape
from ..runtime.gated import gate_keep
from .base import Pass, PassContext, PassResult

__all__ = ["CalibrateGates", "FindMLPBlocks", "META", "MoEfyBlocks", "RouteActivations", "check_densities",
           "cluster_neurons", "fit_router", "record_inputs", "routed_blocks"]

#: node.meta key of the routing passes
META = ROUTING_META_KEY
#: activations that make an intermediate worth gating (their outputs cluster near zero)
ACTIVATIONS = {
    torch.ops.aten.relu.default: "relu", torch.ops.aten.gelu.default: "gelu", torch.ops.aten.silu.default: "silu",
    torch.ops.aten.sigmoid.default: "sigmoid", torch.ops.aten.tanh.default: "tanh",
    torch.ops.aten.relu6.default: "relu6", torch.ops.aten.hardtanh.default: "hardtanh",
}
_MUL = (torch.ops.aten.mul.Tensor,)
#: at most this many activation magnitudes per layer go into the quantile (torch.quantile's input limit is 16M)
MAX_SAMPLES = 2_000_000
#: rows (tokens) of a layer's input kept per calibration call (for clustering and router fitting)
ROW_SAMPLES = 512


def check_densities(densities) -> list:
    """The activation densities of the levels as a list of floats in (0, 1], densest first.

    Raises
    ------
    InvalidArgumentError
        A density outside (0, 1], none, or the levels not in non-increasing order.
    """
    if isinstance(densities, (str, bytes)) or not isinstance(densities, (int, float, list, tuple)):
        raise InvalidArgumentError(f"activation density must be a float in (0, 1] or a list of them (one per "
                                   f"level), got {densities!r}")
    ds = [densities] if isinstance(densities, (int, float)) else list(densities)
    if not ds:
        raise InvalidArgumentError("activation densities: at least one level is needed, got an empty list")
    for d in ds:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 < float(d) <= 1.0):
            raise InvalidArgumentError(f"activation density must be in (0, 1], got {d!r}")
    ds = [float(d) for d in ds]
    if any(b > a for a, b in zip(ds, ds[1:])):
        raise InvalidArgumentError(f"activation densities of the levels must not increase (level 0 the densest), "
                                   f"got {ds}")
    return ds


def _activation_of(node) -> str | None:
    if isinstance(node, fx.Node) and node.op == "call_function":
        act = ACTIVATIONS.get(node.target)
        if act is not None:
            return act
    return None


def routed_blocks(graph: SparseGraph) -> list:
    """``(linear node, its routing metadata)`` for every linear :class:`FindMLPBlocks` marked for gating."""
    return [(n, n.meta[META]) for n in graph.graph.nodes if META in n.meta]


class FindMLPBlocks(Pass):
    """Mark the linears of every feed-forward block whose input is gated (analysis pass; writes ``node.meta[META]``).

    A block is a linear (the down projection) whose input is, with a single reader, an activation of a linear
    (the up projection), or the product of an activation of one linear and another linear (gated MLPs: the gate
    and up projections of SwiGLU / GeGLU). Both linears must have constant float32 weights.

    Parameters
    ----------
    gate : {"down", "both"}
        ``"down"``: the down projection's input (the intermediate activation) is gated. ``"both"``: also the
        block's input, read by the up projection(s) (TEAL's choice: every linear of the block reads a gated
        input, so the up projection skips weight rows too).

    Metadata, on each gated linear: ``{"name": layer, "role": "down" | "up", "block": the block's down
    projection, "up": its up layer(s), "activation": name, "gated": bool, "neurons": K}``.
    """

    name = "find_mlp_blocks"
    requires = ()

    def __init__(self, gate: str = "down"):
        if gate not in ("down", "both"):
            raise InvalidArgumentError(f"activation gate must be 'down' or 'both', got {gate!r}")
        self.gate = gate

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        for site in graph.linear_sites():
            w = graph.tensor(site.weight)
            if w.dim() != 2 or w.dtype != torch.float32:
                continue
            h = site.node.args[0]
            if not isinstance(h, fx.Node) or len(h.users) != 1:
                continue
            act, ups, gated = _activation_of(h), [], False
            if act is not None:
                up = graph._as_linear(h.args[0]) if isinstance(h.args[0], fx.Node) else None
                ups = [up] if up is not None else []
            elif h.op == "call_function" and h.target in _MUL and len(h.args) == 2:
                a, b = h.args
                for g, u in ((a, b), (b, a)):
                    act = _activation_of(g)
                    if act is not None and isinstance(g.args[0], fx.Node) and isinstance(u, fx.Node):
                        lg, lu = graph._as_linear(g.args[0]), graph._as_linear(u)
                        if lg is not None and lu is not None:
                            ups, gated = [lg, lu], True
                            break
                    act = None
            if act is None or not ups:
                continue
            common = {"block": site.name, "up": [u.name for u in ups], "activation": act, "gated": gated}
            site.node.meta[META] = {"name": site.name, "role": "down", "neurons": int(w.shape[1])} | common
            if self.gate == "both":
                for u in ups:
                    if graph.tensor(u.weight).dtype == torch.float32:
                        u.node.meta[META] = {"name": u.name, "role": "up",
                                             "neurons": int(graph.tensor(u.weight).shape[1])} | common
        return PassResult(graph, False)

    def ensures(self, graph: SparseGraph) -> None:
        for node, meta in routed_blocks(graph):
            if graph._as_linear(node) is None:
                raise RoutingError(f"layer {meta['name']!r} is marked for gating but is not a linear")


class _Recorder:
    """Keeps a random sample of the rows (tokens) a node's input takes over the calibration calls: at most
    ``ROW_SAMPLES`` per call, the same tokens for every recorder of one call (so the rows of a block's input and
    of its activation correspond), plus the first call's rows whole."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.first = None  # the first call's activations (M, K): what the schedules are timed on
        self.rows: list = []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        r = h.detach().reshape(-1, h.shape[-1])
        if self.first is None:
            self.first = r.clone()
        # seeded by the call's index: recorders of one call pick the same tokens
        pick = (torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(len(self.rows)))[:ROW_SAMPLES]
                if r.shape[0] > ROW_SAMPLES else None)
        self.rows.append((r[pick] if pick is not None else r).float().clone())
        return h

    def sample(self) -> torch.Tensor:
        """At most ``MAX_SAMPLES`` magnitudes ``|h|`` drawn from the recorded rows (the quantile's input)."""
        a = torch.cat(self.rows).abs().reshape(-1)
        if a.numel() > MAX_SAMPLES:
            a = a[torch.randint(a.numel(), (MAX_SAMPLES,), generator=self.gen)]
        return a


def _record(h, key: int):
    return _RECORDERS[key](h)


_RECORDERS: dict = {}


def batch_slices(graph: SparseGraph, args: tuple, kwargs: dict):
    """The call itself, or, where the graph has a static batch ``b`` and every tensor input of the call has a
    batch that is a multiple of it, the call cut into batches of ``b`` (so calibration data need not come in the
    example's batch size)."""
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
    specs = graph.input_specs
    if len(tensors) != len(specs) or not tensors or any(t.dim() == 0 or not s.shape or s.shape[0] is None
                                                        for t, s in zip(tensors, specs)):
        return [(args, kwargs)]
    b, big = specs[0].shape[0], tensors[0].shape[0]
    if b < 1 or big == b or big % b or any(t.shape[0] != big or s.shape[0] != b for t, s in zip(tensors, specs)):
        return [(args, kwargs)]
    out = []
    for i in range(0, big, b):
        cut = [v[i:i + b] if isinstance(v, torch.Tensor) else v for v in leaves]
        out.append(pytree.tree_unflatten(cut, spec))
    return out


def record_inputs(graph: SparseGraph, nodes: list, calibration: list) -> dict:
    """Run ``calibration`` through the graph and record what the first input of each of ``nodes`` takes.

    A recorder call is put before each node for the run and taken out after it (the graph is left as it was).
    Returns ``{node: _Recorder}``.

    Raises
    ------
    DataError
        A calibration call the graph does not accept (the message names its index).
    """
    gm = graph.gm
    inserted, recorders = [], {}
    try:
        for i, node in enumerate(nodes):
            key = id(node)
            _RECORDERS[key] = recorders[node] = _Recorder(seed=i)
            h = node.args[0]
            with gm.graph.inserting_before(node):
                rec = gm.graph.call_function(_record, (h, key))
            node.replace_input_with(h, rec)
            inserted.append((node, h, rec))
        gm.recompile()
        with torch.no_grad():
            for j, call in enumerate(calibration):
                args, kwargs = as_call(call)
                args, kwargs = graph.bind(args, kwargs)
                try:
                    for a, k in batch_slices(graph, args, kwargs):
                        graph.check_inputs(a, k)
                        gm(*a, **k)
                except Exception as e:  # noqa: BLE001 - named with the input
                    raise DataError(f"calibration input {j} does not run through the model: "
                                    f"{type(e).__name__}: {e}") from e
    finally:
        for node, h, rec in inserted:
            node.replace_input_with(rec, h)
            gm.graph.erase_node(rec)
            _RECORDERS.pop(id(node), None)
        gm.recompile()
    return recorders


class CalibrateGates(Pass):
    """Per marked block and level, the gate threshold that keeps ``density`` of the activations (analysis pass).

    Runs the graph on ``calibration`` (a list of example calls: a tensor, a tuple of positional inputs or a dict
    of keyword inputs, each shaped like the compile example or with a batch that is a multiple of its batch,
    then cut into the example's batch) with a recorder before every marked down
    projection; the threshold of density ``d`` is the ``1 - d`` quantile of the recorded ``|h|`` (0 for
    ``d = 1``). Thresholds of decreasing densities do not decrease, so each level's kept set is a subset of
    the denser level's.

    Writes ``meta["thresholds"]`` (one per level) and ``meta["calibrated_density"]`` (the kept fraction on the
    calibration data). With ``bias_correction``, also ``meta["corrections"]: (levels, K)``, the mean over the
    calibration tokens of the activations each level drops; the routed layer adds ``W · c`` to its bias at that
    level (:class:`~sparsecc.runtime.gated.GatedLinear`), which on MiniLM at 50% raised the embedding cosine
    from 0.962 to 0.973 at no run-time cost.

    Raises
    ------
    RoutingError
        No feed-forward block in the model.
    DataError
        No calibration inputs, or an input the graph does not accept.
    """

    name = "calibrate_gates"
    requires = ("find_mlp_blocks",)

    def __init__(self, densities, calibration, bias_correction: bool = True):
        self.densities = check_densities(densities)
        self.calibration = list(calibration) if calibration is not None else []
        self.bias_correction = bias_correction

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        blocks = routed_blocks(graph)
        if not blocks:
            raise RoutingError("activation routing found no feed-forward block (linear → activation → linear) in "
                               "the model")
        if not self.calibration:
            raise DataError("activation routing needs calibration inputs (calibration=[example calls]) to set "
                            "its gate thresholds")
        recorders = record_inputs(graph, [n for n, _ in blocks], self.calibration)
        for node, meta in blocks:
            a = recorders[node].sample()
            th = [0.0 if d >= 1.0 else max(0.0, float(torch.quantile(a, 1.0 - d))) for d in self.densities]
            for k in range(1, len(th)):
                th[k] = max(th[k], th[k - 1])
            meta["thresholds"] = th
            meta["densities"] = list(self.densities)
            meta["calibrated_density"] = [float((a > t).float().mean()) for t in th]
            meta["example"] = recorders[node].first
            if self.bias_correction:  # the mean of what each level's gate drops, per neuron
                rows = torch.cat(recorders[node].rows)
                meta["corrections"] = torch.stack([torch.where(gate_keep(rows, t), torch.zeros(()), rows).mean(0)
                                                   for t in th])
        return PassResult(graph, False)


class RouteActivations(Pass):
    """Run every calibrated marked linear as a :class:`~sparsecc.runtime.gated.GatedLinear` (rewrite pass).

    Where ``measure`` is set, the gated kernel is timed at every level (at the example's token count, on
    activations of the first calibration call) against torch's dense linear: a layer slower gated than dense (by
    ``margin``) at every level is not routed; one slower at some levels runs torch's dense linear at those
    (``GatedLinear.dense_levels``: ungated there, so exact). The times are in ``meta["dense_ms"]`` /
    ``meta["gated_ms"]``. Layers whose weights were lowered to a sparse kernel are not routed (their linear is
    gone).

    Ensures: every routed node calls a GatedLinear with one threshold per level.
    """

    name = "route_activations"
    requires = ("calibrate_gates",)

    def __init__(self, measure: bool = True, margin: float = 0.95, force: bool = False):
        self.measure, self.margin, self.force = measure, margin, force

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        from ..runtime.gated import GatedLinear
        from ..runtime.timing import interleaved_ms

        gm = graph.gm
        changed, removed = False, []
        for node, meta in routed_blocks(graph):
            site = graph._as_linear(node)
            if site is None or "thresholds" not in meta:
                continue
            w = graph.tensor(site.weight).detach()
            bias = graph.tensor(site.bias).detach() if site.bias else None
            mod = GatedLinear(w, bias, meta["thresholds"], meta["densities"], name=site.name,
                              target=ctx.target.tvm_target() if ctx.target is not None else None,
                              corrections=meta.pop("corrections", None))
            shape = val_shape(site.input)
            m = math.prod(shape[:-1]) if shape else 1
            h = _example_activation(node, m, w.shape[1])
            for level in range(mod.num_levels):  # the fastest schedule per level at the example's token count
                mod.set_level(level)
                mod.choose_schedule(m, h)
            mod.set_level(0)
            if self.measure:  # per level: gated where it is faster than dense, else torch's dense linear
                fns = {"dense": lambda: torch.nn.functional.linear(h, w, bias)}
                for level in range(mod.num_levels):
                    fns[level] = (lambda level=level: (mod.set_level(level), mod(h)))
                t = interleaved_ms(fns, runs=15)
                mod.set_level(0)
                meta["dense_ms"] = t["dense"]
                meta["gated_ms"] = [t[level] for level in range(mod.num_levels)]
                slower = {lv for lv in range(mod.num_levels) if t[lv] > self.margin * t["dense"]}
                if not self.force and len(slower) == mod.num_levels:
                    meta["routed"] = False
                    continue
                if not self.force:
                    mod.dense_levels = slower
            meta["dense_levels"] = sorted(mod.dense_levels)
            sub = fresh_attr(gm, "sparsecc_gated_" + site.name)
            gm.add_submodule(sub, mod)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(sub, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            meta["routed"], meta["module"] = True, sub
            if get_annotation(new) is not None:
                annotate(new, site.name, kernel=mod.kernel_name)
            removed += [t for t in (site.weight, site.bias) if t]
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            delete_unused_attrs(gm, removed)
        return PassResult(graph, changed)

    def ensures(self, graph: SparseGraph) -> None:
        for node, meta in routed_blocks(graph):
            if meta.get("routed"):
                mod = graph.gm.get_submodule(node.target)
                if mod.num_levels != len(meta["thresholds"]):
                    raise RoutingError(f"layer {meta['name']!r} is routed with {mod.num_levels} levels, "
                                       f"calibrated with {len(meta['thresholds'])}")


def _example_activation(node: fx.Node, m: int, k: int) -> torch.Tensor:
    """``(m, K)`` activations of ``node``'s input from the first calibration call (repeated to ``m`` rows)."""
    sample = node.meta.get(META, {}).pop("example", None)
    if sample is None or sample.numel() == 0:
        return torch.nn.functional.gelu(torch.randn(m, k, generator=torch.Generator().manual_seed(0)))
    reps = -(-m // sample.shape[0])
    return sample.repeat(reps, 1)[:m].contiguous()


def cluster_neurons(h: torch.Tensor, experts: int, seed: int = 0) -> torch.Tensor:
    """A permutation of the ``K`` neurons grouping them into ``experts`` equal groups that fire together.

    ``h: (T, K)`` activations of calibration tokens. Each neuron is described by its standardized activation
    magnitudes over the tokens; k-means (scikit-learn's ``KMeans``) finds ``experts`` centroids, then neurons are
    assigned greedily, closest pair first, to centroids with room left (``K / experts`` each), the balanced
    clustering MoEfication (Zhang et al. 2022) uses. Returns ``perm: (K,)``, expert ``e`` owning
    ``perm[e·C : (e+1)·C]``.

    Raises
    ------
    InvalidArgumentError
        ``experts`` not dividing ``K``.
    """
    import numpy as np
    from sklearn.cluster import KMeans

    t, k = h.shape
    if experts < 1 or k % experts:
        raise InvalidArgumentError(f"{experts} experts do not split {k} neurons evenly")
    f = h.abs().t().double()
    f = (f - f.mean(1, keepdim=True)) / f.std(1, keepdim=True).clamp_min(1e-12)
    feats = f.numpy()
    km = KMeans(n_clusters=experts, n_init=3, random_state=seed).fit(feats)
    dist = ((feats[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # (K, E)
    cap = k // experts
    room = [cap] * experts
    owner = -np.ones(k, dtype=np.int64)
    for idx in np.argsort(dist, axis=None, kind="stable"):
        j, e = divmod(int(idx), experts)
        if owner[j] < 0 and room[e] > 0:
            owner[j] = e
            room[e] -= 1
    return torch.from_numpy(np.argsort(owner, kind="stable"))


def fit_router(x: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, experts: int) -> tuple:
    """Least-squares linear router: scores ``x · Rᵀ + r`` predicting each expert's activation mass ``sum |h|``.

    ``x: (T, d)`` block inputs, ``h: (T, K)`` activations of the same tokens. Returns ``(R (E, d), r (E,))``.
    (MoEfication trains a small MLP router on the same target; a linear one needs no training loop.)
    """
    mass = h.abs()[:, perm].reshape(h.shape[0], experts, -1).sum(-1).double()
    a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, mass, driver="gelsd").solution  # (d + 1, E)
    return sol[:-1].t().float().contiguous(), sol[-1].float().contiguous()


class MoEfyBlocks(Pass):
    """Run every plain feed-forward block as a mixture of experts (rewrite pass; MoEfication).

    For each block :class:`FindMLPBlocks` marked (``linear → GELU/ReLU → linear``), records the block's input
    and intermediate activation on ``calibration``, groups the neurons into ``experts`` experts
    (:func:`cluster_neurons`), fits a router (:func:`fit_router`) and replaces the three nodes by a
    :class:`sparsecc.runtime.moe.MoEFFN` running the ``top_k`` experts per token. Gated (SwiGLU) blocks and
    other activations are left as they are. Writes ``meta["moe"] = {"experts", "top_k", "recall"}``, where
    recall is the fraction of the calibration activation mass in the experts the router picks.

    Raises
    ------
    RoutingError
        No block to MoE-fy.
    InvalidArgumentError
        ``experts`` < 1, ``top_k`` outside ``[1, experts]``, or ``experts`` not dividing a block's neurons.
    """

    name = "moefy_blocks"
    requires = ("find_mlp_blocks",)

    def __init__(self, experts: int, top_k: int, calibration):
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise InvalidArgumentError(f"experts must be a positive int, got {experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise InvalidArgumentError(f"top_k must be an int in [1, experts = {experts}], got {top_k!r}")
        self.experts, self.top_k = experts, top_k
        self.calibration = list(calibration) if calibration is not None else []

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        from ..runtime.moe import MoEFFN

        blocks = []
        for node, meta in routed_blocks(graph):
            if meta.get("role") != "down" or meta["gated"] or meta["activation"] not in ("gelu", "relu"):
                continue
            act = node.args[0]
            if meta["activation"] == "gelu" and (act.args[1:] or act.kwargs.get("approximate", "none")) not in (
                    (), "none", ("none",)):
                continue
            up = graph._as_linear(act.args[0])
            if up is None or len(up.node.users) != 1:
                continue
            blocks.append((node, meta, act, up))
        if not blocks:
            raise RoutingError("MoE-fication found no feed-forward block (linear → GELU/ReLU → linear) in the model")
        if not self.calibration:
            raise DataError("MoE-fication needs calibration inputs (calibration=[example calls])")
        for node, meta, act, up in blocks:
            k = meta["neurons"]
            if k % self.experts:
                raise InvalidArgumentError(f"block {meta['name']!r}: {self.experts} experts do not split its {k} "
                                           f"neurons evenly")
        rec = record_inputs(graph, [n for n, *_ in blocks] + [up.node for *_, up in blocks], self.calibration)
        gm = graph.gm
        removed = []
        for i, (node, meta, act, up) in enumerate(blocks):
            site = graph._as_linear(node)
            h = torch.cat(rec[node].rows)
            x = torch.cat(rec[up.node].rows)
            if h.shape[0] != x.shape[0]:
                raise RoutingError(f"block {meta['name']!r}: its input and activation were recorded for different "
                                   f"tokens ({x.shape[0]} and {h.shape[0]} rows)")
            perm = cluster_neurons(h, self.experts, seed=i)
            r_w, r_b = fit_router(x, h, perm, self.experts)
            mod = MoEFFN(graph.tensor(up.weight), graph.tensor(up.bias) if up.bias else None,
                         graph.tensor(site.weight), graph.tensor(site.bias) if site.bias else None,
                         meta["activation"], perm, self.experts, self.top_k, r_w, r_b, name=meta["name"],
                         target=ctx.target.tvm_target() if ctx.target is not None else None)
            with torch.no_grad():
                mask = mod.expert_mask(x)
                mass = h.abs()[:, perm]
                shape = val_shape(up.input)
                m = math.prod(shape[:-1]) if shape else 1
                # the down projection's schedule, timed on the experts' activations of calibration tokens
                sample = torch.where(mask, h[:, perm], torch.zeros(()))
                mod.down.choose_schedule(m, sample.repeat(-(-m // sample.shape[0]), 1)[:m].contiguous())
                meta["moe"] = {"experts": self.experts, "top_k": self.top_k,
                               "recall": float((mass * mask).sum() / mass.sum().clamp_min(1e-30))}
            sub = fresh_attr(gm, "sparsecc_moe_" + meta["name"])
            gm.add_submodule(sub, mod)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(sub, (up.node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            for dead in (node, act, up.node):
                gm.graph.erase_node(dead)
            removed += [t for t in (site.weight, site.bias, up.weight, up.bias) if t]
        gm.graph.eliminate_dead_code()
        delete_unused_attrs(gm, removed)
        return PassResult(graph, True)
