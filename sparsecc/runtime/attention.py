"""Attention as two batched matmuls and a softmax: the form :class:`sparsecc.passes.attention.ChooseAttention`
puts in place of ``aten.scaled_dot_product_attention`` where it measures faster.

torch's CPU ``scaled_dot_product_attention`` runs its flash kernel (blocked online softmax) for float32 with an
additive mask; at BERT sizes (seq 128, head dim 32) the three-op form, whose matmuls are MKL batched GEMMs, was
faster on this host: 2.46 against 2.84 ms per layer at batch 8, 12 heads (one interleaved run).
"""

from __future__ import annotations

import torch

__all__ = ["attention_bmm"]


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
