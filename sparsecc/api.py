"""The public entry points: ``sparsecc.compile`` (capture, prune, analyse, lower), ``sparsecc.prune`` (the eager
reference of a compiled model) and ``sparsecc.tune`` (autotune a model's sparse kernels into a database)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .errors import InvalidArgumentError, InvalidSparsityError, TargetError, TuningError
from .formats import NM_PATTERN_NAMES, as_matrix, from_matrix
from .ir.capture import capture, check_model, warn_if_training
from .ir.rewrite import example_rows
from .passes import PassContext, PassManager, default_pipeline
from .passes.choose_format import check_pattern
from .passes.conv import conv_matrix_shapes
from .passes.pipeline import routing_pipeline
from .passes.prune import check_sparsity_value, prunable_sites, prunable_weights
from .passes.routing import check_densities
from .runtime import finish
from .runtime.compiled import CompiledModule, module_bytes
from .targets import resolve_target


def compile(model: torch.nn.Module, example_inputs: Any, *, target: str = "x86",
            sparsity: Union[None, float, dict] = None, pattern: str = "auto",
            dynamic_shapes: Optional[Any] = "auto", block_shape: Optional[tuple] = None,
            measure: bool = True, print_after=(), dump_dir=None, build_only: bool = False,
            tuning_db=None, activation_density=None, calibration=None,
            activation_gate: str = "down", moe: Optional[tuple] = None,
            gate_bias_correction: bool = True, channel_sparsity: Union[None, float, dict] = None,
            channel_importance: str = "magnitude", formats_from: Optional[CompiledModule] = None,
            rpc=None) -> CompiledModule:
    """Compile ``model`` into a module whose sparse linears run as TVM kernels.

    Parameters
    ----------
    model : torch.nn.Module or torch.export.ExportedProgram
        The user's model; never modified (sparsecc works on a deep copy). A program's ``aten.linear`` /
        ``aten.conv2d`` layers become modules again (:func:`sparsecc.ir.modules.modules_from_program`).
    example_inputs : Tensor, tuple or dict
        Example call: positional inputs, or keyword inputs as a dict.
    target : str or dict
        ``"x86"`` (the host CPU), ``"arm"`` / ``"arm:<core>"`` (cross-built, host kernels for ``cm()``),
        ``"cuda"`` or ``{"kind": "cuda", "arch": "sm_90"}``.
    sparsity : None, float or dict
        None compiles the zeros the model already has; a float in [0, 1) prunes
        every prunable linear weight by magnitude to that sparsity (so the
        linears' global sparsity is that value; one threshold across layers of
        different scales emptied whole layers of MiniLM); a dict
        ``{layer name: sparsity}`` prunes each named layer (fully qualified
        name, e.g. ``"encoder.layer.0.output.dense"``).
    pattern : {"auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4"}
        Formats allowed; with a sparsity, also how to prune ("block" prunes
        whole blocks of ``block_shape``, otherwise single weights). "auto" lets
        the cost model choose per layer (N:M formats included for weights that
        already are N:M sparse). "2:4"/"1:4" ("n:m" = "2:4") prune every linear
        (or those named in a ``sparsity`` dict) to N:M along K by magnitude and
        allow dense or that N:M kernel per layer; ``sparsity`` must then be None
        or the pattern's ``1 - n/m``.
    dynamic_shapes : "auto", None or a torch.export spec
        "auto" (the default, as ``torch.compile``): the leading (batch) dim of every input is dynamic, and the
        sequence dim of integer token inputs (ids, masks), wherever the model allows it; kernels are timed at
        the example's sizes. None fixes every dim to the example's; a ``torch.export`` spec such as
        ``{"x": {0: Dim("batch", max=64)}}`` names the dynamic dims and their ranges.
    block_shape : (rows, cols), optional
        Block shape for ``pattern="block"`` pruning; default: the block the
        target's cost model estimates fastest (area ≤ 16).
    measure : bool
        Time each sparse kernel against torch dense while choosing formats.
    print_after : sequence of str
        Pass names (or ``"all"``) after which the layer table is printed.
    dump_dir : path, optional
        Write the graph after every pass to this folder.
    build_only : bool
        Target ``"cuda"`` only: build the kernels without a GPU and return a
        :class:`~sparsecc.runtime.cuda_kernels.CudaBuildArtifact` (per-layer CUDA
        source and libraries, and the graph) instead of a runnable module.

    tuning_db : path, optional
        A ``work_dir`` written by :func:`sparsecc.tune`: sparse linear kernels
        whose workload (format, block, N, K, density bucket, M bucket, bias,
        activation, target) has a tuned record use it, the others the hand
        schedules; ``cm.report()`` marks them ``tuned(M=...)`` (or
        ``hand-kept(M=...)`` where tuning kept the hand schedule).
    activation_density : float or sequence of float, optional
        Activation routing (contextual sparsity): the down projection of every feed-forward block (linear →
        activation → linear) reads only the weight rows of the neurons whose activation magnitude passes a
        gate calibrated to keep this fraction of them. A sequence gives run-time levels, densest first
        (``cm.set_level(k)``, ``cm(x, level=k)``, ``cm.levels()``); 1.0 skips only exact zeros (lossless).
        Routed layers are those whose gated kernel, timed at the example's shape, beats torch dense; their
        weights are not pruned. See :mod:`sparsecc.passes.routing`.
    calibration : list, optional
        Example calls (tensors, tuples of positional inputs, or dicts of keyword inputs, shaped like
        ``example_inputs``, or with a batch that is a multiple of its batch) the gate thresholds are calibrated
        on; required with ``activation_density``.
    activation_gate : {"down", "both"}
        Which inputs are gated: the down projection's (the block's intermediate activation), or also the
        block's input read by the up projection (TEAL), so both projections skip weight rows.
    gate_bias_correction : bool
        Add to each routed layer's bias, per level, ``W`` times the calibration mean of the activations its gate
        drops. On MiniLM at 50% the embedding cosine rose from 0.962 to 0.973; on a ReLU MLP classifier at 5%
        density the accuracy fell by 1.6 points, so it can be turned off.
    moe : (experts, top_k), optional
        MoE-fication: every feed-forward block's neurons are grouped into ``experts`` experts by co-activation
        on ``calibration``, and a linear router runs the ``top_k`` best per token (both projections compute only
        those experts' neurons). Not combined with ``activation_density``. See
        :class:`sparsecc.passes.routing.MoEfyBlocks`.

    channel_sparsity : float or dict, optional
        Structured pruning first: remove this fraction of the channels, attention heads and FFN neurons of every
        dependency group (a dict per kind, ``{"heads": 0.5, "neurons": 0.5}``), so every kernel of the compiled
        model is physically smaller (:func:`sparsecc.sparsify.structured.prune_channels`); ``sparsity`` and
        ``pattern`` then apply inside what remains. ``cm.channels`` holds what was removed.
    channel_importance : {"magnitude", "taylor", "activation"}
        How channels are scored; "magnitude" needs no data (the others: use ``prune_channels`` or
        ``sparsify(pattern="channel")`` and compile its model).
    formats_from : CompiledModule, optional
        An earlier compile of the same weights (e.g. at other input shapes): every linear with the same name,
        weight shape and nnz takes its format without being timed again.
    rpc : str, dict or sparsecc.tune.remote.RPCDevice, optional
        ARM targets: a device behind a TVM RPC tracker, ``"host:port/key"``. The cost model is then fitted to
        kernels timed on that device (:func:`sparsecc.tune.calibrate.calibrate_remote`, cached) instead of the
        core's static roofline, and dense, CSR and BSR compete for each layer. If the device cannot be
        reached, the static roofline is used with a :class:`~sparsecc.errors.RemoteFallbackWarning`.

    Returns
    -------
    CompiledModule

    Raises
    ------
    InvalidSparsityError
        Sparsity outside [0, 1), unknown pattern, or a block shape that is not a pair.
    UnsupportedOpError
        ``channel_sparsity`` on a model with an op the channel analysis does not know (the message names it).
    StructureError
        ``channel_sparsity``: the smaller model is not what the dependency groups predict.
    UnknownLayerError
        A layer named in ``sparsity`` does not exist.
    TargetError
        Unknown or unsupported target (``TargetUnavailableError``: ``"cuda"`` without a GPU and
        without ``build_only``).
    CaptureError
        The model could not be captured.
    InvalidArgumentError
        ``model`` is not a ``torch.nn.Module``; an activation density outside (0, 1]; ``moe`` not a pair, or
        given with ``activation_density``; ``experts`` not dividing a block's neurons; ``top_k`` outside
        ``[1, experts]``.
    RoutingError
        ``activation_density`` or ``moe`` given for a model without a feed-forward block.
    DataError
        Routing without calibration inputs, or with one they do not run through.
    TuningError
        ``tuning_db`` is not a tuning folder.
    RPCError
        ``rpc`` is not of the form ``"host:port/key"``.

    Warns
    -----
    TrainModeWarning
        The model is in training mode: the compiled module has its ``eval()`` semantics.
    PatternWarning
        ``block_shape`` does not tile some layers (they are pruned unstructured).
    RemoteFallbackWarning
        ``rpc`` could not be used (the message says why).
    """
    t0 = time.perf_counter()
    model = _from_program(model)
    check_model(model, "compile")
    warn_if_training(model, "compile")
    check_pattern(pattern)
    if isinstance(sparsity, dict):
        for k, v in sparsity.items():
            check_sparsity_value(v, f"layer {k!r}")
    elif sparsity is not None:
        check_sparsity_value(sparsity, "the model")
    nm = NM_PATTERN_NAMES.get(pattern)
    if nm is not None:  # N:M has a fixed sparsity 1 - n/m
        for where, v in (sparsity.items() if isinstance(sparsity, dict) else [("the model", sparsity)]):
            if v is not None and abs(float(v) - (1 - nm[0] / nm[1])) > 1e-6:
                raise InvalidSparsityError(
                    f"pattern {pattern!r} prunes to sparsity {1 - nm[0] / nm[1]:g}; got {v} for {where} "
                    "(pass sparsity=None)")
    if block_shape is not None and (len(tuple(block_shape)) != 2 or min(block_shape) < 1):
        raise InvalidSparsityError(f"block_shape must be (rows, cols) ≥ 1, got {block_shape!r}")
    if activation_density is not None:
        check_densities(activation_density)
    if moe is not None:
        if activation_density is not None:
            raise InvalidArgumentError("moe and activation_density are two routings of the same blocks; give one")
        if not isinstance(moe, (tuple, list)) or len(moe) != 2:
            raise InvalidArgumentError(f"moe must be (experts, top_k), got {moe!r}")
    tgt = resolve_target(target, build_only=build_only)
    tgt.check_available()
    if rpc is not None:
        tgt = _remote_target(tgt, rpc)
    if (activation_density is not None or moe is not None) and tgt.kind not in ("x86", "arm"):
        raise TargetError(f"activation routing runs on CPU targets (x86, arm), not {tgt.name!r}")
    db = None
    if tuning_db is not None:
        from .tune.lookup import TuningDatabase

        db = TuningDatabase(tuning_db)
    ctx = PassContext(target=tgt, print_after=print_after, dump_dir=dump_dir, tuning_db=db)
    if formats_from is not None:
        if not isinstance(formats_from, CompiledModule):
            raise InvalidArgumentError(f"formats_from must be a CompiledModule, got {type(formats_from).__name__}")
        ctx.options["prior_formats"] = {a.name: a for a in formats_from.layers}
    original_bytes = module_bytes(model)
    channels = None
    if channel_sparsity is not None:  # structure first: a physically smaller copy, then the usual pipeline
        from .sparsify.structured import prune_channels

        if channel_importance != "magnitude":
            raise InvalidArgumentError("compile(channel_sparsity=...) scores channels by magnitude; for "
                                       f"{channel_importance!r} importance (it needs data) call "
                                       "sparsecc.sparsify(pattern='channel') and compile its model")
        channels = prune_channels(model, example_inputs, channel_sparsity, importance=channel_importance)
        model = channels.model
    graph = capture(model, example_inputs, dynamic_shapes)
    graph.prunable = frozenset(fqn for fqn, _ in prunable_weights(model).values())  # what prune() prunes

    block = (1, 1)
    if sparsity is not None and pattern == "block":
        if block_shape is not None:
            block = tuple(int(b) for b in block_shape)
        else:
            sites = prunable_sites(graph)
            shapes = [tuple(graph.tensor(s.weight).shape) for s in sites]
            shapes += conv_matrix_shapes(graph)  # convs as (C_out, kh·kw·C_in) (passes/conv.py)
            s = sparsity if not isinstance(sparsity, dict) else sum(sparsity.values()) / max(len(sparsity), 1)
            m = example_rows(sites[0].input) if sites else 1
            block = ctx.cost_model.best_block(shapes, 1.0 - s, m) if shapes else (1, 1)

    ctx.options["prune_block"] = block
    passes = default_pipeline(tgt, sparsity, pattern, block, measure=measure)
    if activation_density is not None or moe is not None:
        passes += routing_pipeline(activation_density, calibration, measure=measure and tgt.can_time_kernels,
                                   gate=activation_gate, moe=tuple(moe) if moe is not None else None,
                                   bias_correction=gate_bias_correction)
    graph = PassManager(passes).run(graph, ctx)
    cm = CompiledModule(graph, tgt, time.perf_counter() - t0, original_bytes, ctx.history,
                        prune_block=block if sparsity is not None else None)
    if activation_density is not None or moe is not None:
        cm.calibration = list(calibration)
    cm.channels = channels
    cm.example_inputs = example_inputs
    cm.tuning_db = db
    return finish(cm, tgt)


def _from_program(model):
    """A ``torch.export.ExportedProgram`` as a module with its linears and convs as modules, else ``model``."""
    if not isinstance(model, torch.export.ExportedProgram):
        return model
    from .ir.modules import modules_from_program

    module = modules_from_program(model)
    for sub in module.modules():  # traced in the mode it was exported in; the flag alone would warn
        sub.training = False
    return module


def _remote_target(tgt, rpc):
    """``tgt`` (an ARM target) with its formats timed on the remote device ``rpc``."""
    from .targets.arm import ArmTarget
    from .tune.remote import RPCDevice

    if tgt.kind != "arm":
        raise TargetError(f"rpc= times kernels on a remote ARM device; target {tgt.name!r} is measured on this "
                          "host (use target='arm' or 'arm:<core>')")
    return ArmTarget(tgt.device, rpc=RPCDevice.parse(rpc))


def prune(model: torch.nn.Module, sparsity: Union[None, float, dict] = None, *, block_shape: tuple = (1, 1),
          scope: str = "layer", pattern: Optional[str] = None) -> torch.nn.Module:
    """Return a copy of ``model`` with its prunable weights magnitude-pruned: the eager-torch reference of
    ``compile(model, ..., sparsity=sparsity, pattern=..., block_shape=block_shape)``.

    Which weights are pruned is decided by :func:`sparsecc.passes.prune.prunable_weights`, the function
    ``compile`` uses too (linears, attention's fused ``in_proj_weight``, conv-like modules), and the masks are
    the same (same scores, same ranking).

    Parameters
    ----------
    model : torch.nn.Module
        Never modified.
    sparsity : float or dict
        Sparsity in [0, 1), or ``{layer name: sparsity}``; with an N:M ``pattern``, None or ``1 - n/m``.
    block_shape : (rows, cols)
        Block pruned as a unit ((1, 1) = unstructured).
    scope : {"global", "layer"}
    pattern : {"2:4", "1:4", ...}, optional
        N:M along the reduction axis (K) of every prunable linear, as ``compile(pattern="2:4")``.

    Raises
    ------
    InvalidSparsityError, UnknownLayerError
    InvalidArgumentError
        ``model`` is not a ``torch.nn.Module``.

    Warns
    -----
    PatternWarning
        ``block_shape`` does not tile some layers (they are pruned unstructured).
    """
    import copy

    from .errors import UnknownLayerError
    from .passes.prune import MagnitudePrune, magnitude_masks

    check_model(model, "prune")
    if not (isinstance(block_shape, (tuple, list)) and len(block_shape) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_shape)):
        raise InvalidSparsityError(f"block_shape must be (rows, cols) of integers ≥ 1, got {block_shape!r}")
    if pattern is not None:
        nm = NM_PATTERN_NAMES.get(pattern)
        if nm is None:
            raise InvalidSparsityError(f"prune's pattern must be an N:M name ({', '.join(NM_PATTERN_NAMES)}), "
                                       f"got {pattern!r}; block patterns take block_shape=")
        if sparsity is not None and (isinstance(sparsity, dict) or abs(float(sparsity) - (1 - nm[0] / nm[1])) > 1e-6):
            raise InvalidSparsityError(f"pattern {pattern!r} prunes to sparsity {1 - nm[0] / nm[1]:g}; got {sparsity!r}")
        from .passes.nm import nm_prune_weight

        pruned = copy.deepcopy(model)
        params = dict(pruned.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for fqn, kind in prunable_weights(pruned).values():
                if kind == "linear":
                    params[fqn].copy_(nm_prune_weight(params[fqn].detach(), *nm))
        return pruned
    if sparsity is None:
        raise InvalidSparsityError("prune needs a sparsity (or an N:M pattern=)")
    p = MagnitudePrune(sparsity, block=tuple(block_shape), scope=scope)  # validates the values
    pruned = copy.deepcopy(model)
    layers = prunable_weights(pruned)  # the decision compile shares
    if isinstance(p.sparsity, dict):
        unknown = [k for k in p.sparsity if k not in layers]
        if unknown:
            raise UnknownLayerError(f"no prunable linear or conv layer named {unknown[0]!r}; prunable layers are: "
                                    f"{', '.join(sorted(layers)) or 'none'}")
        layers = {k: layers[k] for k in p.sparsity}
    params = dict(pruned.named_parameters(remove_duplicate=False))
    masks = magnitude_masks({n: as_matrix(params[fqn].detach()) for n, (fqn, _) in layers.items()}, p.sparsity,
                            p.block, scope)
    with torch.no_grad():
        for n, mask in masks.items():
            w = params[layers[n][0]]
            w.mul_(from_matrix(mask.to(w.dtype), w.shape))
    return pruned


@dataclass
class TuningSummary:
    """What :func:`tune` did, per distinct workload.

    Attributes
    ----------
    results : list of WorkloadResult
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
    from .ir.annotations import get_annotation
    from .runtime.kernels import SparseLinear
    from .tune.space import Workload

    gm = cm.graph.gm
    workloads, layers = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if type(mod) is not SparseLinear:  # N:M and conv kernels have no tuning space
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
         rows=None, dynamic_shapes="auto", block_shape=None, seed: int = 0, rpc=None) -> TuningSummary:
    """Autotune the sparse kernels ``sparsecc.compile`` would use for ``model`` into ``work_dir``.

    Runs compile's analysis (capture, pruning, format choice by the cost model
    without timing, so the same layers are tuned on every run; lowering with the
    hand schedules) with the same arguments, collects each sparse linear's
    workload (format and block, ``W: (N, K)``, density bucket, M bucket, bias,
    activation, target) and tunes every distinct one with MetaSchedule
    (:func:`sparsecc.tune.tuner.tune_workloads`). Workloads already tuned to ``trials`` in
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
    rpc : str, dict or sparsecc.tune.remote.RPCDevice, optional
        ARM targets: the device behind a TVM RPC tracker (``"host:port/key"``) the candidates are cross-built
        for and timed on. Formats are chosen as ``compile(..., target=target, rpc=rpc)`` chooses them, and the
        records are stored under the device's target, where ``compile(target=..., tuning_db=work_dir)`` finds
        them for the exported artifact.

    Returns
    -------
    TuningSummary
        Per workload: trials, best tuned ms, hand-schedule ms, ratio, choice.

    Raises
    ------
    TuningError
        A target other than x86 without ``rpc`` (or other than ARM with it), ``trials < 1``, or an
        unreadable database.
    RPCError
        ``rpc`` is malformed or cannot be reached.
    """
    from .tune.tuner import tune_workloads

    host = isinstance(target, str) and target.lower() in ("x86", "x86_64", "cpu", "llvm", "host")
    if rpc is None and not host:
        raise TuningError(f"autotuning on this host supports the x86 target; {target!r} is tuned on its device "
                          "(pass rpc='host:port/key', a TVM RPC tracker and the device's key)")
    if int(trials) < 1:
        raise TuningError(f"trials must be ≥ 1, got {trials}")
    device = None
    if rpc is not None:
        from .tune.remote import RPCDevice

        device = RPCDevice.parse(rpc)
        device.check().close()  # fail before compiling (compile alone would fall back to the static roofline)
    cm = compile(model, example_inputs, target=target, sparsity=sparsity, pattern=pattern,
                    dynamic_shapes=dynamic_shapes, block_shape=block_shape, measure=False, rpc=device)
    if device is None and getattr(cm.target, "name", "x86") != "x86":
        raise TuningError(f"autotuning on this host supports the x86 target, got {cm.target!r}")
    workloads, layers = model_workloads(cm, rows)
    tvm_target = cm.target.deploy_tvm_target() if device is not None else cm.target.tvm_target()
    results = tune_workloads(workloads, work_dir, target=tvm_target, trials=trials,
                             time_budget_s=time_budget_s, progress=progress, seed=seed, rpc=device)
    return TuningSummary(results, layers, str(work_dir))
