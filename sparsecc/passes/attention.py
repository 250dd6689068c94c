"""Choose the attention implementation per call site by measurement (rewrite pass)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import SparseGraph
from ..ir.rewrite import val_shape
from ..runtime.attention import attention_bmm
from ..runtime.timing import measure_ms
from .base import Pass, PassContext, PassResult

__all__ = ["ChooseAttention"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _mask_ok(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is not None and getattr(val, "dtype", None) in (torch.float32, torch.bool)


class ChooseAttention(Pass):
    """Replace ``aten.scaled_dot_product_attention`` by :func:`sparsecc.runtime.attention.attention_bmm` where,
    timed at the call's example shapes on this host, the two-matmul form is faster (by ``margin``).

    Only calls without dropout, without ``is_causal``, with a float32 additive or a boolean mask (or none), on
    a target that runs on this host's CPU; everything else keeps torch's op. Each distinct shape
    is timed once (interleaved medians of both forms).
    """

    name = "choose_attention"
    requires = ()

    def __init__(self, margin: float = 0.95, repeat: int = 15):
        self.margin, self.repeat = margin, repeat

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        if getattr(ctx.target, "torch_device", "cpu") != "cpu" or not getattr(ctx.target, "can_time_kernels", False):
            return PassResult(graph, False)
        gm = graph.gm
        verdict: dict = {}
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not SDPA:
                continue
            args = list(node.args) + [None] * (6 - len(node.args))
            q, k, v, mask, dropout, causal = args[:6]
            dropout = node.kwargs.get("dropout_p", dropout) or 0.0
            causal = node.kwargs.get("is_causal", causal) or False
            mask = node.kwargs.get("attn_mask", mask)
            if dropout or causal or node.kwargs.get("enable_gqa") or (mask is not None and not _mask_ok(mask)):
                continue
            shapes = [val_shape(t) for t in (q, k, v)] + [val_shape(mask) if mask is not None else None]
            if any(s is None for s in shapes[:3]) or len(shapes[0]) != 4 or (mask is not None and shapes[3] is None):
                continue
            if any(getattr(t.meta.get("val"), "dtype", None) != torch.float32 for t in (q, k, v)
                   if isinstance(t, fx.Node)):
                continue
            mask_dtype = mask.meta["val"].dtype if mask is not None else None
            key = (tuple(shapes), mask_dtype, node.kwargs.get("scale"))
            if key not in verdict:
                verdict[key] = self._faster(shapes, mask_dtype, node.kwargs.get("scale"))
            if not verdict[key]:
                continue
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(attention_bmm, (q, k, v, mask), {"scale": node.kwargs.get("scale")})
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        return PassResult(graph, changed)

    def _faster(self, shapes, mask_dtype, scale) -> bool:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(s, generator=g) for s in shapes[:3])
        mask = torch.ones(shapes[3], dtype=mask_dtype) if mask_dtype == torch.bool else (
            torch.zeros(shapes[3]) if mask_dtype is not None else None)

        def ref():
            return torch.ops.aten.scaled_dot_product_attention(q, k, v, mask, scale=scale)

        def ours():
            return attention_bmm(q, k, v, mask, scale=scale)

        with torch.no_grad():
            t_ref, t_ours = [], []
            for _ in range(3):  # interleaved: the two forms see the same machine load
                t_ref.append(measure_ms(ref, repeat=self.repeat // 3 or 1))
                t_ours.append(measure_ms(ours, repeat=self.repeat // 3 or 1))
        return sorted(t_ours)[1] < self.margin * sorted(t_ref)[1]
