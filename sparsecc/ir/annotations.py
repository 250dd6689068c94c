"""Per-node sparsity annotations stored under ``node.meta["sparsecc"]``.

Analysis passes only write this namespace; rewrite passes read it to decide
what to change. The annotation is a plain dataclass so it prints, compares and
copies like data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from sparsecc.formats import Candidate

META_KEY = "sparsecc"
#: node.meta key of the activation-routing passes (``sparsecc.passes.routing``)
ROUTING_META_KEY = "sparsecc.routing"

#: Patterns a layer can be classified or pruned as.
PATTERNS = ("dense", "unstructured", "block", "n:m")


@dataclass
class LayerAnnotation:
    """What the passes know about one prunable layer.

    Attributes
    ----------
    name : str
        Fully qualified layer name in the user's model (``encoder.layer.0.output.dense``).
    kind : str
        Operator kind, ``"linear"``.
    weight_shape : tuple of int
        ``(N, K)`` = ``(C_out, C_in)``.
    density : float, optional
        Fraction of nonzero weights (``nnz / (N * K)``); sparsity is ``1 - density``.
    nnz : int, optional
        Number of nonzero weights.
    pattern : str, optional
        Detected pattern: ``"dense"``, ``"unstructured"``, ``"block"`` or ``"n:m"``
        (at most n nonzeros in every m consecutive columns, see ``nm``).
    block_shape : tuple of int, optional
        Block shape ``(rows, cols)`` that covers the nonzeros with least fill-in
        (``(1, 1)`` for unstructured).
    fill_ratio : dict
        For each candidate block shape, stored values (nonzero blocks x block
        area) divided by nnz; 1.0 means no fill-in.
    format : str, optional
        Name of the chosen format in the registry (``"dense"``, ``"csr"``, ``"bsr"``, ``"nm"``).
    format_params : tuple of int, optional
        Parameters of the chosen format: block shape (rows, cols) for CSR/BSR, (n, m) for N:M.
    kernel : str, optional
        Name of the kernel that runs the layer (``"torch.linear"`` when dense).
    est_ms : dict
        Estimated latency in ms of every candidate at the example M, keyed by :attr:`Candidate.key`.
    measured_ms : float, optional
        Median measured latency of the chosen kernel at the example M, in ms.
    dense_ms : float, optional
        Median measured latency of torch dense at the example M, in ms.
    epilogue : str, optional
        Elementwise op fused into the kernel (``"gelu"``, ``"relu"``).
    reason : str
        Why the layer got its format (for the report).
    """

    name: str
    kind: str = "linear"
    weight_shape: tuple = ()
    density: Optional[float] = None
    nnz: Optional[int] = None
    pattern: Optional[str] = None
    block_shape: Optional[tuple] = None
    fill_ratio: dict = field(default_factory=dict)
    format: Optional[str] = None
    format_params: Optional[tuple] = None
    kernel: Optional[str] = None
    est_ms: dict = field(default_factory=dict)
    measured_ms: Optional[float] = None
    dense_ms: Optional[float] = None
    epilogue: Optional[str] = None
    reason: str = ""
    nm: Optional[tuple] = None  # (n, m) of the sparsest N:M pattern the weight satisfies, if any

    @property
    def candidate(self) -> Optional[Candidate]:
        """The chosen format with its parameters (None before a format is chosen)."""
        if self.format is None:
            return None
        return Candidate(self.format, self.format_params or ())

    @property
    def sparsity(self) -> Optional[float]:
        """``1 - density``, or None before detection."""
        return None if self.density is None else 1.0 - self.density


def get_annotation(node: fx.Node) -> Optional[LayerAnnotation]:
    """Return the sparsecc annotation of ``node`` or None."""
    return node.meta.get(META_KEY)


def annotate(node: fx.Node, name: str, **fields) -> LayerAnnotation:
    """Create or update the sparsecc annotation of ``node``.

    Parameters
    ----------
    node : torch.fx.Node
        Node to annotate.
    name : str
        Layer name (used only when the annotation is created).
    **fields
        Attributes of :class:`LayerAnnotation` to set.
    """
    ann = node.meta.get(META_KEY)
    if ann is None:
        ann = LayerAnnotation(name=name)
        node.meta[META_KEY] = ann
    for key, value in fields.items():
        if not hasattr(ann, key):
            raise AttributeError(f"LayerAnnotation has no field {key!r}")
        setattr(ann, key, value)
    return ann
