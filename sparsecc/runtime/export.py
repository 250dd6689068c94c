"""Whole-model export: one Relax VM artifact for the host or an aarch64 board, and :func:`load`.

``CompiledModule.export(path)`` turns the compiled graph into a deployment folder:

* ``model.so``: a Relax VM executable (TVM 0.27). The sparse layers of the compiled graph
  (``SparseLinear``, ``SparseConv2d``) become ``relax.call_tir`` to their *scheduled* TensorIR kernels
  (the same templates and rules the host uses; for ARM built with NEON tile sizes for the aarch64 target), with
  their sparse weights as constants; every other op (dense convs and linears, pooling, adds, norms) is
  imported by ``tvm.relax.frontend.torch.from_exported_program`` and legalized with TVM's default (untuned)
  schedules.
* ``params.bin``: the remaining dense parameters, detached, in the tensor-file format of
  :mod:`sparsecc.targets.qemu` (the harness and :func:`load` read it).
* ``manifest.json``: format version, target, input and output specs (static shapes: the example inputs'),
  per-layer formats, the files' SHA-256, sparsecc / torch / TVM versions.

How the sparse layers reach Relax: each kernel module is swapped for a call of an opaque torch custom op
(``sparsecc::export_linear``, ``sparsecc::export_conv``) before ``torch.export``; ``from_exported_program``
then converts those nodes through its ``custom_convert_map`` into ``call_tir`` plus the layout glue (padding
M to the kernel's tile, NCHW <-> NHWC, zero borders), so no pattern matching on imported matmuls is needed.

A host artifact is loaded with :func:`load` (``sparsecc.load``) into a callable; an aarch64 artifact is run
with :func:`run_artifact_under_qemu` here, or copied to a board with the aarch64 ``libtvm_runtime.so``.
"""

from __future__ import annotations

import hashlib
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

__all__ = ["ExportContext", "ExportedModule", "export_compiled", "load", "panels_for_export", "rows_for_export",
           "run_artifact_under_qemu"]

FORMAT_VERSION = 1
FILES = ("model.so", "params.bin", "manifest.json")
#: the files :func:`load` opens besides the manifest: each must be listed in it with its hash
OPENED = ("model.so", "params.bin")

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
    """A copy of ``gm`` whose kernel modules are custom-op calls; returns (copy, {layer id: module})."""
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
    view.recompile()
    return view, layers


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

    def __init__(self, layers: dict, target):
        self.layers = layers
        self.target = target
        self.tvm_target = target.deploy_tvm_target()
        self.funcs = {}  # kernel name -> GlobalVar

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        conv = ExportContext(layers, target_obj)
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
    ex = tvm.compile(mod, target=tvm_target)
    out_leaves, out_spec = torch.utils._pytree.tree_flatten(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        target_obj.export_library(ex, tmp / "model.so")
        write_tensors(tmp / "params.bin", param_list)
        manifest = {
            "format_version": FORMAT_VERSION,
            "target": {"name": target_obj.name, "tvm": str(tvm_target), "arch": target_obj.deploy_arch},
            "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")} for a in args],
            "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in out_leaves],
            "output_tree": torch.utils._pytree.treespec_dumps(out_spec),
            "num_params": len(param_list),
            "layers": [{"name": a.name, "format": a.format,
                        "block": list(a.format_params) if a.format_params else None, "density": a.density}
                       for a in cm.layers],
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
    from sparsecc.ir.capture import normalize_inputs

    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    ex = getattr(cm.graph, "example_inputs", None)
    if ex is None:
        specs = getattr(cm.graph, "input_specs", None) or []
        if not specs or any(d is None for s in specs for d in s.shape):
            raise UnsupportedOpError("export needs example_inputs= (the compiled graph has dynamic input dims)")
        return tuple(torch.randn(s.shape).to(s.dtype) for s in specs), {}
    return normalize_inputs(ex)


# -- load ----------------------------------------------------------------------------------------------------


def read_manifest(path) -> dict:
    """Manifest of an artifact folder after checking every file exists and matches its SHA-256.

    Raises
    ------
    ArtifactError
        Missing folder or file, unreadable manifest, a file whose hash differs (corrupt or replaced), or a
        format version this sparsecc does not read. The message names the file.
    """
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise ArtifactError(f"{mf} is missing: {path} is not a sparsecc export folder")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{mf} is corrupt: {e}") from e
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {version}, this sparsecc reads {FORMAT_VERSION}")
    if not isinstance(files, dict):
        raise ArtifactError(f"{mf}: field 'files' must map file names to SHA-256 digests, got {type(files).__name__}")
    unlisted = [f for f in OPENED if f not in files]
    if unlisted:  # never open a file whose hash was not checked
        raise ArtifactError(f"{mf}: field 'files' does not list {', '.join(unlisted)} (every file load opens "
                            "must carry its SHA-256)")
    for name, digest in files.items():
        f = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{mf}: field 'files' names {name!r}, not a file of the export folder")
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the export folder")
        if _sha256(f) != digest:
            raise ArtifactError(f"{f} is corrupt (its SHA-256 differs from the manifest's)")
    _check_signature(manifest, mf)
    return manifest


_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _check_signature(manifest: dict, mf: Path) -> None:
    """The fields :func:`load` trusts (target, input specs, output tree), checked before anything is opened.

    Raises
    ------
    ArtifactError
        A missing or malformed field; the message names the file and the field.
    """
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str) or not isinstance(target.get("arch"), str):
        raise ArtifactError(f"{mf}: field 'target' must hold the strings 'name' and 'arch', got {target!r}")
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ArtifactError(f"{mf}: field 'inputs' must be a non-empty list of input specs, got {inputs!r}")
    for i, spec in enumerate(inputs):
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ArtifactError(f"{mf}: field 'inputs[{i}].shape' must be a list of sizes ≥ 0, got {shape!r}")
        if spec.get("dtype") not in _DTYPES:
            raise ArtifactError(f"{mf}: field 'inputs[{i}].dtype' is {spec.get('dtype')!r}, expected one of "
                                f"{sorted(_DTYPES)}")
    try:
        torch.utils._pytree.treespec_loads(manifest.get("output_tree"))
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad field
        raise ArtifactError(f"{mf}: field 'output_tree' is not a torch pytree spec ({type(e).__name__}: {e})") from e


class ExportedModule:
    """A host artifact loaded with :func:`load`: call it with torch tensors of the exported shapes."""

    def __init__(self, path: Path, manifest: dict):
        import tvm
        from tvm import relax

        from sparsecc.targets.qemu import read_tensors

        self.path, self.manifest = path, manifest
        try:
            lib = tvm.runtime.load_module(str(path / "model.so"))
        except Exception as e:
            raise ArtifactError(f"{path / 'model.so'} cannot be loaded: {e}") from e
        self._vm = relax.VirtualMachine(lib, tvm.cpu())
        try:
            self._params = [tvm.runtime.tensor(a) for a in read_tensors(path / "params.bin")]
        except Exception as e:  # noqa: BLE001 - hash-checked, so written by another version or by hand
            raise ArtifactError(f"{path / 'params.bin'} cannot be read: {e}") from e
        self._tree = torch.utils._pytree.treespec_loads(manifest["output_tree"])
        try:
            arity = int(self._vm._get_function_arity("main"))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{path / 'model.so'} has no function 'main': {e}") from e
        want = len(manifest["inputs"]) + len(self._params)
        if arity != want:  # an edited manifest (or params.bin) that no longer matches the library
            raise ArtifactError(f"{path / 'manifest.json'}: field 'inputs' lists {len(manifest['inputs'])} inputs and "
                                f"params.bin holds {len(self._params)} tensors, but {path / 'model.so'}'s main takes "
                                f"{arity} arguments")
        self._gates = self._read_routing(manifest.get("routing"), path / "manifest.json")
        self.level = 0

    def _read_routing(self, routing, mf: Path) -> list:
        """``[(param index, [tensor per level])]`` (thresholds and biases) from the manifest's ``routing`` field."""
        import tvm

        if routing is None:
            return []
        try:
            levels = int(routing["levels"])
            gates = []
            for g in routing["gates"]:
                i, ths = int(g["param"]), [float(t) for t in g["thresholds"]]
                if not 0 <= i < len(self._params) or tuple(self._params[i].shape) != (1,) or len(ths) != levels:
                    raise ValueError(f"gate {g.get('layer')!r}: parameter {i} / {len(ths)} thresholds do not match "
                                     f"the artifact")
                gates.append((i, [tvm.runtime.tensor(np.array([t], dtype=np.float32)) for t in ths]))
                j, bs = int(g["bias_param"]), [np.asarray(b, dtype=np.float32) for b in g["biases"]]
                if not 0 <= j < len(self._params) or len(bs) != levels or any(
                        b.shape != tuple(self._params[j].shape) for b in bs):
                    raise ValueError(f"gate {g.get('layer')!r}: bias parameter {j} / {len(bs)} biases do not match "
                                     f"the artifact")
                gates.append((j, [tvm.runtime.tensor(b) for b in bs]))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{mf}: field 'routing' is malformed: {e}") from e
        return gates

    @property
    def num_levels(self) -> int:
        """Routing levels the artifact holds (1 without activation routing)."""
        return len(self._gates[0][1]) if self._gates else 1

    def set_level(self, level: int) -> None:
        """Use the gate thresholds of ``level`` from the next call on (no rebuild: the thresholds are parameters).

        Raises
        ------
        InvalidArgumentError
            ``level`` outside ``[0, num_levels)``.
        """
        from sparsecc.errors import InvalidArgumentError

        n = self.num_levels
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < n:
            raise InvalidArgumentError(f"level must be an int in [0, {n}), got {level!r}")
        for i, per_level in self._gates:
            self._params[i] = per_level[level]
        self.level = level

    def __call__(self, *args, level: int | None = None):
        import tvm

        if level is not None:
            before = self.level
            self.set_level(level)
            try:
                return self(*args)
            finally:
                self.set_level(before)
        specs = self.manifest["inputs"]
        if len(args) != len(specs):
            raise InputShapeError(f"expected {len(specs)} inputs, got {len(args)}")
        xs = []
        for i, (a, s) in enumerate(zip(args, specs)):
            if list(a.shape) != s["shape"]:
                raise InputShapeError(f"input {i}: expected shape {tuple(s['shape'])}, got {tuple(a.shape)}")
            if str(a.dtype).replace("torch.", "") != s["dtype"]:
                raise InputDtypeError(f"input {i}: expected dtype {s['dtype']}, got {a.dtype}")
            xs.append(tvm.runtime.tensor(a.detach().contiguous().numpy()))
        out = self._vm["main"](*xs, *self._params)
        leaves = _flatten_result(out)
        return torch.utils._pytree.tree_unflatten([torch.from_numpy(t.numpy()) for t in leaves], self._tree)

    def __repr__(self) -> str:
        return f"ExportedModule({str(self.path)!r}, target={self.manifest['target']['name']!r})"


def _flatten_result(out) -> list:
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    res = []
    for o in out:
        res += _flatten_result(o)
    return res


def load(path) -> ExportedModule:
    """Load a host artifact written by ``cm.export(path)``.

    Raises
    ------
    ArtifactError
        Missing or corrupt file (named), or an artifact built for another architecture (use
        :func:`run_artifact_under_qemu` for aarch64 ones).
    """
    path = Path(path)
    manifest = read_manifest(path)
    arch = manifest["target"].get("arch")
    if arch != platform.machine():
        raise ArtifactError(f"{path} was built for {arch}, this host is {platform.machine()}; "
                            "run aarch64 artifacts with sparsecc.runtime.export.run_artifact_under_qemu")
    return ExportedModule(path, manifest)


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
    tree = torch.utils._pytree.treespec_loads(manifest["output_tree"])
    return torch.utils._pytree.tree_unflatten([torch.from_numpy(o) for o in outs], tree), t
