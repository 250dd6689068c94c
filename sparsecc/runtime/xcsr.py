"""Unstructured sparse linears vectorized along M: :class:`XCSRLinear`, its kernels and export converter.

Kernels come from :mod:`sparsecc.codegen.xcsr` scheduled by :mod:`sparsecc.targets.x86_xcsr` and built
through :func:`sparsecc.runtime.kernels.load_or_build` (the one kernel cache).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

import torch

from sparsecc.cache import KERNELS
from sparsecc.errors import InputShapeError, InvalidSparsityError
from sparsecc.formats import XCSR, RowSparseMatrix
from sparsecc.runtime.ieee import all_finite, torch_linear
from sparsecc.runtime.modules import cpu_factory
from sparsecc.runtime.kernels import (aligned, aligned_empty, check_activation, load_or_build, output_buffer, rows_of,
                                      target_key)
from sparsecc.targets import x86, x86_xcsr

__all__ = ["XCSRLinear", "block_pointers", "cpu_xcsr_linear", "export_xcsr_linear", "get_xcsr_kernel", "kernel_name",
           "pack_xt", "params_for"]


def get_xcsr_kernel(regime: str, activation: str | None, index_dtype: str, target=None, params=None,
                    panels_out: bool = False):
    """The compiled kernel (packed function) for ``regime``; arguments as :mod:`sparsecc.codegen.xcsr` lists."""
    check_activation(activation)
    target = target or x86.host_target()
    params = params or x86_xcsr.host_xcsr_params(regime)
    key = ("xcsr", regime, activation, index_dtype, target_key(target), params, panels_out)

    def make():
        sch = x86_xcsr.schedule_xcsr(regime, activation=activation, index_dtype=index_dtype, target=target,
                                     params=params, panels_out=panels_out)
        return load_or_build(sch, kernel_name(regime, activation, index_dtype, params, panels_out), target)

    return KERNELS.get(key, make)


kernel_name = x86_xcsr.xcsr_kernel_name


def params_for(params: dict, m: int):
    """The tiles for ``m`` rows of X: the gemv tiles below 8 rows, else the gemm tiles with the panel
    halved (down to 16 rows) while half of it still holds ``m`` (16 rows of X run in a 16-row panel,
    not a 64-row one that is three-quarters padding)."""
    if m < x86.GEMM_MIN_M:
        return params["gemv"]
    p = params["gemm"]
    mt = p.m_tile
    while mt > 16 and mt // 2 >= m:
        mt //= 2
    return p if mt == p.m_tile else replace(p, m_tile=mt)


def block_pointers(matrix: RowSparseMatrix, k_block: int, rows: int) -> torch.Tensor:
    """PTR (rows, KB + 1) int32: ``PTR[n, j]`` is the first nonzero of row ``n`` with column ≥ ``j · k_block``.

    Rows are sorted by column, so each column block of a row is a contiguous range of its nonzeros;
    ``k_block = 0`` gives one block (``PTR[n] = (indptr[n], indptr[n + 1])``). Rows past N are empty.
    """
    n, k = matrix.shape
    nblocks = -(-k // k_block) if k_block else 1
    ptr = matrix.indptr.to(torch.int64)
    counts = torch.zeros(rows, nblocks, dtype=torch.int64)
    if matrix.nnz:
        row_of = torch.repeat_interleave(torch.arange(n), ptr[1:] - ptr[:-1])
        blk = matrix.indices.to(torch.int64) // k_block if k_block else torch.zeros(matrix.nnz, dtype=torch.int64)
        counts.index_put_((row_of, blk), torch.ones(matrix.nnz, dtype=torch.int64), accumulate=True)
    start = torch.full((rows,), int(ptr[-1]), dtype=torch.int64)
    start[:n] = ptr[:-1]
    out = torch.empty(rows, nblocks + 1, dtype=torch.int32)
    out[:, 0] = start
    out[:, 1:] = start[:, None] + counts.cumsum(1)
    return out.contiguous()


def pack_xt(x2: torch.Tensor, mt: int) -> torch.Tensor:
    """XT (ceil(M / mt), K, mt): X (M, K) transposed in panels of ``mt`` rows, the last one zero-padded."""
    m, k = x2.shape
    if mt == 1:
        return aligned(x2).view(m, k, 1)
    mtiles = -(-m // mt)
    xt = aligned_empty((mtiles, k, mt))
    view = xt.permute(0, 2, 1)  # (MT, mt, K)
    full = m // mt
    if full:
        view[:full].copy_(x2[:full * mt].reshape(full, mt, k))
    rem = m - full * mt
    if rem:
        view[full, :rem].copy_(x2[full * mt:])
        view[full, rem:].zero_()
    return xt


class _LastPacked(threading.local):
    """The X^T panels of the last input packed in this thread: the layers that read the same tensor (an
    attention block's query, key and value projections) pack it once. Reused only for the very same tensor
    object at the same version (an in-place change bumps ``_version``) and panel height."""

    def __init__(self):
        self.ref = self.version = self.mt = self.xt = None
        self.fref = self.fversion = self.finite = None

    def panels(self, x: torch.Tensor, x2: torch.Tensor, mt: int) -> torch.Tensor:
        if self.ref is not None and self.ref() is x and self.version == x._version and self.mt == mt:
            return self.xt
        xt = pack_xt(x2, mt)
        self.ref, self.version, self.mt, self.xt = weakref.ref(x), x._version, mt, xt
        return xt

    def all_finite(self, x: torch.Tensor, x2: torch.Tensor) -> bool:
        """:func:`~sparsecc.runtime.ieee.all_finite` of ``x``, checked once for the layers that share it."""
        if self.fref is not None and self.fref() is x and self.fversion == x._version:
            return self.finite
        self.fref, self.fversion, self.finite = weakref.ref(x), x._version, all_finite(x2)
        return self.finite


_LAST = _LastPacked()


class _Handoff(threading.local):
    """The output of a layer written as the X^T panels of the next one (:meth:`XCSRLinear.chain_to`): the
    panel tensor, and the leading shape and rows of the activation it stands for."""

    def __init__(self):
        self.ref = self.lead = self.m = None

    def put(self, panels: torch.Tensor, lead: tuple, m: int) -> None:
        self.ref, self.lead, self.m = weakref.ref(panels), lead, m

    def take(self, x: torch.Tensor):
        if self.ref is not None and self.ref() is x:
            lead, m = self.lead, self.m
            self.ref = self.lead = self.m = None
            return lead, m
        return None


_HANDOFF = _Handoff()


class XCSRLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` with an unstructured ``W`` (:class:`RowSparseMatrix`), vectorized along the tokens.

    Inputs of any leading shape ``(..., K)`` are folded into ``M`` rows; for ``M >= 8`` X is packed
    transposed in panels of ``m_tile`` rows (one copy of X per call), for ``M < 8`` the kernel gathers
    along X's rows directly.

    Parameters
    ----------
    matrix : RowSparseMatrix
        W: (N, K).
    bias : Tensor (N,), optional
    activation : {None, "relu", "gelu"}
    target : tvm.target.Target, optional
        Default: the host CPU.
    params : dict regime -> XCSRParams, optional
        Tiles (default: :func:`sparsecc.targets.x86_xcsr.default_xcsr_params`).

    Raises
    ------
    InvalidSparsityError
        ``matrix`` is not a :class:`RowSparseMatrix`.
    UnsupportedOpError
        Unknown activation.
    InputShapeError
        Bias of the wrong shape.
    """

    layer_kind = "linear"
    format = "xcsr"

    def __init__(self, matrix: RowSparseMatrix, bias: torch.Tensor | None = None, activation: str | None = None,
                 target=None, params: dict | None = None):
        super().__init__()
        if not isinstance(matrix, RowSparseMatrix):
            raise InvalidSparsityError(f"XCSRLinear needs a RowSparseMatrix, got {type(matrix).__name__}")
        check_activation(activation)
        n, k = matrix.shape
        self.shape = (n, k)
        self.density = matrix.density
        self.activation = activation
        self.target = target or x86.host_target()
        self.params = dict(params) if params else {r: x86_xcsr.host_xcsr_params(r) for r in ("gemv", "gemm")}
        blocks = {p.k_block for p in self.params.values()}
        if len(blocks) != 1:
            raise InvalidSparsityError(f"both regimes must share k_block (one storage layout), got {sorted(blocks)}")
        kb = blocks.pop()
        # a tile height that does not divide N: the largest power of two below it that does (no padded rows)
        self.params = {r: p if n % p.row_group == 0 else
                       replace(p, row_group=next(g for g in (64, 32, 16, 8, 4, 2, 1) if g < p.row_group and n % g == 0))
                       for r, p in self.params.items()}
        self.index_dtype = "int16" if matrix.indices.dtype == torch.int16 else "int32"
        data, indices = matrix.data.detach().to(torch.float32), matrix.indices
        if data.numel() == 0:  # TVM refuses empty tensors; indptr keeps the one slot unread
            data, indices = torch.zeros(1), torch.zeros(1, dtype=indices.dtype)
        indptr = block_pointers(matrix, kb, n)
        self.register_buffer("data", aligned(data.contiguous()))
        self.register_buffer("indices", aligned(indices.contiguous()))
        self.register_buffer("indptr", aligned(indptr))
        if bias is not None and tuple(bias.shape) != (n,):
            raise InputShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self.has_bias = bias is not None
        # the kernel always adds a bias (zeros when the layer has none: N adds per row of X)
        b = bias.detach().to(torch.float32) if bias is not None else torch.zeros(n)
        self.register_buffer("bias", aligned(b.contiguous()))
        self._kernels: dict = {}
        self.next_layer: XCSRLinear | None = None  # set by chain_to
        self.takes_panels = False

    def chain_to(self, nxt) -> bool:
        """Write this layer's output as the X^T panels of ``nxt`` (the only reader of it), when both run the
        panel kernels with one panel height: the next layer skips its transpose of X. Returns whether
        ``nxt`` can take them (an :class:`XCSRLinear` whose K is this layer's N, on the same target).

        Called by :class:`sparsecc.passes.lower.ChainSparseLinears`; ``forward`` then returns, for
        ``M >= 8``, a panel tensor ``(MT, N, mt)`` only ``nxt`` reads.
        """
        if not isinstance(nxt, XCSRLinear) or nxt.shape[1] != self.shape[0] or str(nxt.target) != str(self.target):
            return False
        self.next_layer, nxt.takes_panels = nxt, True
        return True

    def _kernel(self, p, panels_out: bool = False):
        fn = self._kernels.get((p, panels_out))
        if fn is None:
            regime = "gemv" if p.m_tile == 1 else "gemm"
            fn = get_xcsr_kernel(regime, self.activation, self.index_dtype, self.target, p, panels_out)
            self._kernels[(p, panels_out)] = fn
        return fn

    @property
    def kernel_name(self) -> str:
        return kernel_name("gemm", self.activation, self.index_dtype, self.params["gemm"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, True)

    def forward_standalone(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` outside the compiled graph: ``(..., K) -> (..., N)`` whatever :meth:`chain_to` set."""
        return self._run(x, False)

    def _run(self, x: torch.Tensor, chained: bool) -> torch.Tensor:
        n, k = self.shape
        handed = _HANDOFF.take(x) if chained and self.takes_panels else None
        if handed is not None:  # x is the previous layer's output as our X^T panels
            (lead, m), xt = handed, x
            if not all_finite(xt):  # NaN or inf (or a padded row of act(NaN bias)): torch's answer
                return self.torch_forward(xt.permute(0, 2, 1).reshape(-1, k)[:m]).view(lead + (n,))
            p = params_for(self.params, m)
        else:
            lead, x2 = rows_of(x, k)
            m = x2.shape[0]
            if m == 0:
                return x.new_empty(lead + (n,))
            if not _LAST.all_finite(x, x2):  # skipping W's zeros would drop their 0 · NaN (runtime.ieee)
                return self.torch_forward(x2).view(lead + (n,))
            p = params_for(self.params, m)
            xt = _LAST.panels(x, x2, p.m_tile) if p.m_tile > 1 else pack_xt(x2, 1)
        b = self._buffers
        args = (xt, b["data"], b["indices"], b["indptr"], b["bias"])
        nxt = self.next_layer if chained and p.m_tile > 1 else None  # M < 8: the gather kernel, no panels
        if nxt is not None and params_for(nxt.params, m).m_tile == p.m_tile:
            y = aligned_empty((xt.shape[0], n, p.m_tile))
            self._kernel(p, True)(*args, y)
            _HANDOFF.put(y, lead, m)
            return y
        y = output_buffer(m, n)
        self._kernel(p)(*args, y)
        return y if len(lead) == 1 else y.view(lead + (n,))

    def dense_weight(self) -> torch.Tensor:
        """W: (N, K) dense, with its zeros, from the stored nonzeros."""
        n, k = self.shape
        ptr = self.indptr
        indptr = torch.cat([ptr[:, 0], ptr[-1:, -1]]) if n else torch.zeros(1, dtype=torch.int32)
        nnz = int(indptr[-1])
        return RowSparseMatrix((n, k), self.data[:nnz], self.indices[:nnz], indptr.to(torch.int32)).to_dense()

    def torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's ``act(x2 @ W.T + b)`` for x2 (M, K): the path of inputs holding NaN or inf."""
        return torch_linear(x2, self.dense_weight(), self.bias if self.has_bias else None, self.activation)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, density={self.density:.3f}, bias={self.has_bias}, "
                f"activation={self.activation}, index={self.index_dtype}")


cpu_xcsr_linear = XCSR.register_module("x86")(XCSR.register_module("arm")(cpu_factory(XCSRLinear, "xcsr", "cpu_xcsr_linear")))


@XCSR.register_exporter("linear")
def export_xcsr_linear(ctx, bb, x, mod: XCSRLinear):
    """Relax for one :class:`XCSRLinear`: X (..., K) -> XT panels (zero-padded), kernel, Y (M, N) -> (..., N)."""
    from tvm import relax

    from sparsecc.runtime.export import panels_for_export, rows_for_export

    n, k = mod.shape
    lead, m = rows_for_export(x)
    regime = x86.regime_for(m)
    p = params_for(mod.params, m)
    xt, _ = panels_for_export(bb, x, m, k, p.m_tile)
    args = [xt, ctx.const(mod.data), ctx.const(mod.indices), ctx.const(mod.indptr), ctx.const(mod.bias)]
    sch = x86_xcsr.schedule_xcsr(regime, activation=mod.activation, index_dtype=mod.index_dtype,
                                 target=ctx.tvm_target, params=p)
    gv = ctx.gvar(bb, "sparsecc_" + kernel_name(regime, mod.activation, mod.index_dtype, p), sch)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((m, n), "float32")))
    return bb.emit(relax.op.reshape(y, (*lead, n)))
