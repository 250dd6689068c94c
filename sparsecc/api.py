"""``sparsecc.compile``: capture, prune, analyse, lower."""

from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch

from .errors import InvalidSparsityError
from .ir.capture import capture
from .passes import PassContext, PassManager, default_pipeline
from .passes.choose_format import NM_PATTERN_NAMES, PATTERN_CHOICES, example_rows
from .passes.conv import conv_matrix_shapes
from .passes.prune import check_sparsity_value, prunable_sites
from .runtime.compiled import CompiledModule, module_bytes
from .targets.base import resolve_target


def compile(model: torch.nn.Module, example_inputs: Any, *, target: str = "x86",
            sparsity: Union[None, float, dict] = None, pattern: str = "auto",
            dynamic_shapes: Optional[Any] = None, block_shape: Optional[tuple] = None,
            measure: bool = True, print_after=(), dump_dir=None, build_only: bool = False,
            tuning_db=None) -> CompiledModule:
    """Compile ``model`` into a module whose sparse linears run as TVM kernels.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model; never modified (sparsecc works on a deep copy).
    example_inputs : Tensor, tuple or dict
        Example call: positional inputs, or keyword inputs as a dict.
    target : str
        ``"x86"`` (the host CPU). ARM and CUDA arrive with issue #4.
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
    dynamic_shapes : optional
        ``torch.export`` dynamic-shape spec, e.g. ``{"x": {0: Dim("batch")}}``.
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

    Returns
    -------
    CompiledModule

    Raises
    ------
    InvalidSparsityError
        Sparsity outside [0, 1), unknown pattern, or a block shape that is not a pair.
    UnknownLayerError
        A layer named in ``sparsity`` does not exist.
    TargetError
        Unknown or unsupported target (``TargetUnavailableError``: ``"cuda"`` without a GPU and
        without ``build_only``).
    CaptureError
        The model could not be captured.
    TuningError
        ``tuning_db`` is not a tuning folder.
    """
    t0 = time.perf_counter()
    if pattern not in PATTERN_CHOICES:
        raise InvalidSparsityError(f"pattern must be one of {PATTERN_CHOICES}, got {pattern!r}")
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
    tgt = resolve_target(target)
    tgt, measure = tgt.prepare_compile(build_only=build_only, measure=measure)
    if tuning_db is not None:
        from .tune.autotune import TuningDatabase

        tgt.tuning_db = TuningDatabase(tuning_db)
    original_bytes = module_bytes(model)
    graph = capture(model, example_inputs, dynamic_shapes)

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
            block = tgt.prune_block(shapes, 1.0 - s, m) if shapes else (1, 1)

    ctx = PassContext(target=tgt, options={"prune_block": block}, print_after=print_after,
                      dump_dir=dump_dir)
    passes = default_pipeline(sparsity, pattern, block, measure=measure)
    graph = PassManager(passes).run(graph, ctx)
    return tgt.finish_compile(CompiledModule(graph, tgt, time.perf_counter() - t0, original_bytes, ctx.history,
                                             prune_block=block if sparsity is not None else None))


def prune(model: torch.nn.Module, sparsity: Union[float, dict], *, block_shape: tuple = (1, 1),
          scope: str = "layer") -> torch.nn.Module:
    """Return a copy of ``model`` whose ``nn.Linear`` and ``nn.Conv2d`` (groups=1) weights are magnitude-pruned.

    The same masks :func:`compile` applies for the same arguments (same
    scores, same global ranking), so the copy is the eager-torch reference of a
    compiled module.

    Parameters
    ----------
    model : torch.nn.Module
        Never modified.
    sparsity : float or dict
        Global sparsity in [0, 1), or ``{layer name: sparsity}``.
    block_shape : (rows, cols)
        Block pruned as a unit ((1, 1) = unstructured).
    scope : {"global", "layer"}

    Raises
    ------
    InvalidSparsityError, UnknownLayerError
    """
    import copy

    from .errors import UnknownLayerError
    from .passes.prune import MagnitudePrune, magnitude_masks

    p = MagnitudePrune(sparsity, block=block_shape, scope=scope)  # validates the values
    pruned = copy.deepcopy(model)
    from .sparsify.patterns import as_matrix, from_matrix

    linears = {n: m for n, m in pruned.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32}
    # conv2d with groups=1, as compile prunes them: the (C_out, kh·kw·C_in) matrix of the unfolded weight
    linears.update({n: m for n, m in pruned.named_modules()
                    if type(m) is torch.nn.Conv2d and m.groups == 1 and tuple(m.dilation) == (1, 1)
                    and m.weight.dtype == torch.float32 and not isinstance(m.padding, str) and n not in linears})
    if isinstance(p.sparsity, dict):
        unknown = [k for k in p.sparsity if k not in linears]
        if unknown:
            raise UnknownLayerError(f"no prunable linear or conv layer named {unknown[0]!r}")
        linears = {k: linears[k] for k in p.sparsity}
    masks = magnitude_masks({n: as_matrix(m.weight.detach()) for n, m in linears.items()}, p.sparsity, p.block,
                            scope)
    with torch.no_grad():
        for n, mask in masks.items():
            w = linears[n].weight
            w.mul_(from_matrix(mask.to(w.dtype), w.shape))
    return pruned
