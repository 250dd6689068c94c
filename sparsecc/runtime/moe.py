"""MoE-fied feed-forward blocks: :class:`MoEFFN`, a router and expert-gather kernels.

A block ``down(act(up(x)))`` whose ``K`` neurons are grouped into ``E`` experts of ``K / E`` neurons (contiguous
after a permutation, so an expert is a block of columns of ``W_upᵀ`` and of rows of ``W_downᵀ``). Per token a
linear router scores the experts, the ``top_k`` best run: the up projection computes only their neurons
(:func:`sparsecc.codegen.gated.expert_up`), the down projection reads only their rows
(:func:`sparsecc.codegen.gated.gated_linear` at threshold 0). MoEfication: Zhang et al., "MoEfication:
Transformer Feed-forward Layers are Mixtures of Experts", Findings of ACL 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsecc.cache import KERNELS
from sparsecc.errors import InvalidArgumentError, UnsupportedOpError
from sparsecc.runtime.gated import GatedLinear
from sparsecc.runtime.ieee import all_finite, torch_activation
from sparsecc.runtime.kernels import aligned, load_or_build, output_buffer, rows_of, target_key
from sparsecc.targets import x86

__all__ = ["MoEFFN", "export_moe", "get_expert_up_kernel"]


def get_expert_up_kernel(d: int, k: int, expert_size: int, top_k: int, n_tile: int, activation, target=None):
    """The compiled expert up-projection kernel (packed function); arguments as
    :func:`sparsecc.codegen.gated.expert_up` lists."""
    import tvm

    from sparsecc.codegen.gated import expert_up

    target = target or x86.host_target()
    key = ("expert_up", d, k, expert_size, top_k, n_tile, activation, target_key(target))

    def make():
        mod = tvm.IRModule({"main": expert_up(d, k, expert_size, top_k, n_tile=n_tile, activation=activation)})
        return load_or_build(mod, f"expert_up_{d}x{k}_c{expert_size}_k{top_k}_n{n_tile}_{activation}", target)

    return KERNELS.get(key, make)


def _tile_for(c: int) -> int:
    for nt in (128, 96, 64, 48, 32, 16, 8, 4, 2, 1):
        if c % nt == 0:
            return nt
    return 1


class MoEFFN(torch.nn.Module):
    """``down(act(up(x)))`` run as a mixture of experts: only the ``top_k`` experts a router picks per token.

    Parameters
    ----------
    up_weight : Tensor (K, d)
    up_bias : Tensor (K,) or None
    down_weight : Tensor (N, K)
    down_bias : Tensor (N,) or None
    activation : {"gelu", "relu"}
    perm : LongTensor (K,)
        Neuron order: expert ``e`` owns neurons ``perm[e·C : (e+1)·C]`` of the original block.
    experts : int
        ``E``; must divide ``K``.
    top_k : int
        Experts run per token, ``1 <= top_k <= E``.
    router_weight : Tensor (E, d), router_bias : Tensor (E,)
        The router's scores ``x · Rᵀ + r``.
    name : str

    Raises
    ------
    InvalidArgumentError
        Shapes that do not fit, ``E`` not dividing ``K``, ``top_k`` outside ``[1, E]``.
    UnsupportedOpError
        An activation without a kernel epilogue.
    """

    layer_kind = "linear"
    format = "moe"

    def __init__(self, up_weight, up_bias, down_weight, down_bias, activation, perm, experts: int, top_k: int,
                 router_weight, router_bias, name: str = "", target=None):
        super().__init__()
        k, d = up_weight.shape
        n = down_weight.shape[0]
        if down_weight.shape[1] != k or perm.shape != (k,) or experts < 1 or k % experts:
            raise InvalidArgumentError(f"block {name!r}: {experts} experts do not split {k} neurons evenly, or the "
                                       f"weights do not fit ({tuple(up_weight.shape)}, {tuple(down_weight.shape)})")
        if not 1 <= top_k <= experts:
            raise InvalidArgumentError(f"block {name!r}: top_k must be in [1, {experts}], got {top_k}")
        if activation not in ("gelu", "relu"):
            raise UnsupportedOpError(f"block {name!r}: MoE-fication supports GELU and ReLU blocks, not {activation!r}")
        self.name, self.activation = name, activation
        self.experts, self.top_k, self.expert_size = int(experts), int(top_k), k // experts
        self.shape = (int(n), int(d))
        perm = perm.long()
        self.register_buffer("perm", perm)
        self.register_buffer("up_weight_t", aligned(up_weight.detach()[perm].t().contiguous()))
        ub = up_bias.detach()[perm] if up_bias is not None else torch.zeros(k)
        self.register_buffer("up_bias", aligned(ub.contiguous().float()))
        self.register_buffer("router_weight", router_weight.detach().float().contiguous())
        self.register_buffer("router_bias", router_bias.detach().float().contiguous())
        self.down = GatedLinear(down_weight.detach()[:, perm], down_bias, [0.0], name=name, target=target)
        self.target = target or x86.host_target()
        self.n_tile = _tile_for(self.expert_size)
        self._fn = None

    def route(self, x2: torch.Tensor) -> torch.Tensor:
        """``SEL (M, top_k) int32``: the experts of every token, best first."""
        scores = F.linear(x2, self.router_weight, self.router_bias)
        return scores.topk(self.top_k, dim=1).indices.to(torch.int32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = self.shape
        lead, x2 = rows_of(x, d)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(lead + (n,))
        if not all_finite(x2):
            return self.torch_forward(x2).view(lead + (n,))
        if self._fn is None:
            k = self.up_weight_t.shape[1]
            self._fn = get_expert_up_kernel(d, k, self.expert_size, self.top_k, self.n_tile, self.activation,
                                            self.target)
        sel = self.route(x2)
        h = output_buffer(m, self.up_weight_t.shape[1])
        self._fn(aligned(x2), sel, self.up_weight_t, self.up_bias, h)
        return self.down(h).view(lead + (n,))

    def expert_mask(self, x2: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` bool, in the permuted neuron order: the neurons each token computes."""
        sel = self.route(x2).long()
        mask = torch.zeros(x2.shape[0], self.experts, dtype=torch.bool)
        mask.scatter_(1, sel, True)
        return mask.repeat_interleave(self.expert_size, dim=1)

    def torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's MoE product for ``x2: (M, d)`` (the path of inputs holding NaN or inf)."""
        h = torch_activation(F.linear(x2, self.up_weight_t.t(), self.up_bias), self.activation)
        h = torch.where(self.expert_mask(x2), h, torch.zeros((), dtype=h.dtype))
        return self.down.torch_forward(h)

    def dense_weight(self) -> torch.Tensor:
        return self.down.dense_weight()

    @property
    def kernel_name(self) -> str:
        return f"moe_e{self.experts}_k{self.top_k}"

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.top_k}, neurons={self.up_weight_t.shape[1]}, out={self.shape[0]}"


def export_moe(ctx, bb, x, mod: MoEFFN):
    """Relax for one :class:`MoEFFN`: router matmul and top-k, the expert up-projection kernel, the gated down
    projection at threshold 0; ``X (..., d)`` -> ``Y (..., N)``.

    Raises
    ------
    UnsupportedOpError
        A non-finite weight (the artifact has no torch path to fall back on).
    """
    import tvm
    from tvm import relax

    from sparsecc.codegen.gated import expert_up
    from sparsecc.runtime.export import rows_for_export
    from sparsecc.runtime.gated import export_gated_linear

    n, d = mod.shape
    k = mod.up_weight_t.shape[1]
    lead, m = rows_for_export(x)
    if not (bool(torch.isfinite(mod.up_weight_t).all()) and mod.down.finite_weight):
        raise UnsupportedOpError(f"block {mod.name!r}: a MoE block with NaN or inf weights cannot be exported")
    x2 = bb.emit(relax.op.reshape(x, (m, d)))
    scores = bb.emit(relax.op.add(relax.op.matmul(x2, ctx.const(mod.router_weight.t().contiguous())),
                                  ctx.const(mod.router_bias)))
    sel = bb.emit(relax.op.topk(scores, k=mod.top_k, axis=1, ret_type="indices", largest=True, dtype="int32"))
    func = tvm.IRModule({"main": expert_up(d, k, mod.expert_size, mod.top_k, n_tile=mod.n_tile,
                                           activation=mod.activation)})
    gv = ctx.gvar(bb, f"sparsecc_expert_up_{d}x{k}_c{mod.expert_size}_k{mod.top_k}_n{mod.n_tile}_{mod.activation}",
                  func)
    h = bb.emit(relax.call_tir(gv, [x2, sel, ctx.const(mod.up_weight_t), ctx.const(mod.up_bias)],
                               relax.TensorType((m, k), "float32")))
    y = export_gated_linear(ctx, bb, h, ctx.const(torch.zeros(1)), mod.down)
    return bb.emit(relax.op.reshape(y, (*lead, n)))
