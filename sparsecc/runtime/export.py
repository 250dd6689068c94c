"""Whole-model export: one Relax VM artifact for the host or an aarch64 board, and :func:`load`.

``CompiledModule.export(path)`` turns the compiled graph into a deployment folder:

* ``model.so``: a Relax VM executable (TVM 0.27). The sparse layers of the compiled graph
  (``SparseLinear``, ``SparseConv2d``) become ``relax.call_tir`` to their *scheduled* TensorIR kernels
  (the same templates and rules the host uses; for ARM built with NEON tile sizes for the aarch64 target), with
  their sparse weights as constants; the dense linears (``aten.linear`` on graph weights) become packed GEMMs
  and the dense convs NCHW GEMMs (on im2col columns unless pointwise) or depthwise kernels
  (:mod:`sparsecc.runtime.dense`) with their weights as constants; softmaxes over a static last axis the
  vector-exp row kernel of :mod:`sparsecc.codegen.softmax` (:func:`_softmax_legalizer`); every other op
  (dilated or other grouped convs, pooling, adds, norms, attention matmuls) is imported by
  ``tvm.relax.frontend.torch.from_exported_program``, legalized, and scheduled with dlight's CPU rules plus
  :func:`_dense_rule` (reductions and matmuls tiled, parallel and vectorized; element-wise ops parallel and
  vectorized).
* ``params.bin``: the remaining dense parameters, detached, in the tensor-file format of
  :mod:`sparsecc.targets.qemu` (the harness and :func:`load` read it).
* ``manifest.json``: format version, target, input and output specs (static shapes: the example inputs';
  ``fixed_dims`` lists an input's dims that were dynamic in the compiled module and are fixed here), the
  output structure as a JSON tree (:func:`sparsecc.runtime.deploy.tree_flatten`), per-layer formats, the
  files' SHA-256, sparsecc / torch / TVM versions.

How the sparse layers reach Relax: each kernel module is swapped for a call of an opaque torch custom op
(``sparsecc::export_linear``, ``sparsecc::export_conv``) before ``torch.export``; ``from_exported_program``
then converts those nodes through its ``custom_convert_map`` into ``call_tir`` plus the layout glue (padding
M to the kernel's tile, NCHW <-> NHWC, zero borders), so no pattern matching on imported matmuls is needed.

A host artifact is loaded with :func:`load` (``sparsecc.load``, ``sparsecc.runtime.load``; it lives in the
torch-free :mod:`sparsecc.runtime.deploy` and is re-exported here) into a callable; an aarch64 artifact is run
with :func:`run_artifact_under_qemu` here, or copied to a board with the aarch64 ``libtvm_runtime.so``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from sparsecc.errors import (
    ArtifactError,
    InputDtypeError,
    InputShapeError,
    UnsupportedOpError,
)
from sparsecc.formats import get_format
from sparsecc.runtime.deploy import (  # noqa: F401 - re-exported: the loader lives in the torch-free module
    FILES, FORMAT_VERSION, OPENED, ExportedModule, _check_signature, _flatten_result, _sha256, load, read_manifest,
    tree_flatten, tree_unflatten)
from sparsecc.runtime import register_kernels
from sparsecc.runtime.dense import dense_convs_for_export, dense_linears_for_export

register_kernels()  # the export converters of every format

__all__ = ["ExportContext", "ExportedModule", "export_compiled", "load", "panels_for_export", "rows_for_export",
           "run_artifact_under_qemu"]

# -- opaque custom ops standing for the kernel modules during torch.export ------------------------------------

_MODULES: dict[int, torch.nn.Module] = {}
_IDS = itertools.count()


@torch.library.custom_op("sparsecc::export_linear", mutates_args=())
def _export_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    mod = _MODULES[layer]  # alone: a module chained to the next one (passes.lower.ChainSparseLinears) returns (..., N)
    return (mod.forward_standalone(x) if hasattr(mod, "forward_standalone") else mod(x)).clone()


@_export_linear.register_fake
def _(x, layer):
    return x.new_empty((*x.shape[:-1], _MODULES[layer].shape[0]))


@torch.library.custom_op("sparsecc::export_conv", mutates_args=())
def _export_conv(x: torch.Tensor, residual: torch.Tensor | None, layer: int) -> torch.Tensor:
    mod = _MODULES[layer]
    y = mod(x, residual) if residual is not None else mod(x)
    return y.contiguous()


def _conv_out_shape(mod, x_shape):
    n, _, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
    return (n, mod.c_out, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)


@_export_conv.register_fake
def _(x, residual, layer):
    return x.new_empty(_conv_out_shape(_MODULES[layer], x.shape))


@torch.library.custom_op("sparsecc::export_gated", mutates_args=())
def _export_gated(x: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor, layer: int) -> torch.Tensor:
    return _MODULES[layer](x).clone()


@_export_gated.register_fake
def _(x, threshold, bias, layer):
    return x.new_empty((*x.shape[:-1], _MODULES[layer].shape[0]))


class _GatedCall(torch.nn.Module):
    """A gated linear during export: its threshold and bias are parameters (TVM's importer keeps parameters as
    inputs of ``main``, buffers it folds), which :meth:`ExportedModule.set_level` replaces (one artifact, every
    level)."""

    def __init__(self, layer: int, threshold: float, bias: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.threshold = torch.nn.Parameter(torch.tensor([threshold], dtype=torch.float32), requires_grad=False)
        self.bias = torch.nn.Parameter(bias.detach().clone().float(), requires_grad=False)

    def forward(self, x):
        return torch.ops.sparsecc.export_gated(x, self.threshold, self.bias, self.layer)


class _LinearCall(torch.nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.ops.sparsecc.export_linear(x, self.layer)


class _ConvCall(torch.nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, x, residual=None):
        return torch.ops.sparsecc.export_conv(x, residual, self.layer)


def _kernel_kind(mod) -> str | None:
    """``"linear"`` / ``"conv2d"`` for an exportable sparsecc kernel module, None for other modules.

    Raises
    ------
    UnsupportedOpError
        A sparsecc kernel module that cannot be exported (no layer kind, or CUDA modules).
    """
    if not type(mod).__module__.startswith("sparsecc.runtime"):
        return None
    if getattr(mod, "format", None) in ("gated", "moe"):  # activation routing (runtime.gated, runtime.moe)
        return mod.format
    kind = getattr(mod, "layer_kind", None)
    if kind is None or not getattr(mod, "exportable", True):
        raise UnsupportedOpError(f"{type(mod).__name__} kernels have no export path (exported: the CPU kernel "
                                 "modules)")
    get_format(mod.format).exporter(kind)  # raises UnsupportedOpError naming the format
    return kind


def _export_view(gm: torch.fx.GraphModule):
    """A copy of ``gm`` whose kernel modules, and ``aten.linear`` and dense ``aten.conv2d`` calls on graph
    weights (:func:`sparsecc.runtime.dense.dense_linears_for_export`,
    :func:`~sparsecc.runtime.dense.dense_convs_for_export`), are custom-op calls; returns
    (copy, {layer id: module})."""
    import copy

    view = copy.copy(gm)  # shallow: shares parameters; submodules replaced on the copy only
    view.graph = copy.deepcopy(gm.graph)
    layers = {}
    for node in view.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        try:
            kind = _kernel_kind(mod)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"layer {node.target}: {e}") from None
        if kind is None:
            continue
        lid = next(_IDS)
        layers[lid] = mod
        name = f"sparsecc_export_{lid}"
        if kind == "gated":
            call = _GatedCall(lid, mod.export_thresholds()[0], mod.level_bias(0))
        else:  # a MoE block is a linear from the outside: (..., d) -> (..., N)
            call = _LinearCall(lid) if kind in ("linear", "moe") else _ConvCall(lid)
        view.add_submodule(name, call)
        node.target = name
    dense = [(f, _LinearCall) for f in dense_linears_for_export(view)]  # the dense rest's GEMMs
    dense += [(f, _ConvCall) for f in dense_convs_for_export(view)]
    for (node, mod, last), call_type in dense:
        lid = next(_IDS)
        layers[lid] = mod
        name = f"sparsecc_export_{lid}"
        view.add_submodule(name, call_type(lid))
        with view.graph.inserting_before(node):
            call = view.graph.call_module(name, (node.args[0],))
        last.replace_all_uses_with(call)
        for dead in ([last, node] if last is not node else [node]):
            view.graph.erase_node(dead)
    for node in [n for n in view.graph.nodes if n.op == "get_attr" and not n.users]:
        view.graph.erase_node(node)
    # a GraphModule holds only what its graph reads: the replaced modules' and weights' tensors are not
    # lifted into the exported program (nor into params.bin)
    return torch.fx.GraphModule(view, view.graph), layers


# -- converters: custom-op nodes -> relax.call_tir ------------------------------------------------------------


class ExportContext:
    """What an export converter needs: the target, the block builder's kernel functions, constants.

    A converter is registered per format and layer kind (``Format.register_exporter``) next to its
    runtime module (:mod:`sparsecc.runtime.kernels`, :mod:`sparsecc.runtime.nm`,
    :mod:`sparsecc.runtime.conv`); it turns one kernel module into ``relax.call_tir`` of its scheduled
    kernel plus the layout glue.

    Attributes
    ----------
    target : sparsecc.targets.Target
    tvm_target : tvm.target.Target
        What the artifact is built for (:meth:`Target.deploy_tvm_target`).
    """

    def __init__(self, layers: dict, target, tuning_db=None):
        self.layers = layers
        self.target = target
        self.tvm_target = target.deploy_tvm_target()
        self.tuning_db = tuning_db
        self.tuned_layers: list = []  # names of the kernels built from tuned schedules
        self.funcs = {}  # kernel name -> GlobalVar

    def tuned_linear(self, block, n: int, k: int, nnzb: int, bias: bool, activation, regime: str, m: int):
        """``(schedule, m_tile)`` tuned for the deploy target (``compile(tuning_db=...)``), or None."""
        if self.tuning_db is None:
            return None
        found = self.tuning_db.for_layer(block, n, k, nnzb, bias, activation, self.tvm_target)
        return found.schedule(regime, m) if found is not None else None

    def gvar(self, bb, name: str, sch):
        """The GlobalVar of the scheduled kernel ``sch`` added to ``bb`` once under ``name``."""
        gv = self.funcs.get(name)
        if gv is None:
            func = (sch.mod if hasattr(sch, "mod") else sch)["main"].with_attr("global_symbol", name)
            gv = bb.add_func(func, name)
            self.funcs[name] = gv
        return gv

    @staticmethod
    def const(t: torch.Tensor):
        """A Relax constant holding ``t``."""
        from tvm import relax

        return relax.const(np.ascontiguousarray(t.detach().cpu().numpy()))

    def linear(self, node, importer):
        x = importer.env[node.args[0]]
        mod = self.layers[node.args[1]]
        if mod.format == "moe":  # not a weight format: its converter lives with the module
            from sparsecc.runtime.moe import export_moe

            return export_moe(self, importer.block_builder, x, mod)
        return get_format(mod.format).exporter("linear")(self, importer.block_builder, x, mod)

    def conv(self, node, importer):
        x = importer.env[node.args[0]]
        res = importer.env[node.args[1]] if node.args[1] is not None else None
        mod = self.layers[node.args[2]]
        return get_format(mod.format).exporter("conv2d")(self, importer.block_builder, x, res, mod)

    def gated(self, node, importer):
        from sparsecc.runtime.gated import export_gated_linear

        x, th, bias = (importer.env[a] for a in node.args[:3])
        return export_gated_linear(self, importer.block_builder, x, th, self.layers[node.args[3]], bias=bias)

    def convert_map(self):
        return {"export_linear.default": self.linear, "export_conv.default": self.conv,
                "export_gated.default": self.gated}


def panels_for_export(bb, x, m: int, k: int, mt: int, kp: int | None = None):
    """Relax X^T panels of X (..., K): ``XT (MT, Kp, mt)`` with ``MT = ceil(M / mt)``, rows and columns zero-padded.

    The layout :func:`sparsecc.runtime.xcsr.pack_xt` and the N:M module's tiled transpose build at run time.
    Returns ``(XT, MT)``.
    """
    from tvm import relax

    kp = k if kp is None else kp
    mtiles = -(-max(m, 1) // mt)
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    if mtiles * mt != m or kp != k:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, mtiles * mt - m, 0, kp - k]))
    return bb.emit(relax.op.permute_dims(relax.op.reshape(x2, (mtiles, mt, kp)), [0, 2, 1])), mtiles


def rows_for_export(x) -> tuple:
    """``(lead shape, M)`` of a Relax tensor ``x`` of static shape (..., K)."""
    shape = [int(v) for v in x.ty.shape.values]
    lead = shape[:-1]
    return lead, (int(np.prod(lead)) if lead else 1)


# -- export ------------------------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import version

    import tvm

    return {"sparsecc": version("sparsecc"), "tvm": tvm.__version__, "torch": torch.__version__}


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"export path {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ArtifactError(f"export folder {path} is not empty; pass overwrite=True to replace its contents")


def export_compiled(cm, path, *, overwrite: bool = False, example_inputs=None) -> Path:
    """Build the compiled module ``cm`` as a Relax VM artifact for its target and write the folder ``path``.

    Parameters
    ----------
    cm : CompiledModule
    path : str or Path
        Folder to create. A non-empty existing folder is only replaced with ``overwrite=True``; the new files are
        written to a temporary sibling first, so a failed export leaves ``path`` as it was.
    overwrite : bool
    example_inputs : optional
        Inputs fixing the exported shapes (default: the compiled graph's example inputs).

    Returns
    -------
    Path

    Raises
    ------
    ArtifactError
        ``path`` is a file or a non-empty folder without ``overwrite``.
    UnsupportedOpError
        TVM cannot import an op of the graph, or a layer kind has no export path.
    ToolchainError
        ARM: the cross toolchain cannot be fetched or the link failed.
    """
    import tvm
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    from sparsecc.targets.qemu import write_tensors

    path = Path(path).resolve()  # "." has no name and no parent to write a sibling into
    _check_destination(path, overwrite)
    target_obj = cm.target
    tvm_target = target_obj.deploy_tvm_target()
    args, kwargs = _example_inputs(cm, example_inputs)
    if kwargs:
        raise UnsupportedOpError("export takes positional inputs only (keyword inputs are not supported)")
    view, layers = _export_view(cm.graph.gm)
    _MODULES.update(layers)
    try:
        with torch.no_grad():
            ep = torch.export.export(view, tuple(args))
            ref = view(*args)
        conv = ExportContext(layers, target_obj, getattr(cm, "tuning_db", None))
        try:
            mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=conv.convert_map())
        except Exception as e:
            raise UnsupportedOpError(f"TVM could not import the compiled graph for export: {e}") from e
    finally:
        for k in layers:
            _MODULES.pop(k, None)
    mod, params = detach_params(mod)
    param_list = [p.numpy() for p in params.get("main", [])]
    routing = _routing_manifest(mod, layers, len(args))
    ex = tvm.compile(mod, target=tvm_target, relax_pipeline=_relax_pipeline(tvm_target, set(conv.funcs)))
    out_leaves, out_tree = tree_flatten(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        target_obj.export_library(ex, tmp / "model.so")
        write_tensors(tmp / "params.bin", param_list)
        manifest = {
            "format_version": FORMAT_VERSION,
            "target": {"name": target_obj.name, "tvm": str(tvm_target), "arch": target_obj.deploy_arch},
            "inputs": _input_specs(cm, args),
            "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in out_leaves],
            "output_tree": out_tree,
            "num_params": len(param_list),
            "layers": [{"name": a.name, "format": a.format,
                        "block": list(a.format_params) if a.format_params else None, "density": a.density}
                       for a in cm.layers],
            "tuned_kernels": sorted(set(conv.tuned_layers)),
            "versions": _versions(),
            "files": {},
        }
        if routing is not None:
            manifest["routing"] = routing
        for f in ("model.so", "params.bin"):
            manifest["files"][f] = _sha256(tmp / f)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            if Path.cwd() == path or path in Path.cwd().parents:  # a folder in use cannot be renamed:
                moved = []                                         # swap its contents instead
                try:
                    for entry in list(path.iterdir()):
                        os.rename(entry, old / entry.name)
                        moved.append(entry)
                    for f in FILES:
                        os.rename(tmp / f, path / f)
                except OSError:
                    for entry in moved:  # put the user's files back before reporting the failure
                        if not entry.exists():
                            os.rename(old / entry.name, entry)
                    raise
            else:
                os.rename(path, old / "x")
                try:
                    os.rename(tmp, path)
                except OSError:
                    os.rename(old / "x", path)  # the user's folder back as it was
                    raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _routing_manifest(mod, layers: dict, n_inputs: int):
    """``{"levels": L, "gates": [{"layer", "param", "thresholds", "bias_param", "biases"}]}`` for the gated layers
    of an export: which parameters of ``main`` hold each layer's threshold and bias (found by name) and their
    values per level."""
    gated = {lid: m for lid, m in layers.items() if getattr(m, "format", None) == "gated"}
    if not gated:
        return None
    names = [str(p.name) for p in mod["main"].params[n_inputs:]]
    gates = []
    for lid, m in gated.items():
        found = {}
        for what in ("threshold", "bias"):
            hits = [i for i, nm in enumerate(names) if nm.endswith(f"sparsecc_export_{lid}_{what}")]
            if len(hits) != 1:
                raise UnsupportedOpError(f"layer {m.name}: its gate {what} is not one parameter of the exported "
                                         f"function (parameters: {names})")
            found[what] = hits[0]
        gates.append({"layer": m.name, "param": found["threshold"], "thresholds": m.export_thresholds(),
                      "bias_param": found["bias"], "biases": m.export_biases()})
    return {"levels": len(gates[0]["thresholds"]), "gates": gates}


def _example_inputs(cm, example_inputs):
    """``(args, kwargs)`` fixing the exported shapes: ``example_inputs``, else the compile's example inputs
    (``cm.example_inputs``, then the graph's), else random inputs of the graph's static input specs.

    Raises
    ------
    UnsupportedOpError
        No example inputs are known and the compiled graph has dynamic input dims.
    """
    from sparsecc.ir.capture import normalize_inputs

    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    for ex in (getattr(cm, "example_inputs", None), getattr(cm.graph, "example_inputs", None)):
        if ex is None:
            continue
        if isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[0], (tuple, list)) and isinstance(ex[1], dict):
            return tuple(ex[0]), dict(ex[1])  # (args, kwargs)
        return normalize_inputs(ex)
    specs = getattr(cm.graph, "input_specs", None) or []
    if not specs or any(d is None for s in specs for d in s.shape):
        raise UnsupportedOpError("export needs example_inputs= (the compiled graph has dynamic input dims and "
                                 "the compiled module holds no example inputs)")
    return tuple(torch.randn(s.shape).to(s.dtype) for s in specs), {}


def _input_specs(cm, args) -> list:
    """Manifest input specs: shape, dtype and ``fixed_dims``, the dims dynamic in the compiled graph (its
    input specs' ``None`` dims) that the artifact fixes to the example's size."""
    specs = list(getattr(cm.graph, "input_specs", None) or [])
    out = []
    for i, a in enumerate(args):
        spec = {"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
        shape = tuple(specs[i].shape) if i < len(specs) and len(specs) == len(args) else ()
        fixed = [d for d, v in enumerate(shape) if v is None and d < a.dim()]
        if fixed:
            spec["fixed_dims"] = fixed
        out.append(spec)
    return out


# -- load (torch-free, in sparsecc.runtime.deploy) --------------------------------------------------------


def run_artifact_under_qemu(path, *args, repeat: int = 1, threads: int | None = None, level: int | None = None):
    """Run an aarch64 artifact folder under qemu-aarch64 on torch inputs (``level``: an activation-routing level;
    default the level the artifact was exported at, 0).

    Returns
    -------
    outputs : the model's output structure of torch tensors
    time_ms : float or None
        Median emulated time of one forward (``repeat > 1``); emulation time, not a board's.
    """
    from sparsecc.targets.qemu import run_under_qemu

    path = Path(path)
    manifest = read_manifest(path)
    if manifest["target"].get("arch") != "aarch64":
        raise ArtifactError(f"{path} is not an aarch64 artifact (arch {manifest['target'].get('arch')})")
    for i, (a, s) in enumerate(zip(args, manifest["inputs"])):
        if list(a.shape) != s["shape"]:
            raise InputShapeError(f"input {i}: expected shape {tuple(s['shape'])}, got {tuple(a.shape)}")
    params = path / "params.bin"
    with tempfile.TemporaryDirectory() as tmp:
        if level:  # the thresholds of that level in a copy of params.bin (the artifact itself is left alone)
            from sparsecc.errors import InvalidArgumentError
            from sparsecc.targets.qemu import read_tensors, write_tensors

            routing = manifest.get("routing") or {"levels": 1, "gates": []}
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < int(routing["levels"]):
                raise InvalidArgumentError(f"level must be an int in [0, {routing['levels']}), got {level!r}")
            tensors = read_tensors(params)
            for g in routing["gates"]:
                tensors[int(g["param"])] = np.array([g["thresholds"][level]], dtype=np.float32)
                tensors[int(g["bias_param"])] = np.asarray(g["biases"][level], dtype=np.float32)
            params = Path(tmp) / "params.bin"
            write_tensors(params, tensors)
        outs, t = run_under_qemu(path / "model.so", list(args), mode="vm", repeat=repeat,
                                 extra_inputs=(params,), threads=threads)
    return tree_unflatten([torch.from_numpy(o) for o in outs], manifest["output_tree"]), t


# -- schedules of the dense rest --------------------------------------------------------------------------


def _static_factor(extent, candidates) -> int:
    """The largest of ``candidates`` dividing the static ``extent`` (1 for a symbolic extent or none)."""
    try:
        n = int(extent)
    except TypeError:
        return 1
    return next((c for c in candidates if n % c == 0 and n >= c), 1)


def _schedule_spatial(sch, block) -> None:
    """Parallel outer and vectorized inner loop of an injective block (element-wise ops, layout glue)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = sch.get(fused).extent
    vec = _static_factor(extent, (16, 8, 4))
    if vec > 1:
        outer, inner = sch.split(fused, [None, vec])
        sch.parallel(outer)
        sch.vectorize(inner)
    else:
        sch.parallel(fused)


def _schedule_reduction(sch, block) -> bool:
    """Tile a reduction block whose loops are spatial then reduction (matmuls, norms' sums, pooling).

    Matmul-like blocks (two or more spatial loops): ``(i, j)`` tiled ``(io, jo, k, ii, ji)`` with ``ji``
    vectorized, ``ii`` unrolled, ``io`` parallel, the init split off (``decompose_reduction``). Other reductions:
    spatial loops fused and parallel. Returns False when the block does not have that loop structure.
    """
    from tvm import tirx

    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters):
        return False
    kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in iters]
    n_s = kinds.index("R") if "R" in kinds else len(kinds)
    if n_s == 0 or "S" in kinds[n_s:]:
        return False
    spatial, red = loops[:n_s], loops[n_s:]
    k = sch.fuse(*red) if len(red) > 1 else red[0]
    if n_s >= 2:
        i = sch.fuse(*spatial[:-1]) if n_s > 2 else spatial[0]
        j = spatial[-1]
        vj = _static_factor(sch.get(j).extent, (16, 8, 4))
        vi = _static_factor(sch.get(i).extent, (4, 2))
        if vj > 1:
            io, ii = sch.split(i, [None, vi])
            jo, ji = sch.split(j, [None, vj])
            sch.reorder(io, jo, k, ii, ji)
            sch.parallel(io)
            sch.vectorize(ji)
            if vi > 1:
                sch.unroll(ii)
            sch.decompose_reduction(block, k)  # after vectorize: the update block is no reduction block after it
            return True
        outer = sch.fuse(i, j)
    else:
        outer = spatial[0]
    sch.parallel(outer)
    return True


def _dense_rule():
    """A dlight rule for every PrimFunc the dlight CPU rules leave: reductions tiled, spatial blocks parallel and
    vectorized (the dense rest is otherwise built single-threaded and unvectorized)."""
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class _CPUDense(dl.cpu.base.CPUScheduleRule if hasattr(dl.cpu, "base") else dl.ScheduleRule):
        def apply(self, func, target, _):
            if not isinstance(func, __import__("tvm").tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            infos = dl.normalize_prim_func(sch)
            if infos is None:
                return None
            infos = dl.try_inline_contiguous_spatial(sch, infos)
            try:
                for info in infos:
                    if info.is_reduction():
                        if not _schedule_reduction(sch, info.block_rv):
                            return None
                    else:
                        _schedule_spatial(sch, info.block_rv)
            except Exception:  # noqa: BLE001 - a shape this rule does not handle: keep the default schedule
                return None
            return sch

    return _CPUDense()


def dense_schedule_pass():
    """The module pass scheduling an export's dense rest: dlight's CPU GEMV rule, :func:`_dense_rule`, then dlight's
    CPU reduction rule (apply inside ``with tvm_target:``)."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), _dense_rule(), dl.cpu.Reduction())


def _softmax_legalizer(tvm_target):
    """Legalization of ``relax.nn.softmax`` over a static last axis into :func:`sparsecc.codegen.softmax.softmax_rows`
    (vector exp, rows in parallel); other softmaxes get TVM's own (``topi.nn.softmax``)."""
    from tvm import relax, topi

    from sparsecc.codegen.softmax import softmax_rows
    from sparsecc.targets.x86 import target_vector_bits

    lanes = target_vector_bits(tvm_target) // 32

    def legalize(bb, call):
        x = call.args[0]
        try:
            shape = [int(v) for v in x.ty.shape.values]
        except (AttributeError, TypeError):  # a symbolic or unknown shape
            shape = None
        axis = int(call.attrs.axis)
        if (shape is None or x.ty.dtype != "float32" or axis not in (-1, len(shape) - 1)
                or shape[-1] % lanes or shape[-1] < lanes):
            return bb.call_te(topi.nn.softmax, x, call.attrs.axis)
        length = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        name = f"sparsecc_softmax_r{rows}_l{length}"
        gv = next((g for g in bb.get().get_global_vars() if g.name_hint == name), None)
        if gv is None:
            gv = bb.add_func(softmax_rows(rows, length, lanes), name)
        x2 = bb.emit(relax.op.reshape(x, (rows, length)))
        y = bb.emit(relax.call_tir(gv, [x2], relax.TensorType((rows, length), "float32")))
        return relax.op.reshape(y, shape)

    return legalize


def _ieee_clip(bb, call):
    """Legalization of ``relax.clip`` (``hardtanh``, ``relu6``, ``clamp``) that keeps NaN as torch does: TVM's own
    is ``max(min(x, hi), lo)``, which LLVM lowers to ``maxnum``/``minnum`` and which turns a NaN into a bound."""
    from tvm import te, tirx

    def clip(x, lo, hi):
        def value(*i):
            v = x(*i)
            bounded = tirx.max(tirx.min(v, tirx.Cast(x.dtype, hi)), tirx.Cast(x.dtype, lo))
            return tirx.Select(tirx.isnan(v), v, bounded) if str(x.dtype).startswith("float") else bounded

        return te.compute(x.shape, value, name="clip")

    return bb.call_te(clip, *call.args, primfunc_name_hint="tir_clip")


def _relax_pipeline(tvm_target, kernels: set = frozenset(), vector_softmax: bool = True):
    """TVM's default CPU pipeline with clip legalized by :func:`_ieee_clip`, softmax by :func:`_softmax_legalizer`
    (TVM's own with ``vector_softmax=False``: ``benchmarks/dense.py`` compares the two) and the dense rest
    scheduled (dlight CPU rules, then :func:`_dense_rule`) between legalization and lowering; the sparse kernels
    (``kernels``, already scheduled) are left alone."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _mark(mod, _ctx):  # the sparse kernels carry their own schedules
        for gv, func in list(mod.functions.items()):
            if gv.name_hint in kernels and isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = func.with_attr("tirx.is_scheduled", True)
        return mod

    legalize = {"relax.clip": _ieee_clip}  # one LegalizeOps: it legalizes every op it meets, with or without a map
    if vector_softmax:
        legalize["relax.nn.softmax"] = _softmax_legalizer(tvm_target)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with tvm_target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(tvm_target) + [_mark]
                + [relax.transform.LegalizeOps(legalize)]
                + cpu.legalize_passes(tvm_target)
                + [dense_schedule_pass()]
                + cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))
            return seq(mod)

    return _pipeline
