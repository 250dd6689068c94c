"""Choose each linear's storage format with the target's cost model (analysis pass)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import InvalidSparsityError
from ..formats import BLOCK_SHAPES, NM_PATTERNS, to_format
from ..ir.annotations import annotate, get_annotation
from ..ir.graph import SparseGraph
from ..runtime.timing import measure_ms
from ..tune.cost_model import candidate_key
from .base import Pass, PassContext, PassResult
from .prune import prunable_sites

PATTERN_CHOICES = ("auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4")
#: The N:M patterns a ``pattern`` argument names ("n:m" is 2:4).
NM_PATTERN_NAMES = {"n:m": (2, 4), "2:4": (2, 4), "1:4": (1, 4)}


def example_rows(node: fx.Node) -> int:
    """Rows M of X = prod of all but the last dim of ``node``'s example value (1 if unknown)."""
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    if shape is None:
        return 1
    m = 1
    for d in list(shape)[:-1]:
        if isinstance(d, torch.SymInt):
            hint = getattr(d.node, "hint", None)
            d = hint if hint is not None else 1
        m *= int(d)
    return m


def candidates(pattern: str, shape: tuple, density: float, nm=None) -> list:
    """Candidate ``(format, block)`` pairs allowed by ``pattern`` for a weight (N, K).

    ``nm``: the N:M pattern ``(n, m)`` the weight satisfies (detected), or None;
    N:M candidates are ``("nm", (n, m))`` for it and any denser supported
    pattern, allowed by ``"auto"`` and the N:M pattern names.
    """
    out = [("dense", None)]
    if pattern == "dense" or density >= 1.0:
        return out
    if nm is not None and (pattern == "auto" or pattern in NM_PATTERN_NAMES):
        want = NM_PATTERN_NAMES.get(pattern)
        for p in NM_PATTERNS:
            if p[1] == nm[1] and p[0] >= nm[0] and (want is None or p == want):
                out.append(("nm", p))
    if pattern in NM_PATTERN_NAMES:
        return out
    n, k = shape
    for b in BLOCK_SHAPES:
        if n % b[0] or k % b[1]:
            continue
        if b == (1, 1) and pattern in ("auto", "unstructured"):
            out.append(("csr", b))
        elif b != (1, 1) and pattern in ("auto", "block"):
            out.append(("bsr", b))
    return out


def estimate_candidates(cost, shape: tuple, m: int, nnz: int, density: float, fill_ratio: dict,
                        pattern: str = "auto", nm=None) -> dict:
    """Estimated latency (ms) at ``M = m`` of every calibrated candidate for a weight (N, K).

    Parameters
    ----------
    cost : CostModel
    shape : (N, K)
    m : int
        Rows of X.
    nnz, density : int, float
        Nonzeros of the weight and their fraction.
    fill_ratio : dict (rows, cols) -> float
        Stored values / nnz of each block shape (from :func:`detect_block_shape`).
    pattern : str
        Which candidates are allowed (see :func:`candidates`).
    nm : (n, m), optional
        The N:M pattern the weight satisfies (N:M candidates store N·ceil(K/m)·n values).

    Returns
    -------
    dict candidate key (``"dense"``, ``"csr_1x1"``, ``"bsr_8x1"``, ``"nm_2:4"``) -> ms
    """
    n, k = shape
    est = {}
    for fmt, block in candidates(pattern, (n, k), density, nm):
        if not cost.has(fmt, block):
            continue
        nnzb = 0
        if fmt == "nm":
            nnzb = n * (-(-k // block[1])) * block[0]
        elif fmt != "dense":
            nnzb = int(round(fill_ratio.get(block, 1.0) * nnz / (block[0] * block[1])))
        est[candidate_key(fmt, block)] = cost.estimate_ms(fmt, n, k, m, nnzb, block or (1, 1))
    return est


def parse_key(key: str) -> tuple:
    """``"bsr_8x1"`` -> ``("bsr", (8, 1))``; ``"nm_2:4"`` -> ``("nm", (2, 4))``; ``"dense"`` -> ``("dense", None)``."""
    if key == "dense":
        return "dense", None
    if key.startswith("nm_"):
        return "nm", tuple(int(v) for v in key[3:].split(":"))
    fmt, blk = key.split("_")
    return fmt, tuple(int(v) for v in blk.split("x"))


class ChooseFormat(Pass):
    """Pick dense, CSR or BSR (with block shape) per linear by estimated, then measured, latency.

    For each annotated linear, every candidate allowed by ``pattern`` gets an
    estimate from the target's calibrated cost model at the example M
    (``est_ms``). With ``measure=True`` the best sparse candidate is then built
    and timed against torch dense on the host, and the faster one wins, so a
    layer never runs slower than dense because of a wrong estimate.

    Parameters
    ----------
    pattern : {"auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4"}
        The N:M names allow dense and that N:M format only (for weights that satisfy it).
    measure : bool
        Time the best sparse candidate against torch dense (median of ``repeat`` runs).
    """

    name = "choose_format"
    requires = ("detect_sparsity",)

    def __init__(self, pattern: str = "auto", measure: bool = True, repeat: int = 10):
        if pattern not in PATTERN_CHOICES:
            raise InvalidSparsityError(f"pattern must be one of {PATTERN_CHOICES}, got {pattern!r}")
        self.pattern = pattern
        self.measure = measure
        self.repeat = repeat

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        cost = ctx.target.cost_model()
        for site in prunable_sites(graph):
            ann = get_annotation(site.node)
            if ann is None:
                continue
            w = graph.tensor(site.weight).detach()
            n, k = w.shape
            m = example_rows(site.input)
            x_val = site.input.meta.get("val")
            if x_val is not None and getattr(x_val, "dtype", torch.float32) != torch.float32:
                annotate(site.node, site.name, format="dense", format_block=None, kernel="torch.linear",
                         reason=f"input dtype {x_val.dtype} (sparse kernels are float32)")
                continue
            est = estimate_candidates(cost, (n, k), m, ann.nnz, ann.density, ann.fill_ratio, self.pattern,
                                      getattr(ann, "nm", None))
            best = min(est, key=est.get)
            reason = f"lowest estimate at M={m}"
            if best == "dense" and len(est) > 1:
                reason = f"sparse estimated slower at M={m}"
            elif len(est) == 1:
                reason = "no zeros" if ann.density >= 1.0 else f"pattern={self.pattern!r}"
            measured = dense_ms = None
            if self.measure and best != "dense":
                fmt, block = parse_key(best)
                bias = graph.tensor(site.bias).detach() if site.bias else None
                mod = ctx.target.make_linear(to_format(w, fmt, block), bias)
                x = torch.randn(max(m, 1), k)
                measured = measure_ms(mod, x, repeat=self.repeat)
                dense_ms = measure_ms(lambda t: torch.nn.functional.linear(t, w, bias), x, repeat=self.repeat)
                if measured >= dense_ms:
                    reason = f"measured {best} {measured:.3f} ms ≥ dense {dense_ms:.3f} ms at M={m}"
                    best, measured = "dense", dense_ms
                else:
                    reason = f"measured {dense_ms / measured:.2f}x faster than dense at M={m}"
            if best == "dense":
                annotate(site.node, site.name, est_ms=est, format="dense", format_block=None,
                         kernel="torch.linear", measured_ms=measured, dense_ms=dense_ms, reason=reason)
            else:
                fmt, block = parse_key(best)
                annotate(site.node, site.name, est_ms=est, format=fmt, format_block=block,
                         measured_ms=measured, dense_ms=dense_ms, reason=reason)
        return PassResult(graph, False)

