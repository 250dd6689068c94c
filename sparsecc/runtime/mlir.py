"""MLIR export of a compiled module: linalg-on-tensors with ``#sparse_tensor.encoding`` on the sparse weights.

:func:`to_mlir` rebuilds the rewritten graph of a :class:`~sparsecc.runtime.compiled.CompiledModule`
(``cm.graph.gm``) as a plain torch graph in which every sparse linear is ``act(W @ x^T)^T + b`` with
``W`` a *function argument* (torch-mlir imports constants dense only), exports it with
``torch.export`` and imports the program with torch-mlir's FX importer, the weight arguments typed
with these ``#sparse_tensor.encoding`` attributes (64-bit positions and coordinates):

- CSR (sparsecc ``csr``, ``xcsr`` and, with ``nm="csr"``, N:M weights):
  ``(d0, d1) -> (d0 : dense, d1 : compressed)``,
- BSR with block ``(br, bc)``:
  ``(d0, d1) -> (d0 floordiv br : dense, d1 floordiv bc : compressed, d0 mod br : dense, d1 mod bc : dense)``
  (``d1 : compressed, d1 mod bc : dense`` for br = 1); blocks (br, 1), the common 16x1 included, are
  exported as the view ``W3: (N / br, K, br)`` with ``(d0, d1, d2) -> (d0 : dense, d1 : compressed,
  d2 : dense)``, which stores exactly torch's BSR arrays (MLIR's sparsifier crashes on the 3-level
  ``d0 floordiv br, d1, d0 mod br`` map), and multiplied as ``x2 @ W3`` broadcast over the block rows,
- N:M 2:4 with ``nm="structured"``: ``(d0, d1) -> (d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4])``
  (verifies, does not run: MLIR's CPU sparsifier has no code generation for it); default ``nm="csr"``.

The function is ``@main(inputs..., weights...)``: the model's positional inputs first, then one
argument per sparse weight, in :attr:`MlirModule.weights` order. :meth:`MlirModule.run` compiles the
module with the sparsifier's passes (:data:`ASSEMBLE_PIPELINE`, :data:`EXEC_PIPELINE`; direct code
generation, so none of MLIR's runtime libraries, which the torch-mlir wheel does not ship) and calls it on
the ExecutionEngine, passing each sparse weight as its positions, coordinates and values arrays.

Layers that the compiled module runs in torch dense but whose weights the compiler pruned (their
annotation's pattern is not ``"dense"`` and they hold zeros) are exported sparse as well, with the
annotation's pattern, unless ``pruned_dense=False``.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import fx

from sparsecc.errors import InvalidArgumentError, MlirError, UnsupportedOpError
from sparsecc.ir.annotations import get_annotation

__all__ = ["MlirModule", "SparseWeight", "to_mlir", "torch_mlir_available"]

#: Pass pipeline lowering the torch dialect to linalg-on-tensors (torch-mlir's backend contract).
#: The sparsifier's passes, as torch-mlir's reference backend runs them: the assembler turns every sparse
#: argument into its (positions, coordinates, values) arrays, sparsification-and-bufferization generates
#: the sparse loops (direct code generation, no sparse runtime library), the private function the
#: assembler wraps is inlined (its storage-specifier arguments have no LLVM lowering), then LLVM.
ASSEMBLE_PIPELINE = "builtin.module(func.func(linalg-generalize-named-ops),sparse-assembler{direct-out=true})"
EXEC_PIPELINE = ("builtin.module(sparsification-and-bufferization,inline,symbol-dce,sparse-storage-specifier-to-llvm,"
                 "func.func(expand-realloc),func.func(convert-linalg-to-loops),lower-affine,convert-scf-to-cf,"
                 "expand-strided-metadata,finalize-memref-to-llvm,func.func(convert-arith-to-llvm),"
                 "convert-math-to-llvm,convert-math-to-libm,convert-func-to-llvm,convert-cf-to-llvm,"
                 "reconcile-unrealized-casts)")
LINALG_PIPELINE = ("builtin.module(func.func(torch-decompose-complex-ops),"
                   "torch-backend-to-linalg-on-tensors-backend-pipeline)")



def torch_mlir_available() -> bool:
    """True when ``torch_mlir`` (the package :func:`to_mlir` needs) imports."""
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError:
        return False
    return True


def _require_torch_mlir():
    try:
        import torch_mlir  # noqa: F401
        from torch_mlir import ir  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MlirError("to_mlir needs the torch-mlir package (pip install torch-mlir==20261001): "
                        f"import failed: {e}") from e


@dataclass
class SparseWeight:
    """One sparse weight argument of the exported function.

    Attributes
    ----------
    layer : str
        The graph node (layer) the weight belongs to.
    layout : str
        ``"csr"``, ``"bsr"`` or ``"2:4"`` (the structured encoding).
    block : tuple of int
        Block shape (rows, cols); (1, 1) for CSR.
    tensor : torch.Tensor
        W: (N, K) as a torch sparse CSR/BSR tensor (int64 indices); for (br, 1) blocks the view
        W3: (N / br, K, br), ``W3[i, k, r] = W[i * br + r, k]``, as a CSR tensor with one dense dim
        (MLIR's sparsifier crashes on the ``d0 floordiv br, d1, d0 mod br`` encoding; this one stores the
        same positions, coordinates and values as torch's BSR); for ``"2:4"`` a dense tensor.
    """

    layer: str
    layout: str
    block: tuple
    tensor: torch.Tensor

    @property
    def encoding(self) -> str:
        """The ``#sparse_tensor.encoding`` attribute of this weight (64-bit positions and coordinates)."""
        br, bc = self.block
        dims = "d0, d1"
        if self.layout == "2:4":
            lvls = "d0 : dense, d1 floordiv 4 : dense, d1 mod 4 : structured[2, 4]"
        elif self.layout == "csr":
            lvls = "d0 : dense, d1 : compressed"
        elif bc == 1:  # the (N / br, K, br) view: a CSR of block rows with dense (br,) blocks
            dims, lvls = "d0, d1, d2", "d0 : dense, d1 : compressed, d2 : dense"
        elif br == 1:
            lvls = f"d0 : dense, d1 floordiv {bc} : compressed, d1 mod {bc} : dense"
        else:
            lvls = f"d0 floordiv {br} : dense, d1 floordiv {bc} : compressed, d0 mod {br} : dense, d1 mod {bc} : dense"
        width = "" if self.layout == "2:4" else ", posWidth = 64, crdWidth = 64"
        return f"#sparse_tensor.encoding<{{ map = ({dims}) -> ({lvls}){width} }}>"

    @property
    def shape(self) -> tuple:
        """(N, K) of the weight (``tensor`` is (N / br, K, br) for (br, 1) blocks)."""
        t = self.tensor
        return (t.shape[0] * t.shape[2], t.shape[1]) if t.dim() == 3 else tuple(t.shape)

    def to_dense(self) -> torch.Tensor:
        """W: (N, K) dense, from the exported tensor."""
        t = self.tensor.to_dense()
        return t.permute(0, 2, 1).reshape(self.shape) if t.dim() == 3 else t

    @property
    def nnz(self) -> int:
        """Stored values (blocks times block size for BSR)."""
        if self.layout == "2:4":
            return int(self.tensor.numel() // 2)
        return int(self.tensor.values().numel())


def _sparse_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], activation: Optional[str]):
    """``act(x @ W^T + b)`` written as ``(W @ x2^T)^T`` so that the sparse W is the left operand of mm."""
    lead = x.shape[:-1]
    if w.dim() == 3:  # W3: (N / br, K, br); (N / br, M, br) = x2 @ W3, broadcast over the block rows
        nb, k, br = w.shape
        n = nb * br
        y = torch.matmul(x.reshape(-1, k), w).permute(1, 0, 2).reshape(-1, n)
    else:
        n, k = w.shape
        y = torch.mm(w, x.reshape(-1, k).t()).t()
    if b is not None:
        y = y + b.reshape(-1)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation is not None:
        raise UnsupportedOpError(f"to_mlir: activation {activation!r} of a sparse layer is not supported")
    return y.reshape(*lead, n)


def _encode(layer: str, w: torch.Tensor, layout: str, block: tuple) -> SparseWeight:
    with warnings.catch_warnings():  # torch's "sparse BSR/CSR support is in beta" notes
        warnings.simplefilter("ignore", UserWarning)
        return _encode_quiet(layer, w, layout, block)


def _encode_quiet(layer: str, w: torch.Tensor, layout: str, block: tuple) -> SparseWeight:
    w = w.detach().to(torch.float32).cpu().contiguous()
    if layout == "bsr" and tuple(block) != (1, 1):
        br, bc = block
        if w.shape[0] % br or w.shape[1] % bc:
            layout, block = "csr", (1, 1)
        elif bc == 1:
            n, k = w.shape
            w3 = w.reshape(n // br, br, k).permute(0, 2, 1).contiguous().to_sparse_csr(dense_dim=1)
            return SparseWeight(layer, "bsr", (int(br), 1), w3)
        else:
            return SparseWeight(layer, "bsr", (int(br), int(bc)), w.to_sparse_bsr((int(br), int(bc))))
    if layout == "2:4":
        return SparseWeight(layer, "2:4", (1, 1), w)
    t = w.to_sparse_csr()
    t = torch.sparse_csr_tensor(t.crow_indices().to(torch.int64), t.col_indices().to(torch.int64),
                                t.values(), tuple(w.shape))
    return SparseWeight(layer, "csr", (1, 1), t)


def _layout_of(mod, nm: str) -> tuple:
    fmt = getattr(mod, "format", None)
    if fmt == "nm":
        return ("2:4", (1, 1)) if nm == "structured" and (mod.n, mod.m) == (2, 4) else ("csr", (1, 1))
    block = tuple(getattr(mod, "block", None) or (1, 1))
    if fmt in ("bsr", "csr") and block != (1, 1):
        return "bsr", block
    return "csr", (1, 1)


def _layout_of_annotation(ann, nm: str) -> tuple:
    if ann.pattern == "block" and ann.block_shape and tuple(ann.block_shape) != (1, 1):
        return "bsr", tuple(ann.block_shape)
    if ann.pattern == "n:m" and nm == "structured":
        return "2:4", (1, 1)
    return "csr", (1, 1)


def _rebuild(cm, nm: str, pruned_dense: bool):
    """A GraphModule computing cm's graph in plain torch, sparse weights as trailing placeholders."""
    src = cm.graph.gm
    g = fx.Graph()
    env: dict = {}
    weights: list[SparseWeight] = []
    weight_nodes: list = []
    attrs = torch.nn.Module()

    def getattr_node(name: str, value: torch.Tensor):
        safe = name.replace(".", "_")
        attrs.register_buffer(safe, value.detach().clone())
        return g.get_attr(safe)

    out_node = None
    inputs = [n for n in src.graph.nodes if n.op == "placeholder"]
    for n in inputs:
        env[n] = g.placeholder(n.name)
    for n in src.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out_node = n
            break
        if n.op == "call_module":
            mod = src.get_submodule(n.target)
            if n.target == "_guards_fn" or type(mod).__name__ == "GuardsFn":
                continue
            if getattr(mod, "layer_kind", None) == "linear" and hasattr(mod, "dense_weight"):
                if len(n.args) != 1 or n.kwargs:
                    raise UnsupportedOpError(f"to_mlir: sparse layer {n.target!r} takes {len(n.args)} inputs; "
                                             "only single-input linears are supported")
                layout, block = _layout_of(mod, nm)
                ann = get_annotation(n)
                sw = _encode(ann.name if ann is not None and ann.name else str(n.target), mod.dense_weight(),
                             layout, block)
                weights.append(sw)
                wn = g.placeholder(f"w{len(weights) - 1}")
                weight_nodes.append(wn)
                bias = getattr(mod, "bias", None)
                if getattr(mod, "has_bias", True) is False:
                    bias = None
                bn = getattr_node(f"{n.target}.bias", bias.reshape(-1)) if bias is not None else None
                env[n] = g.call_function(_sparse_linear, (env[n.args[0]], wn, bn, mod.activation))
                continue
            raise UnsupportedOpError(f"to_mlir: layer {n.target!r} ({type(mod).__name__}) has no MLIR export; "
                                     "supported are sparse linears (CSR, xcsr, BSR, N:M) and torch ops")
        if n.op == "get_attr":
            value = operator.attrgetter(n.target)(src)
            env[n] = getattr_node(str(n.target), value) if isinstance(value, torch.Tensor) else value
            continue
        ann = get_annotation(n)
        if (pruned_dense and n.op == "call_function" and n.target is torch.ops.aten.linear.default
                and ann is not None and ann.pattern not in (None, "dense") and isinstance(n.args[1], fx.Node)
                and n.args[1].op == "get_attr"):
            w = operator.attrgetter(n.args[1].target)(src)
            if bool((w == 0).any()):
                layout, block = _layout_of_annotation(ann, nm)
                sw = _encode(ann.name or n.name, w, layout, block)
                weights.append(sw)
                wn = g.placeholder(f"w{len(weights) - 1}")
                weight_nodes.append(wn)
                b = env[n.args[2]] if len(n.args) > 2 and n.args[2] is not None else None
                env[n] = g.call_function(_sparse_linear, (env[n.args[0]], wn, b, None))
                continue
        env[n] = g.node_copy(n, lambda a: env[a])
    if out_node is None:
        raise UnsupportedOpError("to_mlir: the compiled graph has no output node")
    g.output(fx.node.map_arg(out_node.args[0], lambda a: env[a]))
    # placeholders must precede the other nodes: move the weight placeholders up behind the inputs
    last_input = env[inputs[-1]] if inputs else None
    for wn in weight_nodes:
        if last_input is None:
            next(iter(g.nodes)).prepend(wn)
        else:
            last_input.append(wn)
        last_input = wn
    g.lint()
    return fx.GraphModule(attrs, g), inputs, weights


def _weight_type_cache(importer, encodings: dict):
    """The importer's type cache, giving the weight arguments (keyed by ``id`` of their ``meta["val"]``)
    sparsecc's encoding: the importer's own cannot express (br, 1) blocks or 2:4."""
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import ContextCache

    class WeightTypes(ContextCache):
        def get_vtensor_type(self, shape, dtype, *, val=None, mutable=False):
            enc = encodings.get(id(val)) if val is not None else None
            if enc is None:
                return super().get_vtensor_type(shape, dtype, val=val, mutable=mutable)
            stem = "torch.tensor" if mutable else "torch.vtensor"
            dims = ",".join(str(int(d)) for d in shape)
            return ir.Type.parse(f"!{stem}<[{dims}],{self.dtype_to_type(dtype)},{enc}>", context=self._c)

    return WeightTypes(importer._c, py_attr_tracker=importer._py_attr_tracker)


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, dict):
        return tuple(example_inputs.values())
    return tuple(example_inputs)


class MlirModule:
    """The MLIR of a compiled module (see :func:`to_mlir`).

    Attributes
    ----------
    text : str
        The module's MLIR text (linalg-on-tensors after ``lower=True``, torch dialect otherwise).
    weights : list of SparseWeight
        The sparse weight arguments, after the inputs in ``@main``'s signature.
    input_names : tuple of str
        The model inputs, in signature order.
    lowered : bool
        Whether ``text`` is linalg-on-tensors.
    """

    def __init__(self, text: str, weights: list, input_names: tuple, lowered: bool):
        self.text = text
        self.weights = weights
        self.input_names = tuple(input_names)
        self.lowered = lowered
        self.output_shapes: list = []  # (shape, numpy dtype) of every result of @main
        self._engine = None

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return (f"MlirModule(inputs={list(self.input_names)}, sparse weights={len(self.weights)} "
                f"({', '.join(w.layout for w in self.weights)}), {len(self.text)} chars)")

    def parse(self):
        """Parse ``text`` in a fresh ``torch_mlir.ir.Context`` (torch dialect registered) and return the module.

        Raises
        ------
        MlirError
            The text does not parse or verify.
        """
        _require_torch_mlir()
        from torch_mlir import ir
        from torch_mlir.dialects import torch as torch_d
        ctx = ir.Context()
        torch_d.register_dialect(ctx)
        try:
            return ir.Module.parse(self.text, context=ctx)
        except Exception as e:  # MLIRError carries the diagnostics
            raise MlirError(f"to_mlir: the module does not parse: {e}") from e

    def verify(self) -> bool:
        """Parse in a fresh context and run the verifier; True, or raises :class:`MlirError`."""
        module = self.parse()
        try:
            ok = module.operation.verify()
        except Exception as e:
            raise MlirError(f"to_mlir: the module does not verify: {e}") from e
        if not ok:
            raise MlirError("to_mlir: the module does not verify")
        return True

    def arrays(self, *inputs) -> list:
        """The flat argument list of the compiled ``@main``: the inputs, then per weight positions,
        coordinates (int64) and values (float32, flat)."""
        if len(inputs) != len(self.input_names):
            raise InvalidArgumentError(f"MlirModule.run: expected {len(self.input_names)} inputs "
                                       f"{list(self.input_names)}, got {len(inputs)}")
        out = [np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
               for x in inputs]
        for w in self.weights:
            if w.layout == "2:4":
                raise MlirError(f"MlirModule.run: layer {w.layer!r} has the 2:4 structured encoding, which MLIR's "
                                "CPU sparsifier does not generate code for; export with nm='csr' to run it")
            t = w.tensor
            out += [t.crow_indices().numpy().astype(np.int64), t.col_indices().numpy().astype(np.int64),
                    np.ascontiguousarray(t.values().numpy().reshape(-1), dtype=np.float32)]
        return out

    def _compile(self):
        if self._engine is None:
            if not self.lowered:
                raise MlirError("MlirModule.run needs the linalg-on-tensors module: export with lower=True")
            from torch_mlir import ir, passmanager
            from torch_mlir.execution_engine import ExecutionEngine
            module = self.parse()
            with module.context:
                try:
                    passmanager.PassManager.parse(ASSEMBLE_PIPELINE).run(module.operation)
                    for op in module.body.operations:  # the assembler's public wrapper is the new @main
                        if "sym_name" in op.attributes and ir.StringAttr(op.attributes["sym_name"]).value == "main":
                            op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
                    passmanager.PassManager.parse(EXEC_PIPELINE).run(module.operation)
                except Exception as e:
                    raise MlirError(f"MlirModule.run: the sparsifier pipeline failed: {e}") from e
                self._engine = ExecutionEngine(module, opt_level=2)
        return self._engine

    def run(self, *inputs) -> list:
        """Compile with the sparsifier and run ``@main`` on MLIR's ExecutionEngine.

        Parameters
        ----------
        *inputs : numpy.ndarray or torch.Tensor
            The model's positional inputs, in :attr:`input_names` order and of the exported shapes; the
            sparse weights are passed by the module itself.

        Returns
        -------
        list of numpy.ndarray
            The results of ``@main``, in order.

        Raises
        ------
        InvalidArgumentError
            Wrong number of inputs.
        MlirError
            The sparsifier failed, or a weight has the 2:4 structured encoding.
        """
        import ctypes

        from torch_mlir.runtime import get_ranked_memref_descriptor, ranked_memref_to_numpy
        arrays = self.arrays(*inputs)
        engine = self._compile()
        args_desc = [get_ranked_memref_descriptor(a) for a in arrays]
        res_desc = [get_ranked_memref_descriptor(np.zeros(s, dtype=d)) for s, d in self.output_shapes]
        if len(res_desc) != 1:
            raise MlirError(f"MlirModule.run: @main has {len(res_desc)} results; one is supported")
        args = [ctypes.pointer(ctypes.pointer(d)) for d in res_desc + args_desc]
        engine.invoke("main", *args)
        out = [ranked_memref_to_numpy([d]).copy() for d in res_desc]
        del arrays  # kept alive until here: the descriptors point into them
        return out


def to_mlir(cm, example_inputs=None, *, lower: bool = True, nm: str = "csr", pruned_dense: bool = True) -> MlirModule:
    """Export a compiled module as MLIR with ``#sparse_tensor.encoding`` on its sparse weights.

    Parameters
    ----------
    cm : CompiledModule
        From :func:`sparsecc.compile`; its rewritten graph ``cm.graph.gm`` is exported, not changed.
    example_inputs : tensor, tuple or dict, optional
        Positional inputs fixing the exported shapes; default ``cm.example_inputs``.
    lower : bool
        True: linalg-on-tensors; False: the torch dialect.
    nm : {"csr", "structured"}
        Encoding of N:M weights: CSR, or the 2:4 structured level type.
    pruned_dense : bool
        Also export sparse the pruned weights of layers the compiled module runs dense.

    Returns
    -------
    MlirModule
        ``@main(inputs..., weights...)``; ``.text``, ``.verify()``, ``.weights``.

    Raises
    ------
    MlirError
        torch-mlir is missing, or importing or lowering failed.
    UnsupportedOpError
        A layer of the graph has no MLIR export (naming it).
    InvalidArgumentError
        No example inputs, or ``nm`` unknown.
    """
    _require_torch_mlir()
    if nm not in ("csr", "structured"):
        raise InvalidArgumentError(f"to_mlir: nm must be 'csr' or 'structured', got {nm!r}")
    args = _as_tuple(example_inputs if example_inputs is not None else getattr(cm, "example_inputs", None))
    gm, inputs, weights = _rebuild(cm, nm, pruned_dense)
    if len(args) != len(inputs):
        raise InvalidArgumentError(f"to_mlir: the graph takes {len(inputs)} inputs "
                                   f"{[n.name for n in inputs]}, got {len(args)} example inputs")
    from torch_mlir import ir
    from torch_mlir.compiler_utils import run_pipeline_with_repro_report
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_importer import FxImporter
    dense_w = tuple(w.tensor.to_dense() if w.tensor.layout != torch.strided else w.tensor for w in weights)
    with torch.no_grad():
        ref = gm(*args, *dense_w)
        prog = torch.export.export(gm, tuple(args) + dense_w, strict=False)
    user = [s for s in prog.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    ph = {n.name: n for n in prog.graph.nodes if n.op == "placeholder"}
    encodings = {}
    for spec, w in zip(user[len(args):], weights):
        ph[spec.arg.name].meta["val"] = w.tensor
        encodings[id(w.tensor)] = w.encoding
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    importer = FxImporter(context=ctx)
    importer._cc = _weight_type_cache(importer, encodings)
    try:
        importer.import_frozen_program(prog, func_name="main")
        module = importer.module
        if lower:
            run_pipeline_with_repro_report(module, LINALG_PIPELINE, "to_mlir: torch -> linalg-on-tensors")
    except Exception as e:
        raise MlirError(f"to_mlir: torch-mlir failed: {e}") from e
    text = str(module)
    out = MlirModule(text, weights, tuple(n.name for n in inputs), lower)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    out.output_shapes = [(tuple(r.shape), torch.empty(0, dtype=r.dtype).numpy().dtype) for r in refs]
    return out

