"""TensorIR template for an activation-gated linear: ``Y = gate(H) · W + b``, reading only the active rows of W.

The down projection of a feed-forward block, ``Y = H · W_downᵀ + b`` with ``H: (M, K)`` the block's intermediate
activation (``K`` neurons), where every activation whose magnitude is at most the gate's threshold ``t`` counts as
zero (contextual sparsity: TEAL, Liu et al. 2024; CATS, Lee et al. 2024; Deja Vu, Liu et al. ICML 2023, skips the
same rows with a learned predictor). The weight is stored transposed, ``WT = W_downᵀ: (K, N)``, so each neuron's
row of ``N`` outputs is contiguous and a skipped neuron costs no memory traffic.

Loop structure::

    for c, mo in parallel(P, MT):             # split-K: chunk c of K / P neurons x a tile of mt tokens
        idx, cnt = compaction of the chunk: neurons with |H[m, k]| > t for some token m of the tile
        for no in range(N / nt):
            acc (mt, nt) in registers
            for j in range(cnt):              # the active neurons only
                for mi: hv[mi] = H[m, idx[j]] if |H[m, idx[j]]| > t else 0
                for mi, ni (vectorized):      # a row of WT against mt broadcasts
                    acc[mi, ni] += hv[mi] * WT[idx[j], no·nt + ni]
            S[c, m, no·nt : no·nt + nt] = acc
    for m in parallel(M): Y[m, :] = b + sum_c S[c, m, :]

``mt = 1`` is the per-token gather (each token reads the rows of its own active set); ``mt > 1`` reads the rows of
the union of the tile's active sets once for ``mt`` tokens (the per-token values masked, so the result equals the
per-token gate exactly). Which is faster depends on the shape and on how much the tokens' active sets overlap;
:class:`sparsecc.runtime.gated.GatedLinear` times them. The split of K keeps both cores busy at one token and
makes each core stream a contiguous half of WT.

The gate is ``not (|h| <= t)``, so a NaN activation is kept and propagates, as it does in torch. ``t = 0`` skips only
exact zeros (a ReLU block's natural sparsity): the output equals the dense layer's.

Arguments of the built function: ``H (M, K)``, ``TH (1,)`` the threshold, ``WT (K, N)``, ``B (N,)``, ``Y (M, N)``,
``S (P, MP, N)`` scratch with ``MP = ceil(M / mt) · mt``. ``nt`` must divide ``N``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from sparsecc.codegen.linear import stack_floats
from sparsecc.errors import UnsupportedOpError

__all__ = ["gated_linear"]


def gated_linear(k: int, n: int, *, m_tile: int = 1, n_tile: int = 128, chunks: int = 2):
    """The ``tvm.tirx.PrimFunc`` of the gated linear for static ``K = k`` neurons and ``N = n`` outputs.

    Parameters
    ----------
    k, n : int
        Neurons (rows of WT) and outputs (columns of WT).
    m_tile : int
        Tokens sharing one compaction (1: per-token gather; > 1: the union of the tile's active sets).
    n_tile : int
        Outputs per accumulator tile (a multiple of 16 that divides ``n``; ``m_tile · n_tile / 16`` vector
        registers).
    chunks : int
        Parts of K run in parallel (split-K), summed in the epilogue.

    Raises
    ------
    UnsupportedOpError
        A size that is not positive, or ``n_tile`` not dividing ``n``.
    """
    K, N, mt, nt, P = int(k), int(n), int(m_tile), int(n_tile), int(chunks)  # noqa: N806
    if min(K, N, mt, nt, P) < 1:
        raise UnsupportedOpError(f"gated linear sizes must be positive, got K={K}, N={N}, m_tile={mt}, "
                                 f"n_tile={nt}, chunks={P}")
    if N % nt:
        raise UnsupportedOpError(f"n_tile {nt} does not divide N = {N}")
    NT = N // nt  # noqa: N806

    def active(v, t):  # not (|v| <= t), spelled with isnan: TVM's simplifier rewrites not(a <= b) as a > b
        return T.Or(T.isnan(v), T.abs(v) > t)

    KC = (K + P - 1) // P  # noqa: N806 - neurons per chunk (the last chunk may be shorter)

    @T.prim_func
    def func(h_h: T.handle, t_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle, s_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "sparsecc.kind": "gated",
                     "sparsecc.m_tile": mt, "sparsecc.n_tile": nt, "sparsecc.chunks": P})
        M = T.int32()
        MP = T.int32()
        H = T.match_buffer(h_h, (M, K), "float32")
        TH = T.match_buffer(t_h, (1,), "float32")
        WT = T.match_buffer(w_h, (K, N), "float32")
        B = T.match_buffer(b_h, (N,), "float32")
        Y = T.match_buffer(y_h, (M, N), "float32")
        S = T.match_buffer(s_h, (P, MP, N), "float32")
        for cm in T.parallel(P * (MP // mt)):
            idx = T.decl_buffer((KC,), "int32", scope="local")
            cnt = T.decl_buffer((1,), "int32", scope="local")
            hv = T.decl_buffer((mt,), "float32", data=stack_floats(mt), scope="local")
            vals = T.decl_buffer((KC * mt,), "float32", scope="local")  # the gated values, compacted like idx
            cnt[0] = 0
            for kc in T.serial(KC):  # branch-free compaction: always write, advance when active
                if cm // (MP // mt) * KC + kc < K:
                    idx[cnt[0]] = cm // (MP // mt) * KC + kc
                    for mi in T.unroll(mt):
                        vals[cnt[0] * mt + mi] = T.if_then_else(
                            active(H[T.min(cm % (MP // mt) * mt + mi, M - 1), cm // (MP // mt) * KC + kc], TH[0]),
                            H[T.min(cm % (MP // mt) * mt + mi, M - 1), cm // (MP // mt) * KC + kc], T.float32(0))
                    keep = T.bool(False)
                    for mi in T.unroll(mt):
                        keep = keep or active(H[T.min(cm % (MP // mt) * mt + mi, M - 1), cm // (MP // mt) * KC + kc],
                                              TH[0])
                    cnt[0] = cnt[0] + T.Cast("int32", keep)
            for no in T.serial(NT):
                acc = T.decl_buffer((mt * nt,), "float32", data=stack_floats(mt * nt), scope="local")
                for mi in T.unroll(mt):
                    for ni in T.vectorized(nt):
                        acc[mi * nt + ni] = T.float32(0)
                for j in T.serial(cnt[0]):
                    for mi in T.unroll(mt):
                        hv[mi] = vals[j * mt + mi]
                    for mi in T.unroll(mt):
                        for ni in T.vectorized(nt):
                            acc[mi * nt + ni] = acc[mi * nt + ni] + hv[mi] * WT[idx[j], no * nt + ni]
                for mi in T.unroll(mt):
                    for ni in T.vectorized(nt):
                        S[cm // (MP // mt), cm % (MP // mt) * mt + mi, no * nt + ni] = acc[mi * nt + ni]
        for m in T.parallel(M):
            for ni in T.serial(N):  # LLVM vectorizes these (N need not be a multiple of the vector width)
                Y[m, ni] = B[ni]
            for c in T.serial(P):
                for ni in T.serial(N):
                    Y[m, ni] = Y[m, ni] + S[c, m, ni]

    return func


def expert_up(d: int, k: int, expert_size: int, top_k: int, *, n_tile: int = 64, activation: str | None = "gelu"):
    """The ``tvm.tirx.PrimFunc`` of a MoE-fied up projection: each token computes only its selected experts' neurons.

    ``H[m, j] = act(X[m] · WUT[:, j] + b[j])`` for the neurons ``j`` of the experts ``SEL[m, 0:top_k]`` (expert
    ``e`` owns the contiguous neurons ``e·C .. e·C + C - 1``, ``C = expert_size``), 0 elsewhere; the down
    projection then reads only the nonzero rows (:func:`gated_linear` at threshold 0). MoEfication (Zhang et al.,
    Findings of ACL 2022) groups an FFN's neurons into experts this way.

    Loop structure::

        for m in parallel(M): H[m, :] = 0
        for m, s, ct in parallel(M, top_k, C / nt):   # one tile of nt neurons of one selected expert
            acc (nt) in registers
            for kk in range(d): acc[ni] += X[m, kk] · WUT[kk, SEL[m, s]·C + ct·nt + ni]   (vectorized over ni)
            H[m, ...] = act(acc + b)

    Arguments: ``X (M, d)``, ``SEL (M, top_k) int32``, ``WUT (d, K)``, ``B (K,)``, ``H (M, K)``.

    Raises
    ------
    UnsupportedOpError
        Sizes not positive, ``n_tile`` not dividing ``expert_size`` or ``expert_size`` not dividing ``k``.
    """
    from sparsecc.codegen.linear import _activation

    D, K, C, TK, nt = int(d), int(k), int(expert_size), int(top_k), int(n_tile)  # noqa: N806
    if min(D, K, C, TK, nt) < 1 or C % nt or K % C:
        raise UnsupportedOpError(f"expert up projection: need positive sizes with n_tile | expert_size | K, got "
                                 f"d={D}, K={K}, expert_size={C}, top_k={TK}, n_tile={nt}")
    act = _activation(activation)
    CT = C // nt  # noqa: N806

    @T.prim_func
    def func(x_h: T.handle, s_h: T.handle, w_h: T.handle, b_h: T.handle, h_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "sparsecc.kind": "expert_up"})
        M = T.int32()
        X = T.match_buffer(x_h, (M, D), "float32")
        SEL = T.match_buffer(s_h, (M, TK), "int32")
        WUT = T.match_buffer(w_h, (D, K), "float32")
        B = T.match_buffer(b_h, (K,), "float32")
        H = T.match_buffer(h_h, (M, K), "float32")
        for m in T.parallel(M):
            for j in T.serial(K):
                H[m, j] = T.float32(0)
        for it in T.parallel(M * TK * CT):
            acc = T.decl_buffer((nt,), "float32", data=stack_floats(nt), scope="local")
            for ni in T.vectorized(nt):
                acc[ni] = T.float32(0)
            for kk in T.serial(D):
                for ni in T.vectorized(nt):
                    acc[ni] = acc[ni] + X[it // (TK * CT), kk] * WUT[
                        kk, SEL[it // (TK * CT), it // CT % TK] * C + it % CT * nt + ni]
            for ni in T.vectorized(nt):
                H[it // (TK * CT), SEL[it // (TK * CT), it // CT % TK] * C + it % CT * nt + ni] = act(
                    acc[ni] + B[SEL[it // (TK * CT), it // CT % TK] * C + it % CT * nt + ni])

    return func
