"""TensorIR template for ``Y = act(X @ W.T + b)`` with an N:M-sparse ``W`` (N:M along K).

The N:M structure is static: every row of ``W`` (N, K) stores ``G·n`` values
(``G = ceil(K / m)`` groups of ``m`` columns, ``n`` slots each, see
:class:`~sparsecc.formats.NMSparseMatrix`), so unlike BSR/CSR no loop extent
depends on the data; only the column read from ``X`` does (the packed
position of each slot).

Layouts (the kernel's, built by :class:`~sparsecc.runtime.nm.NMLinear`):

* ``XT (MT, Kp, mt)``: X transposed in tiles of ``mt`` rows (``MT = Mp / mt``,
  ``Kp = G·m``, padded rows and columns are zero). One slot of W multiplies a
  contiguous ``mt``-vector of ``XT`` (the kernel vectorizes along M), because
  the column a slot reads differs from row to row of W, so vectorizing along N
  would need a gather per FMA.
* ``V (NR, G·n, rt)``: values in tiles of ``rt`` rows of W, the ``rt`` rows of
  one slot contiguous (one stream per tile instead of ``rt``).
* ``P``, the index of every slot, in one of two modes:

  - ``index="column"`` (what :class:`~sparsecc.runtime.nm.NMLinear` uses):
    ``P (NR, G·n, rt)`` int16 (int32 when ``Kp > 32767``), the column in the
    padded K of each slot. One index load per FMA.
  - ``index="packed"``: ``P (NR, G, rt)``, the format's packed byte per (row,
    group); slot ``s`` sits at bits ``[s·b, s·b + b)``; decoded with a shift and
    a mask per slot. 8x less index memory, but the decode (LLVM vectorizes it,
    then extracts every lane) cost 1.2-1.3x kernel time at M = 16 on the BERT
    shapes (``int16`` columns: 0.38-0.48 of torch dense, packed: 0.54-0.81, one
    thread, interleaved medians).
* ``B (NR, rt)`` bias, ``Y (MT, mt, NR, rt)`` = the (Mp, Np) row-major output.

Loop structure (unscheduled)::

    for mo, ro in grid(MT, NR):                      # block "row"
        C = alloc (rt, mt)                           # register tile
        for g, s, r, mi in grid(G, n, rt, mt):       # block "compute"
            C[r, mi] += XT[mo, col(ro, g, s, r), mi] * V[ro, g*n + s, r]
        for mi, r in grid(mt, rt):                   # block "epilogue"
            Y[mo, mi, ro, r] = act(C[r, mi] + B[ro, r])

Arguments of the built function, in order: ``XT, V, P, [B], Y``. ``G`` is
static (one build per K and pattern), ``MT`` and ``NR`` are symbolic.

Source: the X-stationary vector-along-M formulation is the CPU SpMM of
"SparseRT"/LIBXSMM-style sparse-dense kernels (each nonzero of the sparse
operand scales a contiguous row of the dense one); the N:M pattern is NVIDIA's
(Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021).
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.codegen.linear import _activation, stack_floats
from sparsecc.errors import UnsupportedOpError

__all__ = ["INDEX_MODES", "PERMUTE_INTRINSICS", "column_dtype", "nm_linear", "nm_linear_permute"]

INDEX_MODES = ("offset", "column", "packed")


def column_dtype(kp: int) -> str:
    """Integer dtype of the "column" index for a padded K of ``kp``: int16 up to 32767, else int32."""
    return "int16" if kp <= 32767 else "int32"


def offset_dtype(kp: int, mt: int) -> str:
    """Integer dtype of the "offset" index (``column · mt``): uint16 up to 65535, else int32."""
    return "uint16" if kp * mt <= 65535 else "int32"


def _meta_dtype(n: int, bits: int) -> str:
    total = n * bits
    return "uint8" if total <= 8 else "int16" if total <= 15 else "int32"


def nm_linear(n: int, m: int, groups: int, *, bias: bool = False, activation: str | None = None,
              m_tile: int = 16, r_tile: int = 8, index: str = "column"):
    """Unscheduled N:M template (a ``tvm.tirx.PrimFunc``).

    Parameters
    ----------
    n, m : int
        The pattern (at most ``n`` nonzeros in every ``m`` consecutive columns).
    groups : int
        G = ceil(K / m), static.
    bias : bool
        Whether the function takes a bias argument ``B (NR, rt)``.
    activation : {None, "relu", "gelu"}
        Fused epilogue (exact GELU through the vectorizable ``fast_erf``).
    m_tile : int
        ``mt``, rows of X per tile (the vector axis of the gemm schedule).
    r_tile : int
        ``rt``, rows of W per tile (independent accumulators).
    index : {"column", "packed"}
        How ``P`` names the column of each slot (see the module docstring).

    Raises
    ------
    UnsupportedOpError
        Non-positive sizes, ``n >= m``, an unknown index mode or activation.
    """
    n, m, G, mt, rt = int(n), int(m), int(groups), int(m_tile), int(r_tile)  # noqa: N806
    if not (0 < n < m) or G < 1 or mt < 1 or rt < 1:
        raise UnsupportedOpError(f"N:M template needs 0 < n < m and positive sizes, got {n}:{m}, G={G}, "
                                 f"m_tile={mt}, r_tile={rt}")
    if index not in INDEX_MODES:
        raise UnsupportedOpError(f"index mode {index!r} is not supported; expected one of {INDEX_MODES}")
    bits = max(1, (m - 1).bit_length())
    mask = (1 << bits) - 1
    act = _activation(activation)
    GN, KP = G * n, G * m  # noqa: N806
    packed, offset = index == "packed", index == "offset"
    p_shape = (G, rt) if packed else (GN, rt)
    pdt = _meta_dtype(n, bits) if packed else offset_dtype(KP, mt) if offset else column_dtype(KP)
    xt_shape = (KP * mt,) if offset else (KP, mt)

    def col(P, vro, vg, vs, vr):
        if packed:
            return vg * m + T.bitwise_and(T.shift_right(T.Cast("int32", P[vro, vg, vr]), vs * bits), mask)
        return T.Cast("int32", P[vro, vg * n + vs, vr])

    def x_at(XT, P, vmo, vro, vg, vs, vr, vmi):
        if offset:  # P holds column * mt: the flat offset of the X^T row, no index arithmetic
            return XT[vmo, T.Cast("int32", P[vro, vg * n + vs, vr]) + vmi]
        return XT[vmo, col(P, vro, vg, vs, vr), vmi]

    def xt_all(XT, vmo):
        return XT[vmo, 0:KP * mt] if offset else XT[vmo, 0:KP, 0:mt]

    def bias_val(B, vro, vr):
        return T.float32(0) if B is None else B[vro, vr]

    def row_reads(XT, V, P, B, vmo, vro):
        regions = [xt_all(XT, vmo), V[vro, 0:GN, 0:rt], P[vro, 0:p_shape[0], 0:rt]]
        return regions if B is None else regions + [B[vro, 0:rt]]

    @T.macro
    def body(XT, V, P, B, Y, MT, NR):
        for mo, ro in T.grid(MT, NR):
            with T.sblock("row"):
                vmo, vro = T.axis.remap("SS", [mo, ro])
                T.reads(row_reads(XT, V, P, B, vmo, vro))
                T.writes(Y[vmo, 0:mt, vro, 0:rt])
                C = T.alloc_buffer((rt, mt), "float32")
                for r, mi in T.grid(rt, mt):
                    with T.sblock("init"):
                        vr, vmi = T.axis.remap("SS", [r, mi])
                        C[vr, vmi] = T.float32(0)
                for g, s, r, mi in T.grid(G, n, rt, mt):
                    with T.sblock("compute"):
                        vg, vs, vr, vmi = T.axis.remap("RRSS", [g, s, r, mi])
                        C[vr, vmi] = C[vr, vmi] + x_at(XT, P, vmo, vro, vg, vs, vr, vmi) * V[vro, vg * n + vs, vr]
                for mi, r in T.grid(mt, rt):
                    with T.sblock("epilogue"):
                        vmi, vr = T.axis.remap("SS", [mi, r])
                        Y[vmo, vmi, vro, vr] = act(C[vr, vmi] + bias_val(B, vro, vr))

    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.nm": [n, m], "sparsecc.m_tile": mt,
             "sparsecc.r_tile": rt, "sparsecc.index": index}
    if bias:

        @T.prim_func(s_tir=True)
        def func(xt_h: T.handle, v_h: T.handle, p_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            MT = T.int32()
            NR = T.int32()
            XT = T.match_buffer(xt_h, (MT, *xt_shape), "float32")
            V = T.match_buffer(v_h, (NR, GN, rt), "float32")
            P = T.match_buffer(p_h, (NR, p_shape[0], rt), pdt)
            B = T.match_buffer(b_h, (NR, rt), "float32")
            Y = T.match_buffer(y_h, (MT, mt, NR, rt), "float32")
            body(XT, V, P, B, Y, MT, NR)

    else:

        @T.prim_func(s_tir=True)
        def func(xt_h: T.handle, v_h: T.handle, p_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            MT = T.int32()
            NR = T.int32()
            XT = T.match_buffer(xt_h, (MT, *xt_shape), "float32")
            V = T.match_buffer(v_h, (NR, GN, rt), "float32")
            P = T.match_buffer(p_h, (NR, p_shape[0], rt), pdt)
            Y = T.match_buffer(y_h, (MT, mt, NR, rt), "float32")
            body(XT, V, P, None, Y, MT, NR)

    return func


#: LLVM intrinsic of a lane-wise variable permutation ``out[i] = a[idx[i]]`` per vector width (lanes of float32).
PERMUTE_INTRINSICS = {16: "llvm.x86.avx512.permvar.sf.512", 8: "llvm.x86.avx2.permps"}


def nm_linear_permute(n: int, m: int, chunks: int, *, lanes: int = 16, bias: bool = False,
                      activation: str | None = None, m_tile: int = 8, k_block: int = 0):
    """N:M template vectorized along N with an in-register permutation of X (x86 AVX2 / AVX-512).

    X keeps its row-major layout. For every chunk of ``L = lanes`` consecutive
    columns of one row of X (one vector load, ``L / m`` groups), every slot of
    a tile of ``L`` rows of W picks its X value with one lane-wise permutation
    (``vpermps``; the slot's index is its column inside the chunk), then one
    FMA with the ``L`` values of the slot: ``L`` multiply-adds per
    permutation, the value and index vectors loaded once per ``m_tile`` rows
    of X. The X vector of a chunk is reused by all ``L / m · n`` slots of its
    groups. Measured against the X^T template (:func:`nm_linear`) on 3072x768
    at M = 16, one thread: 0.29 vs 0.61 of torch dense.

    Layouts: ``X (MP, KL)`` (``KL = chunks · L``, K padded with zeros; ``MP`` a
    multiple of ``m_tile``), ``V (NR, G·n, L)`` float32 and ``P (NR, G·n, L)``
    uint8 (``G = KL / m``; ``P`` = column of the slot inside its chunk,
    ``(g mod (L/m))·m + position``), ``B (NR, L)``, ``Y (MP, NR, L)``.

    Parameters
    ----------
    n, m : int
        The pattern; ``m`` must divide ``lanes``.
    chunks : int
        ``KL / L``, static.
    lanes : {8, 16}
        Vector width in float32 lanes (AVX2: 8, AVX-512: 16).
    bias, activation
        As :func:`nm_linear`.
    m_tile : int
        Rows of X per tile (accumulators: ``m_tile`` vectors).
    k_block : int
        0: one pass over K per (M tile, row tile), parallel over both. Else
        chunks of K per pass (must divide ``chunks``): one "row" block per tile
        of W rows runs every M tile for a block of K before the next (partial
        sums kept in Y, in cache), so the values of a K block stay in L1 while
        all M tiles use them (for large K, where a row tile's values exceed L1).

    Raises
    ------
    UnsupportedOpError
        Unsupported lanes, ``m`` not dividing ``lanes``, ``k_block`` not
        dividing ``chunks``, bad sizes or activation.
    """
    n, m, CH, L, mt = int(n), int(m), int(chunks), int(lanes), int(m_tile)  # noqa: N806
    if L not in PERMUTE_INTRINSICS:
        raise UnsupportedOpError(f"lanes must be one of {sorted(PERMUTE_INTRINSICS)}, got {L}")
    if not (0 < n < m) or L % m or CH < 1 or mt < 1:
        raise UnsupportedOpError(f"permute N:M template needs 0 < n < m, m dividing lanes={L} and positive "
                                 f"sizes, got {n}:{m}, chunks={CH}, m_tile={mt}")
    KB = int(k_block)  # noqa: N806
    if KB < 0 or (KB and CH % KB):
        raise UnsupportedOpError(f"k_block={KB} must divide chunks={CH}")
    intrin = PERMUTE_INTRINSICS[L]
    act = _activation(activation)
    GPC = L // m  # noqa: N806 - groups per chunk
    GN, KL = CH * GPC * n, CH * L  # noqa: N806

    def bias_val(B, vro, vr):
        return T.float32(0) if B is None else B[vro, vr]

    def row_reads(X, V, P, B, vmo, vro):
        regions = [X[vmo * mt:vmo * mt + mt, 0:KL], V[vro, 0:GN, 0:L], P[vro, 0:GN, 0:L]]
        return regions if B is None else regions + [B[vro, 0:L]]

    @T.macro
    def body(X, V, P, B, Y, MP, NR):
        for mo, ro in T.grid(MP // mt, NR):
            with T.sblock("row"):
                vmo, vro = T.axis.remap("SS", [mo, ro])
                T.reads(row_reads(X, V, P, B, vmo, vro))
                T.writes(Y[vmo * mt:vmo * mt + mt, vro, 0:L])
                C = T.decl_buffer((mt, L), "float32", data=stack_floats(mt * L), scope="local")
                XC = T.decl_buffer((mt, L), "float32", data=stack_floats(mt * L), scope="local")
                for mi in T.unroll(mt):
                    C[mi, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                for ch in T.serial(CH):
                    for mi in T.unroll(mt):
                        XC[mi, T.ramp(0, 1, L)] = X[vmo * mt + mi, T.ramp(ch * L, 1, L)]
                    for gs in T.unroll(GPC * n):
                        for mi in T.unroll(mt):
                            C[mi, T.ramp(0, 1, L)] = C[mi, T.ramp(0, 1, L)] + T.call_llvm_pure_intrin(
                                T.llvm_lookup_intrinsic_id(intrin), XC[mi, T.ramp(0, 1, L)],
                                T.Cast(f"int32x{L}", P[vro, ch * GPC * n + gs, T.ramp(0, 1, L)]),
                                dtype=f"float32x{L}") * V[vro, ch * GPC * n + gs, T.ramp(0, 1, L)]
                for mi, r in T.grid(mt, L):
                    with T.sblock("epilogue"):
                        vmi, vr = T.axis.remap("SS", [mi, r])
                        Y[vmo * mt + vmi, vro, vr] = act(C[vmi, vr] + bias_val(B, vro, vr))

    @T.macro
    def chunk_fma(X, V, P, C, XC, vro, row0, ch):
        for mi in T.unroll(mt):
            XC[mi, T.ramp(0, 1, L)] = X[row0 + mi, T.ramp(ch * L, 1, L)]
        for gs in T.unroll(GPC * n):
            for mi in T.unroll(mt):
                C[mi, T.ramp(0, 1, L)] = C[mi, T.ramp(0, 1, L)] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(intrin), XC[mi, T.ramp(0, 1, L)],
                    T.Cast(f"int32x{L}", P[vro, ch * GPC * n + gs, T.ramp(0, 1, L)]),
                    dtype=f"float32x{L}") * V[vro, ch * GPC * n + gs, T.ramp(0, 1, L)]

    def kblocked_reads(X, V, P, B, vro, MP):
        regions = [X[0:MP, 0:KL], V[vro, 0:GN, 0:L], P[vro, 0:GN, 0:L]]
        return regions if B is None else regions + [B[vro, 0:L]]

    @T.macro
    def body_kblocked(X, V, P, B, Y, MP, NR):
        for ro in T.serial(NR):
            with T.sblock("row"):
                vro = T.axis.spatial(NR, ro)
                T.reads(kblocked_reads(X, V, P, B, vro, MP))
                T.writes(Y[0:MP, vro, 0:L])
                C = T.decl_buffer((mt, L), "float32", data=stack_floats(mt * L), scope="local")
                XC = T.decl_buffer((mt, L), "float32", data=stack_floats(mt * L), scope="local")
                for kb in T.serial(CH // KB - 1):  # partial sums of all but the last K block, kept in Y
                    for mo in T.serial(MP // mt):
                        for mi in T.unroll(mt):
                            if kb == 0:
                                C[mi, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                            else:
                                C[mi, T.ramp(0, 1, L)] = Y[mo * mt + mi, vro, T.ramp(0, 1, L)]
                        for c in T.serial(KB):
                            chunk_fma(X, V, P, C, XC, vro, mo * mt, kb * KB + c)
                        for mi in T.unroll(mt):
                            Y[mo * mt + mi, vro, T.ramp(0, 1, L)] = C[mi, T.ramp(0, 1, L)]
                for mo in T.serial(MP // mt):  # the last K block, then bias and activation
                    for mi in T.unroll(mt):
                        if CH // KB == 1:
                            C[mi, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
                        else:
                            C[mi, T.ramp(0, 1, L)] = Y[mo * mt + mi, vro, T.ramp(0, 1, L)]
                    for c in T.serial(KB):
                        chunk_fma(X, V, P, C, XC, vro, mo * mt, CH - KB + c)
                    for mi, r in T.grid(mt, L):
                        with T.sblock("epilogue"):
                            vmo, vmi, vr = T.axis.remap("SSS", [mo, mi, r])
                            Y[vmo * mt + vmi, vro, vr] = act(C[vmi, vr] + bias_val(B, vro, vr))

    if KB:
        body = body_kblocked  # noqa: F811
    attrs = {"global_symbol": "main", "tir.noalias": True, "sparsecc.nm": [n, m], "sparsecc.m_tile": mt,
             "sparsecc.r_tile": L, "sparsecc.index": "permute", "sparsecc.k_block": KB}
    if bias:

        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, v_h: T.handle, p_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            MP = T.int32()
            NR = T.int32()
            X = T.match_buffer(x_h, (MP, KL), "float32")
            V = T.match_buffer(v_h, (NR, GN, L), "float32")
            P = T.match_buffer(p_h, (NR, GN, L), "uint8")
            B = T.match_buffer(b_h, (NR, L), "float32")
            Y = T.match_buffer(y_h, (MP, NR, L), "float32")
            body(X, V, P, B, Y, MP, NR)

    else:

        @T.prim_func(s_tir=True)
        def func(x_h: T.handle, v_h: T.handle, p_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            MP = T.int32()
            NR = T.int32()
            X = T.match_buffer(x_h, (MP, KL), "float32")
            V = T.match_buffer(v_h, (NR, GN, L), "float32")
            P = T.match_buffer(p_h, (NR, GN, L), "uint8")
            Y = T.match_buffer(y_h, (MP, NR, L), "float32")
            body(X, V, P, None, Y, MP, NR)

    return func
