"""N:M sparse linear kernels: build cache and the torch-facing :class:`NMLinear` module.

Kernels come from :mod:`sparsecc.codegen.nm` scheduled by
:mod:`sparsecc.targets.x86_nm`, built through
:func:`sparsecc.runtime.kernels.load_or_build` (the disk cache all kernel
families share) and kept per process.
"""

from __future__ import annotations

import torch

from sparsecc.cache import KERNELS
from sparsecc.codegen.nm import column_dtype, offset_dtype
from sparsecc.errors import InputShapeError, InvalidSparsityError, UnsupportedOpError
from sparsecc.formats import NM, Candidate, NMSparseMatrix
from sparsecc.runtime.ieee import all_finite, torch_linear
from sparsecc.runtime.modules import cpu_factory
from sparsecc.runtime.kernels import (aligned, aligned_empty, check_activation, load_or_build, output_buffer, rows_of,
                                      target_key)
from sparsecc.targets import x86, x86_nm

__all__ = ["NMLinear", "get_nm_kernel", "nm_kernel_name", "pack_nm"]


def nm_kernel_name(n: int, m: int, regime: str, bias: bool, activation: str | None) -> str:
    """``nm_<n>x<m>_<regime>[_bias][_act]``."""
    return Candidate("nm", (n, m)).kernel_name("linear", regime, bias, activation)


def get_nm_kernel(n: int, m: int, groups: int, regime: str, bias: bool, activation: str | None = None,
                  target=None, params=None):
    """Compiled N:M kernel (packed function) for pattern ``n:m`` with ``groups`` = ceil(K / m) and ``regime``.

    Arguments of the returned function: ``XT (MT, G·m, mt)``, ``V (NR, G·n, rt)``,
    ``P (NR, G, rt)``, [``B (NR, rt)``], ``Y (MT, mt, NR, rt)``, all 64-byte
    aligned and contiguous (see :mod:`sparsecc.codegen.nm` and :func:`pack_nm`).

    Raises
    ------
    UnsupportedOpError
        Unknown activation.
    KernelBuildError
        The TVM build failed.
    """
    check_activation(activation)
    target = target or x86.host_target()
    params = params or x86_nm.default_nm_params(regime, target=target)
    key = ("nm", int(n), int(m), int(groups), regime, bool(bias), activation, target_key(target), params)

    def make():
        sch = x86_nm.schedule_nm(n, m, groups, regime, bias=bool(bias), activation=activation, target=target,
                                 params=params)
        return load_or_build(sch, nm_kernel_name(n, m, regime, bool(bias), activation), target)

    return KERNELS.get(key, make)


def pack_nm(matrix: NMSparseMatrix, r_tile: int, index: str = "column", m_tile: int = 1) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Kernel layout of ``matrix``, N padded to a multiple of ``rt``.

    Returns
    -------
    V : Tensor (NR, G·n, rt) float32
    P : Tensor (NR, G·n, rt) int16/int32 columns (``index="column"``) or
        (NR, G, rt) packed positions (``index="packed"``), or (NR, G·n, rt)
        uint16/int32 ``column · m_tile`` (``index="offset"``: the flat offset of
        the X^T row in an ``m_tile`` tile, so it depends on ``m_tile``), or
        (NR, G'·n, rt) uint8 column inside its chunk of ``rt`` columns
        (``index="permute"``, G' = groups padded to whole chunks).

    Padded rows hold zero values and column 0 (they produce zeros that the
    caller slices off).
    """
    rows = matrix.shape[0]
    rt = int(r_tile)
    nr = -(-rows // rt)
    g, gn = matrix.groups, matrix.groups * matrix.n
    if index == "permute":  # groups padded to whole chunks of rt columns; P = column inside the chunk
        gpc = rt // matrix.m
        g = -(-g // gpc) * gpc
        gn = g * matrix.n
    v = torch.zeros(nr * rt, gn, dtype=torch.float32)
    v[:rows, :matrix.values.shape[1]] = matrix.values
    if index == "permute":
        within = (torch.arange(matrix.groups) % gpc).view(1, -1, 1) * matrix.m + matrix.positions()
        p = torch.zeros(nr * rt, gn, dtype=torch.uint8)
        p[:rows, :matrix.values.shape[1]] = within.reshape(rows, -1).to(torch.uint8)
    elif index == "packed":
        p = torch.zeros(nr * rt, g, dtype=matrix.meta.dtype)
        p[:rows] = matrix.meta
    elif index == "column":
        cdt = torch.int16 if column_dtype(g * matrix.m) == "int16" else torch.int32
        p = torch.zeros(nr * rt, gn, dtype=cdt)
        p[:rows] = matrix.columns().to(cdt)
    elif index == "offset":
        odt = torch.uint16 if offset_dtype(g * matrix.m, m_tile) == "uint16" else torch.int32
        p = torch.zeros(nr * rt, gn, dtype=torch.int32)
        p[:rows] = (matrix.columns() * m_tile).to(torch.int32)
        p = p.to(odt)
    else:
        raise UnsupportedOpError(f"index mode {index!r} is not supported; expected 'offset', 'column' or 'packed'")
    v = v.view(nr, rt, gn).permute(0, 2, 1).contiguous()
    p = p.view(nr, rt, p.shape[1]).permute(0, 2, 1).contiguous()
    return v, p


class NMLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` with ``W`` N:M sparse along K, run by a TVM kernel.

    Inputs of any leading shape ``(..., K)`` (e.g. a batch of sequences
    ``(B, S, K)`` sharing the weight): the leading dims are folded into
    ``M = B·S`` rows, transposed into tiles of ``m_tile`` rows of X (the last
    tile padded with zeros), so a batch costs one kernel call and the weight is
    streamed once per M tile, not once per sequence. Non-contiguous inputs are
    read through their strides by that transposing copy.

    Parameters
    ----------
    matrix : NMSparseMatrix
        W: (N, K).
    bias : Tensor (N,), optional
    activation : {None, "relu", "gelu"}
    target : tvm.target.Target, optional
        Default: the host CPU.
    eager : bool
        Build both regimes' kernels now instead of at the first call.

    Raises
    ------
    InvalidSparsityError
        ``matrix`` is not an :class:`NMSparseMatrix`.
    UnsupportedOpError
        Unknown activation.
    InputShapeError
        Bias of the wrong shape.
    """

    layer_kind = "linear"

    def __init__(self, matrix: NMSparseMatrix, bias: torch.Tensor | None = None, activation: str | None = None,
                 target=None, eager: bool = False, params: dict | None = None):
        super().__init__()
        if not isinstance(matrix, NMSparseMatrix):
            raise InvalidSparsityError(f"NMLinear needs an NMSparseMatrix, got {type(matrix).__name__}")
        check_activation(activation)
        n_out, k = matrix.shape
        self.shape = (n_out, k)
        self.n, self.m = matrix.n, matrix.m
        self.groups = matrix.groups
        self.format = "nm"
        self.pattern = matrix.pattern
        self.block = None
        self.density = matrix.density
        self.activation = activation
        self.target = target or x86.host_target()
        self.params = dict(params) if params else {r: x86_nm.default_nm_params(r, target=self.target)
                                                   for r in ("gemv", "gemm")}
        rts = {p.r_tile for p in self.params.values()}
        if len(rts) != 1:
            raise UnsupportedOpError(f"both regimes must share r_tile (one value layout), got {sorted(rts)}")
        self.r_tile = rts.pop()
        # one index tensor per distinct (index mode, m_tile of an "offset" index); values are shared
        idx_keys = {r: (p.index, p.m_tile if p.index == "offset" else 1) for r, p in self.params.items()}
        if len({p.index == "permute" for p in self.params.values()}) != 1:
            raise UnsupportedOpError("both regimes must use the permute template or neither (one value layout)")
        self.permute = self.params["gemm"].index == "permute"
        self.k_padded = -(-self.groups * self.m // self.r_tile) * self.r_tile if self.permute else None
        self.meta_names = {}
        v = None
        for regime in ("gemv", "gemm"):
            mode, mt = idx_keys[regime]
            name = f"meta_{mode}_{mt}"
            if not hasattr(self, name):
                v, p = pack_nm(matrix, self.r_tile, mode, mt)
                self.register_buffer(name, aligned(p))
            self.meta_names[regime] = name
        self.register_buffer("values", aligned(v))
        self.n_padded = v.shape[0] * self.r_tile
        if bias is not None:
            if tuple(bias.shape) != (n_out,):
                raise InputShapeError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
            b = torch.zeros(self.n_padded, dtype=torch.float32)
            b[:n_out] = bias.detach().to(torch.float32)
            self.register_buffer("bias", aligned(b.view(-1, self.r_tile)))
        else:
            self.bias = None
        self._kernels: dict[str, object] = {}
        self._args: dict[str, tuple] = {}
        if eager:
            for regime in ("gemv", "gemm"):
                self._kernel(regime)

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() etc. replace the buffers: forget cached arguments
        self._args = {}
        return super()._apply(fn, *args, **kwargs)

    def _kernel(self, regime: str):
        fn = self._kernels.get(regime)
        if fn is None:
            fn = get_nm_kernel(self.n, self.m, self.groups, regime, self.bias is not None, self.activation,
                               self.target, self.params[regime])
            self._kernels[regime] = fn
        return fn

    @property
    def kernel_name(self) -> str:
        return nm_kernel_name(self.n, self.m, "gemm", self.bias is not None, self.activation)

    def transpose_x(self, x2: torch.Tensor, mt: int) -> torch.Tensor:
        """XT (MT, Kp, mt): x2 (M, K) transposed in tiles of ``mt`` rows, zero-padded."""
        m, k = x2.shape
        kp = self.groups * self.m
        mtiles = -(-m // mt)
        if mt == 1 and kp == k:
            return aligned(x2).view(m, k, 1)
        xt = aligned_empty((mtiles, kp, mt))
        view = xt.permute(0, 2, 1)  # (MT, mt, Kp)
        full = m // mt
        if full:
            view[:full, :, :k].copy_(x2[:full * mt].reshape(full, mt, k))
        rem = m - full * mt
        if rem:
            view[full, :rem, :k].copy_(x2[full * mt:])
            view[full, rem:, :].zero_()
        if kp != k:
            view[:, :, k:].zero_()
        return xt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_out, k = self.shape
        lead, x2 = rows_of(x, k)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(lead + (n_out,))
        if not all_finite(x2):  # skipping W's zeros would drop their 0 · NaN (runtime.ieee)
            return self.torch_forward(x2).view(lead + (n_out,))
        regime = "gemm" if m >= 8 else "gemv"
        mt = self.params[regime].m_tile
        if self.permute:
            return self._forward_permute(x2, regime, mt).view(lead + (n_out,))
        xt = self.transpose_x(x2, mt)
        mp = xt.shape[0] * mt
        y = output_buffer(mp, self.n_padded)
        fn = self._kernel(regime)
        y4 = y.view(xt.shape[0], mt, -1, self.r_tile)
        meta = getattr(self, self.meta_names[regime])
        if self.params[regime].index == "offset":
            xt = xt.view(xt.shape[0], -1)
        with torch.no_grad():
            if self.bias is not None:
                fn(xt, self.values, meta, self.bias, y4)
            else:
                fn(xt, self.values, meta, y4)
        y = y[:m]
        if self.n_padded != n_out:
            y = y[:, :n_out].contiguous()
        return y.view(lead + (n_out,))

    def dense_weight(self) -> torch.Tensor:
        """W: (N, K) dense, with its zeros, decoded from the kernel layout (values and the gemm regime's index)."""
        rows, k = self.shape
        rt = self.r_tile
        nr, gn, _ = self.values.shape
        vals = self.values.permute(0, 2, 1).reshape(nr * rt, gn)[:rows]
        p = self.params["gemm"]
        meta = getattr(self, self.meta_names["gemm"])
        idx = meta.permute(0, 2, 1).reshape(nr * rt, meta.shape[1])[:rows].to(torch.int64)
        if p.index == "packed":  # one packed byte (or word) of positions per group
            return NMSparseMatrix((rows, k), self.n, self.m, vals.contiguous(),
                                  idx.to(meta.dtype).contiguous()).to_dense()
        if p.index == "column":
            cols = idx
        elif p.index == "offset":  # column · m_tile
            cols = idx // p.m_tile
        else:  # "permute": the column inside its chunk of rt columns
            chunk = torch.arange(gn) // self.n // (rt // self.m)
            cols = chunk.view(1, -1) * rt + idx
        out = torch.zeros(rows, gn // self.n * self.m, dtype=torch.float32)
        # accumulate: zero slots of padded groups may name a column a real slot holds
        out.index_put_((torch.arange(rows).view(-1, 1).expand_as(cols), cols), vals, accumulate=True)
        return out[:, :k].contiguous()

    def torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's ``act(x2 @ W.T + b)`` for x2 (M, K): the path of inputs holding NaN or inf."""
        bias = self.bias.reshape(-1)[:self.shape[0]] if self.bias is not None else None
        return torch_linear(x2, self.dense_weight(), bias, self.activation)

    def _forward_permute(self, x2: torch.Tensor, regime: str, mt: int) -> torch.Tensor:
        """X (M, K) row-major (rows padded to a multiple of ``mt``, K to whole vector chunks) -> Y (M, N)."""
        m, k = x2.shape
        kl = self.k_padded
        mp = -(-m // mt) * mt
        if mp != m or kl != k:
            xp = aligned_empty((mp, kl))
            xp[:m, :k].copy_(x2)
            if kl != k:
                xp[:m, k:].zero_()
            if mp != m:
                xp[m:].zero_()
            x2 = xp
        else:
            x2 = aligned(x2)
        y = output_buffer(mp, self.n_padded)
        fn = self._kernels.get(regime) or self._kernel(regime)
        args = self._args.get(regime)
        if args is None:  # (values, meta[, bias]): looked up once, nn.Module attribute access costs µs per call
            args = (self.values, getattr(self, self.meta_names[regime])) + (
                (self.bias,) if self.bias is not None else ())
            self._args[regime] = args
        fn(x2, *args, y.view(mp, -1, self.r_tile))  # no autograd: the kernel is opaque to torch
        if mp != m:
            y = y[:m]
        return y[:, :self.shape[0]].contiguous() if self.n_padded != self.shape[0] else y

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, pattern={self.pattern}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, activation={self.activation}, r_tile={self.r_tile}")


cpu_nm_linear = NM.register_module("x86")(NM.register_module("arm")(cpu_factory(NMLinear, "nm", "cpu_nm_linear")))


@NM.register_exporter("linear")
def export_nm_linear(ctx, bb, x, mod: NMLinear):
    """N:M: X (M, K) -> XT (MT, Kp, mt) tiles (zero-padded), kernel, Y (MT, mt, NR, rt) -> (M, N)."""
    from tvm import relax

    from sparsecc.runtime.export import panels_for_export, rows_for_export

    n_out, k = mod.shape
    lead, m = rows_for_export(x)
    regime = x86.regime_for(m)
    p = mod.params[regime]  # the module's packed values/meta fix the tiles (ArmTarget gives NEON ones)
    if p.index == "permute":
        raise UnsupportedOpError("N:M layers on the x86 permute template (AVX vpermps) have no export path "
                                 "yet; export for target='arm' or keep them dense")
    mt, kp = p.m_tile, mod.groups * mod.m
    xt, mtiles = panels_for_export(bb, x, m, k, mt, kp)
    if p.index == "offset":
        xt = bb.emit(relax.op.reshape(xt, (mtiles, kp * mt)))
    meta = getattr(mod, mod.meta_names[regime])
    args = [xt, ctx.const(mod.values), ctx.const(meta)]
    if mod.bias is not None:
        args.append(ctx.const(mod.bias))
    sch = x86_nm.schedule_nm(mod.n, mod.m, mod.groups, regime, bias=mod.bias is not None,
                             activation=mod.activation, target=ctx.tvm_target, params=p)
    name = (f"sparsecc_{nm_kernel_name(mod.n, mod.m, regime, mod.bias is not None, mod.activation)}"
            f"_g{mod.groups}_mt{mt}_rt{p.r_tile}_{p.index}")
    gv = ctx.gvar(bb, name, sch)
    nr = mod.n_padded // mod.r_tile
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mtiles, mt, nr, mod.r_tile), "float32")))
    y = bb.emit(relax.op.reshape(y, (mtiles * mt, mod.n_padded)))
    if mtiles * mt != m or mod.n_padded != n_out:
        y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n_out]))
    return bb.emit(relax.op.reshape(y, (*lead, n_out)))

