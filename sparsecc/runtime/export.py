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

__all__ = ["ExportedModule", "export_compiled", "load", "run_artifact_under_qemu"]

FORMAT_VERSION = 1
FILES = ("model.so", "params.bin", "manifest.json")

# -- opaque custom ops standing for the kernel modules during torch.export ------------------------------------

_MODULES: dict[int, torch.nn.Module] = {}
_IDS = itertools.count()


@torch.library.custom_op("sparsecc::export_linear", mutates_args=())
def _export_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    return _MODULES[layer](x).clone()


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
    name = type(mod).__name__
    if name in ("SparseLinear", "NMLinear"):
        return "linear"
    if name == "SparseConv2d":
        return "conv"
    return None


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
        kind = _kernel_kind(mod)
        if kind is None:
            if type(mod).__module__.startswith("sparsecc.runtime"):
                raise UnsupportedOpError(f"layer {node.target}: {type(mod).__name__} kernels have no export path "
                                         "yet (exported: SparseLinear, SparseConv2d)")
            continue
        lid = next(_IDS)
        layers[lid] = mod
        name = f"sparsecc_export_{lid}"
        view.add_submodule(name, _LinearCall(lid) if kind == "linear" else _ConvCall(lid))
        node.target = name
    view.recompile()
    return view, layers


# -- converters: custom-op nodes -> relax.call_tir ------------------------------------------------------------


class _Converter:
    """Builds the ``custom_convert_map`` of ``from_exported_program`` for one export."""

    def __init__(self, layers: dict, target, arm: bool):
        self.layers = layers
        self.target = target
        self.arm = arm
        self.funcs = {}  # kernel name -> GlobalVar

    def _gvar(self, bb, name: str, sch):
        gv = self.funcs.get(name)
        if gv is None:
            func = sch.mod["main"].with_attr("global_symbol", name)
            gv = bb.add_func(func, name)
            self.funcs[name] = gv
        return gv

    @staticmethod
    def _const(t: torch.Tensor):
        from tvm import relax

        return relax.const(np.ascontiguousarray(t.detach().cpu().numpy()))

    def linear(self, node, importer):
        from tvm import relax

        from sparsecc.runtime.kernels import kernel_name
        from sparsecc.targets import arm, x86

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        mod = self.layers[node.args[1]]
        if type(mod).__name__ == "NMLinear":
            return self.nm_linear(bb, x, mod)
        n, k = mod.shape
        br, bc = mod.block
        shape = [int(v) for v in x.ty.shape.values]
        lead = shape[:-1]
        m = int(np.prod(lead)) if lead else 1
        regime = x86.regime_for(m)
        bias = mod.bias is not None
        if self.arm:
            params = arm.arm_params((br, bc), regime)
        else:
            params = x86.default_params((br, bc), regime)
        sch = x86.schedule_linear((br, bc), regime, bias=bias, activation=mod.activation, params=params, k=k)
        mt = params.m_tile
        mp = -(-max(m, 1) // mt) * mt
        x2 = bb.emit(relax.op.reshape(x, (m, k)))
        if mp != m:
            x2 = bb.emit(relax.op.concat([x2, relax.const(np.zeros((mp - m, k), np.float32))], axis=0))
        args = [x2, self._const(mod.data), self._const(mod.indices), self._const(mod.indptr)]
        if bias:
            args.append(self._const(mod.bias))
        name = f"sparsecc_{kernel_name((br, bc), regime, bias, mod.activation)}_k{k}_mt{mt}"
        gv = self._gvar(bb, name, sch)
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mp, n // br, br), "float32")))
        y = bb.emit(relax.op.reshape(y, (mp, n)))
        if mp != m:
            y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
        return bb.emit(relax.op.reshape(y, (*lead, n)))

    def nm_linear(self, bb, x, mod):
        """N:M: X (M, K) -> XT (MT, Kp, mt) tiles (zero-padded), kernel, Y (MT, mt, NR, rt) -> (M, N)."""
        from tvm import relax

        from sparsecc.runtime.nm import nm_kernel_name
        from sparsecc.targets import x86, x86_nm

        n_out, k = mod.shape
        shape = [int(v) for v in x.ty.shape.values]
        lead = shape[:-1]
        m = int(np.prod(lead)) if lead else 1
        regime = x86.regime_for(m)
        p = mod.params[regime]  # the module's packed values/meta fix the tiles (ArmTarget gives NEON ones)
        if p.index == "permute":
            raise UnsupportedOpError("N:M layers on the x86 permute template (AVX vpermps) have no export path "
                                     "yet; export for target='arm' or keep them dense")
        mt, kp = p.m_tile, mod.groups * mod.m
        mtiles = -(-max(m, 1) // mt)
        x2 = bb.emit(relax.op.reshape(x, (m, k)))
        if mtiles * mt != m or kp != k:
            x2 = bb.emit(relax.op.nn.pad(x2, [0, mtiles * mt - m, 0, kp - k]))
        xt = bb.emit(relax.op.permute_dims(relax.op.reshape(x2, (mtiles, mt, kp)), [0, 2, 1]))
        if p.index == "offset":
            xt = bb.emit(relax.op.reshape(xt, (mtiles, kp * mt)))
        meta = getattr(mod, mod._meta_names[regime])
        args = [xt, self._const(mod.values), self._const(meta)]
        if mod.bias is not None:
            args.append(self._const(mod.bias))
        sch = x86_nm.schedule_nm(mod.n, mod.m, mod.groups, regime, bias=mod.bias is not None,
                                 activation=mod.activation, target=self.target, params=p)
        name = (f"sparsecc_{nm_kernel_name(mod.n, mod.m, regime, mod.bias is not None, mod.activation)}"
                f"_g{mod.groups}_mt{mt}_rt{p.r_tile}_{p.index}")
        gv = self._gvar(bb, name, sch)
        nr = mod.n_padded // mod.r_tile
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mtiles, mt, nr, mod.r_tile), "float32")))
        y = bb.emit(relax.op.reshape(y, (mtiles * mt, mod.n_padded)))
        if mtiles * mt != m or mod.n_padded != n_out:
            y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n_out]))
        return bb.emit(relax.op.reshape(y, (*lead, n_out)))

    def conv(self, node, importer):
        from tvm import relax

        from sparsecc.targets import x86_conv

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        res = importer.env[node.args[1]] if node.args[1] is not None else None
        mod = self.layers[node.args[2]]
        n, c, h, w = (int(v) for v in x.ty.shape.values)
        _, c_out, oh, ow = _conv_out_shape(mod, (n, c, h, w))
        br = mod.block[0]
        kind = "nhwc" if mod.layout == "nhwc" else "nchw1x1"
        params = mod._params
        sch = x86_conv.schedule_conv(kind, mod.block, bias=mod.bias is not None, activation=mod.activation,
                                     residual=mod.residual, target=self.target, params=params)
        name = "sparsecc_" + x86_conv.conv_kernel_name(kind, mod.block, mod.bias is not None, mod.activation,
                                                        mod.residual) + f"_{abs(hash(str(params))) % 10**8}"
        gv = self._gvar(bb, name, sch)
        if kind == "nchw1x1":
            hw = h * w
            ht = params.hw_tile
            hwp = -(-hw // ht) * ht
            x3 = bb.emit(relax.op.reshape(x, (n, c, hw)))
            if hwp != hw:
                x3 = bb.emit(relax.op.nn.pad(x3, [0, 0, 0, 0, 0, hwp - hw]))
            args = [x3, self._const(mod.data), self._const(mod.indices), self._const(mod.indptr)]
            if mod.bias is not None:
                args.append(self._const(mod.bias))
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType((n, c_out // br, br, hwp), "float32")))
            y = bb.emit(relax.op.reshape(y, (n, c_out, hwp)))
            if hwp != hw:
                y = bb.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[hw]))
            return bb.emit(relax.op.reshape(y, (n, c_out, h, w)))
        off, pb, m, mp, _, _, hp, wp = mod._geometry(n, h, w)
        ph, pw = mod.padding
        xh = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        if ph or pw:
            xh = bb.emit(relax.op.nn.pad(xh, [0, 0, ph, ph, pw, pw, 0, 0]))
        xf = bb.emit(relax.op.reshape(xh, (n * hp * wp * c,)))
        args = [xf, self._const(pb), self._const(mod.data), self._const(off), self._const(mod.indptr)]
        if mod.bias is not None:
            args.append(self._const(mod.bias))
        if mod.residual:
            r = bb.emit(relax.op.reshape(relax.op.permute_dims(res, [0, 2, 3, 1]), (m, c_out)))
            if mp != m:
                r = bb.emit(relax.op.concat([r, relax.const(np.zeros((mp - m, c_out), np.float32))], axis=0))
            args.append(bb.emit(relax.op.reshape(r, (mp, c_out // br, br))))
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mp, c_out // br, br), "float32")))
        y = bb.emit(relax.op.reshape(y, (mp, c_out)))
        if mp != m:
            y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
        y = bb.emit(relax.op.reshape(y, (n, oh, ow, c_out)))
        return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))

    def convert_map(self):
        return {"export_linear.default": self.linear, "export_conv.default": self.conv}


# -- export ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import tvm

    from sparsecc import __version__ as sv

    return {"sparsecc": sv, "tvm": tvm.__version__, "torch": torch.__version__}


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

    path = Path(path)
    _check_destination(path, overwrite)
    target_obj = cm.target
    arm = hasattr(target_obj, "arm_tvm_target")
    tvm_target = target_obj.arm_tvm_target() if arm else target_obj.tvm_target()
    args, kwargs = _example_inputs(cm, example_inputs)
    if kwargs:
        raise UnsupportedOpError("export takes positional inputs only (keyword inputs are not supported yet)")
    view, layers = _export_view(cm.graph.gm)
    _MODULES.update(layers)
    try:
        with torch.no_grad():
            ep = torch.export.export(view, tuple(args))
            ref = view(*args)
        conv = _Converter(layers, tvm_target, arm)
        try:
            mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=conv.convert_map())
        except Exception as e:
            raise UnsupportedOpError(f"TVM could not import the compiled graph for export: {e}") from e
    finally:
        for k in layers:
            _MODULES.pop(k, None)
    mod, params = detach_params(mod)
    param_list = [p.numpy() for p in params.get("main", [])]
    ex = tvm.compile(mod, target=tvm_target)
    out_leaves, out_spec = torch.utils._pytree.tree_flatten(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        if arm:
            from sparsecc.targets.toolchain import aarch64_toolchain

            ex.export_library(str(tmp / "model.so"), fcompile=aarch64_toolchain().fcompile())
        else:
            ex.export_library(str(tmp / "model.so"))
        write_tensors(tmp / "params.bin", param_list)
        manifest = {
            "format_version": FORMAT_VERSION,
            "target": {"name": target_obj.name, "tvm": str(tvm_target), "arch": "aarch64" if arm else platform.machine()},
            "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")} for a in args],
            "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in out_leaves],
            "output_tree": torch.utils._pytree.treespec_dumps(out_spec),
            "num_params": len(param_list),
            "layers": [{"name": a.name, "format": a.format,
                        "block": list(a.format_block) if a.format_block else None, "density": a.density}
                       for a in cm.layers],
            "versions": _versions(),
            "files": {},
        }
        for f in ("model.so", "params.bin"):
            manifest["files"][f] = _sha256(tmp / f)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


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
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the export folder")
        if _sha256(f) != digest:
            raise ArtifactError(f"{f} is corrupt (its SHA-256 differs from the manifest's)")
    return manifest


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
        self._params = [tvm.runtime.tensor(a) for a in read_tensors(path / "params.bin")]
        self._tree = torch.utils._pytree.treespec_loads(manifest["output_tree"])

    def __call__(self, *args):
        import tvm

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


def run_artifact_under_qemu(path, *args, repeat: int = 1, threads: int | None = None):
    """Run an aarch64 artifact folder under qemu-aarch64 on torch inputs.

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
    outs, t = run_under_qemu(path / "model.so", list(args), mode="vm", repeat=repeat,
                             extra_inputs=(path / "params.bin",), threads=threads)
    tree = torch.utils._pytree.treespec_loads(manifest["output_tree"])
    return torch.utils._pytree.tree_unflatten([torch.from_numpy(o) for o in outs], tree), t
