"""Choose the attention implementation per call site by measurement (rewrite pass)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import SparseGraph
from ..ir.rewrite import val_shape
from ..runtime.attention import attention_bmm, attention_fused, fused_supported
from ..runtime.timing import interleaved_ms
from .base import Pass, PassContext, PassResult

__all__ = ["ChooseAttention"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _mask_ok(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is not None and getattr(val, "dtype", None) in (torch.float32, torch.bool)


class ChooseAttention(Pass):
    """Replace ``aten.scaled_dot_product_attention`` by the fastest form timed at the call's example shapes on
    this host: torch's op, :func:`sparsecc.runtime.attention.attention_bmm` (two batched matmuls and a softmax)
    or, on an x86 target, :func:`sparsecc.runtime.attention.attention_fused` (a fused TVM kernel). A form
    replaces torch's op only when it is faster by ``margin``.

    Only calls without dropout, without ``is_causal``, with a float32 additive or a boolean mask (or none), on
    a target that runs on this host's CPU; everything else keeps torch's op. Each distinct shape
    is timed once (interleaved medians of the forms).

    Measured on MiniLM's attention (12 heads, seq 128, head dim 32, boolean mask; 2 threads, Zen 4,
    ``python benchmarks/kernel_speed.py --section attention``): the fused kernel 0.80 of torch's op at batch 8,
    0.97 at batch 1; the two-matmul form 2.3-3.8x torch's op there.
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
                verdict[key] = self._best(shapes, mask_dtype, node.kwargs.get("scale"), ctx)
            form = verdict[key]
            if form is SDPA:
                continue
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(form, (q, k, v, mask), {"scale": node.kwargs.get("scale")})
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        return PassResult(graph, changed)

    def _best(self, shapes, mask_dtype, scale, ctx):
        """The fastest form at these shapes: ``SDPA`` (torch's op), ``attention_bmm`` or ``attention_fused``."""
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(s, generator=g) for s in shapes[:3])
        mask = torch.ones(shapes[3], dtype=mask_dtype) if mask_dtype == torch.bool else (
            torch.zeros(shapes[3]) if mask_dtype is not None else None)
        forms = {SDPA: lambda: SDPA(q, k, v, mask, scale=scale), attention_bmm: lambda: attention_bmm(q, k, v, mask, scale=scale)}
        if getattr(ctx.target, "name", None) == "x86":
            from ..targets.x86 import host_vector_file

            if fused_supported(tuple(q.shape), tuple(k.shape), host_vector_file()[0]):
                forms[attention_fused] = lambda: attention_fused(q, k, v, mask, scale=scale)  # builds the kernel
        t = interleaved_ms(forms, runs=self.repeat, warmup=2)  # the forms see the same machine load
        best = min(t, key=t.get)
        return best if best is SDPA or t[best] < self.margin * t[SDPA] else SDPA
