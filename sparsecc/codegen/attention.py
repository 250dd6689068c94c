"""Fused attention in TensorIR: ``softmax(Q Kᵀ · scale + mask) V`` per (batch, head), scores kept on the stack.

torch's CPU ``scaled_dot_product_attention`` (its flash kernel) runs MiniLM's attention (12 heads, seq 128, head
dim 32, boolean mask; 100 MFLOP a call at batch 8) at 30-36 GFLOP/s on 2 Zen 4 cores, and the three-op form
(two batched GEMMs and a softmax) is slower still there (:mod:`sparsecc.runtime.attention`); this kernel runs
the call in 0.8 of torch's time (``python benchmarks/kernel_speed.py --section attention``). This kernel is written scheduled, for
static ``S`` (queries), ``L`` (keys), ``H`` and ``D`` and a dynamic batch:

* one task per (batch, head) (``B·H`` tasks over the threads): Kᵀ of the head is copied once into a stack
  array ``(D, L')`` (``L'`` = ``L`` rounded up to the vector width, the padding zero), so that scores are
  computed along the key axis with contiguous vector loads;
* per block of ``qb`` queries: the ``qb x L'`` scores in a stack array, one key chunk (one vector) at a time
  with ``qb`` accumulators over ``d`` (a register tile: one load of Kᵀ, ``qb`` broadcasts of Q, ``qb`` FMAs);
  scale, mask (``-inf`` where a boolean mask is False, or a float mask added), padded keys ``-inf``;
* the row softmax of :mod:`sparsecc.codegen.softmax` (vector max, Cephes ``exp``, sum), a row whose keys are
  all masked gives zeros (torch's ``_safe_softmax``, as ``F.scaled_dot_product_attention``);
* ``O = P V`` with ``qb x D`` accumulators in registers: per key one row of V (``D / lanes`` vector loads),
  ``qb`` broadcasts of P.

Layouts: ``Q (B, S, H, D)``, ``K, V (B, L, H, D)``, ``O (B, S, H, D)`` (the layout of the linear projections'
outputs before the head transpose, so no copy is needed on either side), ``mask (MB, S, L)`` with ``MB`` = B
or 1 (uint8 for a boolean mask: nonzero attends; float32 for an additive one).

The blocking follows the CPU flash-attention kernels (Dao et al., NeurIPS 2022, and torch's CPU
``_scaled_dot_product_flash_attention``) without their online softmax: at these lengths a row's scores fit on
the stack, so the softmax is exact in one pass.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from sparsecc.codegen.linear import stack_floats
from sparsecc.codegen.softmax import vector_exp
from sparsecc.errors import UnsupportedOpError

__all__ = ["MASK_KINDS", "fused_attention"]

MASK_KINDS = (None, "bool", "float")


def fused_attention(seq_q: int, seq_k: int, heads: int, head_dim: int, *, scale: float, mask: str | None = None,
                    mask_batched: bool = True, lanes: int = 16, q_block: int = 8) -> tvm.tirx.PrimFunc:
    """Scheduled fused attention (a ``tvm.tirx.PrimFunc``) for static ``S = seq_q``, ``L = seq_k``, ``H``, ``D``.

    Parameters
    ----------
    seq_q, seq_k, heads, head_dim : int
        S, L, H, D; ``D`` a multiple of ``lanes``.
    scale : float
        Multiplies ``Q Kᵀ`` (torch's default is ``1 / sqrt(D)``).
    mask : {None, "bool", "float"}
        No mask, a uint8 mask (nonzero: attend), or an additive float32 mask, of shape ``(MB, S, L)``.
    mask_batched : bool
        ``MB = B`` (True) or 1 (one mask for the whole batch).
    lanes : int
        float32 lanes of one vector (16 AVX-512, 8 AVX2, 4 NEON).
    q_block : int
        Queries per register tile (``q_block`` accumulators for the scores, ``q_block · D / lanes`` for P V).

    Raises
    ------
    UnsupportedOpError
        Non-positive sizes, ``D`` not a multiple of ``lanes``, an unknown mask kind.
    """
    S, L, H, D, lanes, qb = (int(v) for v in (seq_q, seq_k, heads, head_dim, lanes, q_block))
    if min(S, L, H, D, lanes, qb) < 1 or D % lanes:
        raise UnsupportedOpError(f"fused attention needs positive sizes and a head dim that is a multiple of {lanes}, "
                                 f"got S={S}, L={L}, H={H}, D={D}")
    if mask not in MASK_KINDS:
        raise UnsupportedOpError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
    qb = min(qb, S)
    lc = -(-L // lanes)  # key chunks
    lp = lc * lanes
    dv = D // lanes
    full, rest = divmod(S, qb)
    neg_inf = T.float32(float("-inf"))
    scale_c = T.float32(float(scale))
    mdtype = "uint8" if mask == "bool" else "float32"
    m_shape = (lambda MB: (MB, S, L)) if mask is not None else (lambda MB: (1, 1, 1))  # no mask: a dummy
    m_region = (lambda M, MB: M[0:MB, 0:S, 0:L]) if mask is not None else (lambda M, MB: M[0:1, 0:1, 0:1])

    def masked(acc, M, b, i, j):
        """The scaled score of query ``i``, key ``j`` with the mask (and the key padding) applied."""
        s = acc * scale_c
        if mask is None:
            return T.Select(j < L, s, neg_inf)
        mb = b if mask_batched else 0
        jj = T.min(j, L - 1)
        if mask == "bool":
            return T.Select(j < L, T.Select(M[mb, i, jj] != T.uint8(0), s, neg_inf), neg_inf)
        return T.Select(j < L, s + M[mb, i, jj], neg_inf)

    @T.macro
    def zero_tile(acc, rows, width):
        for r in T.unroll(rows):
            for t in T.vectorized(width):
                acc[r * width + t] = T.float32(0)

    @T.macro
    def query_block(Q, KT, V, O, M, P, b, h, i0, rows):
        # scores: one key chunk at a time, `rows` accumulators over d
        for c in range(lc):
            acc = T.decl_buffer((qb * lanes,), "float32", data=stack_floats(qb * lanes), scope="local")
            zero_tile(acc, rows, lanes)
            for d in range(D):
                for r in T.unroll(rows):
                    for t in T.vectorized(lanes):
                        acc[r * lanes + t] = acc[r * lanes + t] + Q[b, i0 + r, h, d] * KT[d * lp + c * lanes + t]
            for r in T.unroll(rows):
                for t in T.vectorized(lanes):
                    P[r * lp + c * lanes + t] = masked(acc[r * lanes + t], M, b, i0 + r, c * lanes + t)
        # row softmax (safe: a row of -inf gives zeros)
        for r in range(rows):
            red = T.decl_buffer((lanes,), "float32", data=stack_floats(lanes), scope="local")
            mx = T.decl_buffer((2,), "float32", data=stack_floats(2), scope="local")
            for t in T.vectorized(lanes):
                red[t] = neg_inf
            for c in range(lc):
                for t in T.vectorized(lanes):
                    red[t] = T.Select(P[r * lp + c * lanes + t] > red[t], P[r * lp + c * lanes + t], red[t])
            mx[0] = red[0]
            for t in T.unroll(1, lanes):
                mx[0] = T.Select(red[t] > mx[0], red[t], mx[0])
            mx[0] = T.Select(mx[0] == neg_inf, T.float32(0), mx[0])  # all masked: exp(-inf - 0) = 0
            for t in T.vectorized(lanes):
                red[t] = T.float32(0)
            for c in range(lc):
                for t in T.vectorized(lanes):
                    P[r * lp + c * lanes + t] = vector_exp(P[r * lp + c * lanes + t] - mx[0])
                    red[t] = red[t] + P[r * lp + c * lanes + t]
            mx[1] = red[0]
            for t in T.unroll(1, lanes):
                mx[1] = mx[1] + red[t]
            mx[1] = T.Select(mx[1] > T.float32(0), T.float32(1) / mx[1], T.float32(0))
            for c in range(lc):
                for t in T.vectorized(lanes):
                    P[r * lp + c * lanes + t] = P[r * lp + c * lanes + t] * mx[1]
        # O = P V: rows x D accumulators, one row of V per key
        oacc = T.decl_buffer((qb * D,), "float32", data=stack_floats(qb * D), scope="local")
        zero_tile(oacc, rows, D)
        for j in range(L):
            for r in T.unroll(rows):
                for t in T.vectorized(D):
                    oacc[r * D + t] = oacc[r * D + t] + P[r * lp + j] * V[b, j, h, t]
        for r in T.unroll(rows):
            for t in T.vectorized(D):
                O[b, i0 + r, h, t] = oacc[r * D + t]

    @T.prim_func(s_tir=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tirx.is_scheduled": True,
                     "sparsecc.kind": "attention"})
        B = T.int32()
        MB = T.int32() if mask is not None else 1
        Q = T.match_buffer(q_h, (B, S, H, D), "float32")
        K = T.match_buffer(k_h, (B, L, H, D), "float32")
        V = T.match_buffer(v_h, (B, L, H, D), "float32")
        M = T.match_buffer(m_h, m_shape(MB), mdtype)
        O = T.match_buffer(o_h, (B, S, H, D), "float32")
        for bh in T.parallel(B * H):
            with T.sblock("head"):
                vbh = T.axis.spatial(B * H, bh)
                T.reads(Q[vbh // H, 0:S, vbh % H, 0:D], K[vbh // H, 0:L, vbh % H, 0:D],
                        V[vbh // H, 0:L, vbh % H, 0:D], m_region(M, MB))
                T.writes(O[vbh // H, 0:S, vbh % H, 0:D])
                KT = T.decl_buffer((D * lp,), "float32", data=stack_floats(D * lp), scope="local")
                P = T.decl_buffer((qb * lp,), "float32", data=stack_floats(qb * lp), scope="local")
                for d, j in T.grid(D, lp):
                    KT[d * lp + j] = T.Select(j < L, K[vbh // H, T.min(j, L - 1), vbh % H, d], T.float32(0))
                for ib in range(full):
                    query_block(Q, KT, V, O, M, P, vbh // H, vbh % H, ib * qb, qb)
                if rest > 0:
                    query_block(Q, KT, V, O, M, P, vbh // H, vbh % H, full * qb, rest)

    return func
