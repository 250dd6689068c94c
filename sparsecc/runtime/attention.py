"""The forms :class:`sparsecc.passes.attention.ChooseAttention` puts in place of
``aten.scaled_dot_product_attention`` where they measure faster: two batched matmuls and a softmax
(:func:`attention_bmm`), and a fused TVM kernel (:func:`attention_fused`, :mod:`sparsecc.codegen.attention`).

torch's CPU ``scaled_dot_product_attention`` runs its flash kernel (blocked online softmax) for float32 with an
additive mask; at BERT sizes (seq 128, head dim 32) the three-op form, whose matmuls are MKL batched GEMMs, was
faster on this host: 2.46 against 2.84 ms per layer at batch 8, 12 heads (one interleaved run).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["attention_bmm", "attention_fused", "fused_supported"]


def _tracing(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced (fake or functional tensors of torch.export / torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return torch.compiler.is_compiling() or isinstance(t, FakeTensor) or torch._is_functional_tensor(t)


def attention_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + attn_mask) v``, the math of ``F.scaled_dot_product_attention`` without dropout.

    Parameters
    ----------
    q : Tensor (B, H, S, D)
    k, v : Tensor (B, H, L, D)
    attn_mask : Tensor broadcastable to (B, H, S, L), optional
        Float: added to the scores; bool: True where a query attends to a key (as torch).
    scale : float, optional
        Default ``1 / sqrt(D)``, as torch.

    Returns
    -------
    Tensor (B, H, S, D)

    With a NaN or infinite value in q, k, v (or a NaN in a float mask) torch's own op runs instead, so that
    non-finite inputs give exactly torch's result (its fused CPU kernel differs from the plain math there);
    so it does under tracing (an exported graph holds torch's op).
    """
    if _tracing(q):  # torch.export / torch.compile of a compiled graph (sparsecc's export): torch's op
        return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale)
    finite = all(bool(torch.isfinite(t).all()) for t in (q, k, v))
    if not finite or (attn_mask is not None and attn_mask.dtype != torch.bool and bool(torch.isnan(attn_mask).any())):
        # NaN or inf in: torch's fused kernel has its own answers (a NaN query row gives zeros): return them
        return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill_(attn_mask.logical_not(), float("-inf"))
    elif attn_mask is not None:
        scores = scores.add_(attn_mask) if attn_mask.shape == scores.shape else scores + attn_mask
    # torch's softmax of attention: a row with every key masked gives zeros, not NaN (as F.scaled_dot_product_attention)
    return torch.matmul(torch.ops.aten._safe_softmax(scores, -1), v)


def _fused_mask(attn_mask: torch.Tensor | None, b: int, s: int, l_: int):
    """``(kind, batched, (MB, S, L) tensor for the kernel)`` of a mask broadcastable to (B, 1, S, L); None for a
    mask the kernel does not take (one per head, or another shape)."""
    if attn_mask is None:
        return None, False, torch.zeros(1, 1, 1)
    m = attn_mask
    if m.dim() > 4 or m.dtype not in (torch.bool, torch.float32):
        return None
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    if m.shape[1] != 1 or m.shape[0] not in (1, b) or m.shape[2] not in (1, s) or m.shape[3] not in (1, l_):
        return None
    m = m[:, 0].expand(m.shape[0], s, l_).contiguous()
    return ("bool" if m.dtype == torch.bool else "float"), m.shape[0] > 1 or b == 1, (
        m.view(torch.uint8) if m.dtype == torch.bool else m)


def _q_block(d: int) -> int:
    """Queries per register tile of the fused kernel: 8, fewer where 8 x D accumulators would not fit in 16 zmm."""
    return max(1, min(8, 256 // d))


@functools.lru_cache(maxsize=64)
def _fused_kernel(s: int, l_: int, h: int, d: int, scale: float, kind, batched: bool):
    """The built fused kernel for these static sizes (in memory, then the disk cache, else built now); memoized,
    since the cache key's target string alone costs ~10 us, 3% of a batch-1 MiniLM attention call."""
    from sparsecc.cache import KERNELS
    from sparsecc.codegen.attention import fused_attention
    from sparsecc.runtime.kernels import load_or_build, target_key
    from sparsecc.targets import x86

    import tvm

    target = x86.host_target()
    lanes = x86.host_vector_file()[0]
    qb = _q_block(d)
    key = ("attention", s, l_, h, d, float(scale), kind, batched, lanes, qb, target_key(target))

    def make():
        func = fused_attention(s, l_, h, d, scale=scale, mask=kind, mask_batched=batched, lanes=lanes, q_block=qb)
        return load_or_build(tvm.IRModule({"main": func}), f"attention_s{s}_l{l_}_h{h}_d{d}_{kind or 'nomask'}",
                             target)

    return KERNELS.get(key, make)


#: Largest ``(D + q_block) x L`` float32 tile of one head the fused kernel keeps on a thread's stack (128 KiB).
MAX_STACK_FLOATS = 32768


def fused_supported(shape_q: tuple, shape_k: tuple, lanes: int) -> bool:
    """Whether :func:`attention_fused` runs its kernel for q: ``(B, H, S, D)``, k: ``(B, H, L, D)`` on a CPU with
    ``lanes`` float32 lanes: ``D`` a multiple of ``lanes``, the head's Kᵀ and score rows within
    :data:`MAX_STACK_FLOATS`."""
    if len(shape_q) != 4 or len(shape_k) != 4:
        return False
    b, h, s, d = shape_q
    l_ = shape_k[2]
    if min(b, h, s, d, l_) < 1 or d % lanes or tuple(shape_k[:2]) != (b, h) or shape_k[3] != d:
        return False
    lp = -(-l_ // lanes) * lanes
    return (d + _q_block(d)) * lp <= MAX_STACK_FLOATS


def attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale)`` (no dropout, not causal) by the fused
    TVM kernel of :mod:`sparsecc.codegen.attention`, one kernel per (S, L, H, D, scale, mask kind), built on first
    use and cached on disk.

    Parameters
    ----------
    q : Tensor (B, H, S, D)
    k, v : Tensor (B, H, L, D)
    attn_mask : Tensor broadcastable to (B, 1, S, L), optional
        Float: added to the scores; bool: True where a query attends to a key.
    scale : float, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor (B, H, S, D), a view of a ``(B, S, H, D)`` buffer (the layout the output projection reads).

    torch's op runs instead under tracing, for inputs the kernel does not take (not float32 on the CPU, a head
    dim that is not a multiple of the vector width, a mask per head, sequences too long for its stack tiles),
    for non-finite q, k, v or a float mask with a NaN or +inf, and when the kernel's output is not finite (a
    score that overflowed): the result is torch's wherever the kernel could differ from it.
    """
    from sparsecc.runtime.ieee import all_finite
    from sparsecc.targets import x86

    def torch_op():
        return torch.ops.aten.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale)

    if _tracing(q) or any(t.dtype != torch.float32 or not t.is_cpu for t in (q, k, v)) or v.shape != k.shape:
        return torch_op()
    if not fused_supported(tuple(q.shape), tuple(k.shape), x86.host_vector_file()[0]):
        return torch_op()
    b, h, s, d = q.shape
    l_ = k.shape[2]
    mask = _fused_mask(attn_mask, b, s, l_)
    if mask is None or not all(all_finite(t) for t in (q, k, v)):
        return torch_op()
    kind, batched, m = mask
    if kind == "float" and (bool(torch.isnan(m).any()) or bool(torch.isposinf(m).any())):
        return torch_op()
    scale_v = d ** -0.5 if scale is None else float(scale)
    fn = _fused_kernel(s, l_, h, d, scale_v, kind, batched)
    out = torch.empty(b, s, h, d)
    fn(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), m, out)
    if not all_finite(out):
        return torch_op()
    return out.transpose(1, 2)
