"""N:M storage (at most n nonzeros in every m consecutive weights along K) and its registry entry.

Source: N:M structured sparsity as in Mishra et al., "Accelerating Sparse Deep
Neural Networks" (NVIDIA, 2021). The kernels are :mod:`sparsecc.codegen.nm`
(x86 rules :mod:`sparsecc.targets.x86_nm`), the runtime module
:class:`sparsecc.runtime.nm.NMLinear`, which registers itself and its export
converter on :data:`NM`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecc.errors import InvalidSparsityError
from sparsecc.formats.base import NM_PATTERN_NAMES, Candidate, Format, M, StorageStats, register_format

__all__ = ["NM", "NM_PATTERNS", "NMFormat", "NMSparseMatrix", "is_nm_sparse", "nm_keep"]

#: N:M patterns (n, m) the kernel layer supports.
NM_PATTERNS: tuple[tuple[int, int], ...] = ((2, 4), (1, 4))


def _nm_meta_dtype(n: int, m: int) -> tuple[int, torch.dtype]:
    """Bits per packed position and the smallest integer dtype holding ``n`` of them."""
    bits = max(1, (m - 1).bit_length())
    total = n * bits
    if total <= 8:
        return bits, torch.uint8
    if total <= 15:
        return bits, torch.int16
    if total <= 31:
        return bits, torch.int32
    raise InvalidSparsityError(f"N:M pattern {n}:{m} needs {total} bits of positions per group; at most 31 fit")


def _check_nm(n, m) -> tuple[int, int]:
    try:
        n, m = int(n), int(m)
    except (TypeError, ValueError):
        raise InvalidSparsityError(f"N:M pattern needs integers n and m, got {n!r}:{m!r}") from None
    if not (0 < n < m):
        raise InvalidSparsityError(f"N:M pattern needs 0 < n < m, got {n}:{m}")
    return n, m


@dataclass
class NMSparseMatrix(StorageStats):
    """W: (N, K) with at most ``n`` nonzeros in every group of ``m`` consecutive columns (N:M along K).

    K is padded with zero columns to ``Kp = G·m`` (``G = ceil(K / m)`` groups),
    so a K that ``m`` does not divide is stored too. Every group stores exactly
    ``n`` slots (a group with fewer nonzeros stores zeros), so the structure is
    static: no index pointers, every row holds ``G·n`` values.

    Attributes
    ----------
    shape : (N, K)
    n, m : int
    values : Tensor (N, G·n) float32
        ``values[r, g·n + s]`` is the weight in slot ``s`` of group ``g`` of row ``r``.
    meta : Tensor (N, G) uint8 (int16/int32 for patterns needing more bits)
        Packed positions inside the group: slot ``s`` of group ``g`` sits at
        column ``g·m + ((meta[r, g] >> (s·b)) & (2^b - 1))`` with ``b = ceil(log2 m)``
        bits (2 for M=4). Positions inside a group are distinct and increasing
        with ``s``, and always name a column < Kp.

    Why this packing: one byte per group (for 2:4: 4 of its 8 bits used,
    0.5 byte per stored value against 4 for an int32 column index) keeps the
    metadata at 1/8 of the values' bytes, which matters where the kernel is
    bandwidth-bound (M = 1); a whole byte per group (not NVIDIA's 2-bit stream
    across groups) keeps every group's metadata one aligned byte load and one
    shift/mask per slot in the kernel.
    """

    value_field = "values"
    array_fields = ("values", "meta")

    shape: tuple[int, int]
    n: int
    m: int
    values: torch.Tensor
    meta: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.n, self.m = _check_nm(self.n, self.m)
        rows, k = self.shape
        g = self.groups
        if tuple(self.values.shape) != (rows, g * self.n):
            raise InvalidSparsityError(
                f"values must have shape (N, G*n) = ({rows}, {g * self.n}), got {tuple(self.values.shape)}")
        if tuple(self.meta.shape) != (rows, g):
            raise InvalidSparsityError(f"meta must have shape (N, G) = ({rows}, {g}), got {tuple(self.meta.shape)}")

    @property
    def groups(self) -> int:
        """G = ceil(K / m)."""
        return -(-self.shape[1] // self.m)

    @property
    def bits(self) -> int:
        """Bits per packed position (ceil(log2 m))."""
        return _nm_meta_dtype(self.n, self.m)[0]

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int = 2, m: int = 4) -> "NMSparseMatrix":
        """Store ``weight`` (N, K) as N:M.

        Raises
        ------
        InvalidSparsityError
            ``weight`` is not 2-d, or a group of ``m`` columns holds more than
            ``n`` nonzeros (the message names the first such row and columns
            and how many groups are over).
        """
        if not isinstance(weight, torch.Tensor):
            raise InvalidSparsityError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise InvalidSparsityError(f"expected a 2-d weight (N, K), got shape {tuple(weight.shape)}")
        n, m = _check_nm(n, m)
        bits, mdtype = _nm_meta_dtype(n, m)
        rows, k = weight.shape
        g = -(-k // m)
        w = weight.detach().to(device="cpu", dtype=torch.float32)
        wp = torch.zeros(rows, g * m, dtype=torch.float32)
        wp[:, :k] = w
        groups = wp.reshape(rows, g, m)
        nz = groups != 0
        counts = nz.sum(dim=2)
        over = counts > n
        if bool(over.any()):
            r, gi = (int(v) for v in over.nonzero()[0])
            raise InvalidSparsityError(
                f"weight of shape {(rows, k)} is not {n}:{m} sparse: row {r}, columns {gi * m}..{min(gi * m + m, k) - 1} "
                f"hold {int(counts[r, gi])} nonzeros (at most {n} allowed); {int(over.sum())} of {rows * g} groups "
                "are over")
        # Slots: the n positions ranked (nonzero first, then real column before padding, then lowest index),
        # sorted by position. Zero slots take distinct unused positions so that to_dense can scatter.
        pos = torch.arange(m)
        real = (torch.arange(g).unsqueeze(1) * m + pos) < k  # (G, m)
        key = nz.to(torch.int64) * (4 * m) + real.to(torch.int64) * (2 * m) + (m - 1 - pos)
        slots = torch.topk(key, n, dim=2).indices.sort(dim=2).values  # (N, G, n)
        values = torch.gather(groups, 2, slots).reshape(rows, g * n).contiguous()
        shifts = (torch.arange(n) * bits).to(torch.int64)
        meta = (slots.to(torch.int64) << shifts).sum(dim=2).to(mdtype).contiguous()
        return cls(shape=(rows, k), n=n, m=m, values=values, meta=meta)

    def positions(self) -> torch.Tensor:
        """Unpacked positions inside the group: int64 (N, G, n)."""
        shifts = (torch.arange(self.n) * self.bits).to(torch.int64)
        return (self.meta.to(torch.int64).unsqueeze(2) >> shifts) & ((1 << self.bits) - 1)

    def columns(self) -> torch.Tensor:
        """Column of every stored value in the padded weight: int64 (N, G·n), each < G·m."""
        rows = self.shape[0]
        base = (torch.arange(self.groups) * self.m).view(1, -1, 1)
        return (self.positions() + base).reshape(rows, -1)

    def to_dense(self) -> torch.Tensor:
        rows, k = self.shape
        out = torch.zeros(rows, self.groups * self.m, dtype=self.values.dtype)
        out.scatter_(1, self.columns(), self.values)
        return out[:, :k].contiguous()

    # -- statistics ---------------------------------------------------------
    @property
    def nnz(self) -> int:
        """Stored values (N·G·n), zero slots included."""
        return int(self.values.numel())

    @property
    def format(self) -> str:
        return "nm"

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def __repr__(self) -> str:
        return (f"NMSparseMatrix(shape={self.shape}, pattern={self.pattern!r}, groups={self.groups}, "
                f"density={self.density:.4f})")


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scoring of every M consecutive elements along K. score: (C_out, K), K % M == 0.

    Magnitude N:M pruning (Mishra et al. 2021) with ``score = |w|``; ``sparsecc.sparsify`` uses it with any score.
    """
    rows, k = score.shape
    g = score.reshape(rows, k // m, m)
    idx = torch.topk(g, n, dim=2).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, k)


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive columns of ``weight`` (N, K) holds at most ``n`` nonzeros."""
    rows, k = weight.shape
    g = -(-k // m)
    nz = torch.zeros(rows, g * m, dtype=torch.bool)
    nz[:, :k] = weight.detach().cpu() != 0
    return bool((nz.reshape(rows, g, m).sum(dim=2) <= n).all())


class NMFormat(Format):
    """N:M along K: values (N, G·n) plus packed positions; every group stores exactly n slots."""

    name = "nm"
    storage = NMSparseMatrix
    patterns = ("auto",) + tuple(NM_PATTERN_NAMES)

    def key(self, params):
        return "nm_%d:%d" % tuple(params)

    def label(self, params):
        return "nm %d:%d" % tuple(params)

    def candidates(self, shape, pattern, *, nm=None, column_group=None):
        """``nm`` (the detected pattern) and every denser supported pattern with the same m;
        an N:M pattern name allows only its own pattern."""
        if nm is None or pattern not in self.patterns:
            return []
        want = NM_PATTERN_NAMES.get(pattern)
        return [Candidate("nm", p) for p in NM_PATTERNS
                if p[1] == nm[1] and p[0] >= nm[0] and (want is None or p == want)]

    def stored(self, params, shape, nnz, fill_ratio):
        n, k = shape
        return n * (-(-k // params[1])) * params[0]

    def units_of(self, matrix) -> int:
        return matrix.nnz

    def flops(self, params, n, k, stored):
        return 2 * M * stored

    def bytes(self, params, n, k, stored):
        # fp32 value + int16 column per slot; X^T tiles written and read once more
        return 6 * stored + 4 * M * k + 4 * M * n + 8 * M * k

    def calibration_weight(self, params, n, k, density, seed=0):
        """Exactly ``n`` nonzeros in every group of ``m`` columns (K % m == 0); ``density`` is n/m."""
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        return w * nm_keep(w.abs(), params[0], params[1])

    def calibration_candidates(self):
        return [Candidate("nm", p) for p in NM_PATTERNS]


NM = register_format(NMFormat())
