"""Sparse storage formats for linear weights (pure torch; no TVM import).

A weight ``W`` of shape ``(N, K)`` (torch ``nn.Linear`` layout) is stored in
block compressed sparse row form (BSR) with a block of ``br`` rows by ``bc``
columns.  CSR is the special case ``block == (1, 1)``.  All conversions are
vectorized torch operations: converting every weight of a MiniLM-sized model
takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsecc.errors import InvalidSparsityError

__all__ = [
    "BLOCK_SHAPES",
    "BlockSparseMatrix",
    "NM_PATTERNS",
    "NMSparseMatrix",
    "block_fill_ratio",
    "count_nonzero_blocks",
    "is_nm_sparse",
    "to_format",
]

#: Block shapes (rows, cols) the kernel layer supports.  (1, 1) is CSR.
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (1, 8), (4, 1), (8, 1), (16, 1), (4, 4))


def _check_block(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise InvalidSparsityError(f"expected a 2-d weight (N, K), got shape {tuple(shape)}")
    try:
        br, bc = (int(block[0]), int(block[1]))
    except (TypeError, ValueError, IndexError):
        raise InvalidSparsityError(f"block must be a pair (rows, cols), got {block!r}") from None
    if br < 1 or bc < 1:
        raise InvalidSparsityError(f"block shape must be positive, got {(br, bc)}")
    n, k = int(shape[0]), int(shape[1])
    if n % br or k % bc:
        raise InvalidSparsityError(
            f"block {(br, bc)} does not tile weight shape {(n, k)}: "
            f"{'N=%d is not a multiple of %d' % (n, br) if n % br else ''}"
            f"{' and ' if (n % br and k % bc) else ''}"
            f"{'K=%d is not a multiple of %d' % (k, bc) if k % bc else ''}"
        )
    return br, bc


def _block_mask(weight: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Boolean (N//br, K//bc) mask of blocks holding at least one nonzero."""
    n, k = weight.shape
    return (weight != 0).reshape(n // br, br, k // bc, bc).any(dim=3).any(dim=1)


def count_nonzero_blocks(weight: torch.Tensor, block: tuple[int, int]) -> int:
    """Number of (br, bc) blocks of ``weight`` with at least one nonzero."""
    br, bc = _check_block(tuple(weight.shape), block)
    return int(_block_mask(weight.detach(), br, bc).sum())


def block_fill_ratio(weight: torch.Tensor, block: tuple[int, int]) -> float:
    """Stored values / true nonzeros when ``weight`` is stored with ``block``.

    1.0 means no fill-in.  An all-zero weight stores nothing and returns 1.0.
    """
    br, bc = _check_block(tuple(weight.shape), block)
    nnz = int((weight.detach() != 0).sum())
    if nnz == 0:
        return 1.0
    return count_nonzero_blocks(weight, (br, bc)) * br * bc / nnz


@dataclass
class BlockSparseMatrix:
    """W: (N, K) in BSR with block shape (br, bc); CSR is block (1, 1).

    ``data[p]`` is the ``(br, bc)`` block at block row ``i`` (``indptr[i] <= p <
    indptr[i + 1]``) and block column ``indices[p]``; block columns are sorted
    within each block row.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    data: torch.Tensor  # (nnzb, br, bc) float32, contiguous
    indices: torch.Tensor  # (nnzb,) int32 block-column index
    indptr: torch.Tensor  # (N // br + 1,) int32

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.block = _check_block(self.shape, self.block)
        br, bc = self.block
        nbr = self.shape[0] // br
        if self.data.dim() != 3 or tuple(self.data.shape[1:]) != (br, bc):
            raise InvalidSparsityError(
                f"data must have shape (nnzb, {br}, {bc}), got {tuple(self.data.shape)}"
            )
        if tuple(self.indices.shape) != (self.data.shape[0],):
            raise InvalidSparsityError(
                f"indices must have shape ({self.data.shape[0]},), got {tuple(self.indices.shape)}"
            )
        if tuple(self.indptr.shape) != (nbr + 1,):
            raise InvalidSparsityError(f"indptr must have shape ({nbr + 1},), got {tuple(self.indptr.shape)}")

    # -- construction -----------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int] = (1, 1)) -> "BlockSparseMatrix":
        """Store ``weight`` (N, K); a block is stored iff any of its elements is nonzero."""
        if not isinstance(weight, torch.Tensor):
            raise InvalidSparsityError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        shape = tuple(weight.shape)
        br, bc = _check_block(shape, block)
        n, k = shape
        w = weight.detach().to(device="cpu", dtype=torch.float32)
        blocks = w.reshape(n // br, br, k // bc, bc).permute(0, 2, 1, 3)  # (NB, KB, br, bc)
        mask = (blocks != 0).flatten(2).any(dim=2)  # (NB, KB)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by row then col
        data = blocks[rows, cols].contiguous()  # (nnzb, br, bc)
        indptr = torch.zeros(n // br + 1, dtype=torch.int32)
        torch.cumsum(mask.sum(dim=1), dim=0, out=indptr[1:])
        return cls(shape=shape, block=(br, bc), data=data, indices=cols.to(torch.int32), indptr=indptr)

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        br, bc = self.block
        nb, kb = n // br, k // bc
        out = torch.zeros(nb, kb, br, bc, dtype=self.data.dtype)
        counts = (self.indptr[1:] - self.indptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(nb), counts)
        out[rows, self.indices.to(torch.int64)] = self.data
        return out.permute(0, 2, 1, 3).reshape(n, k)

    # -- statistics ---------------------------------------------------------
    @property
    def nnzb(self) -> int:
        return int(self.data.shape[0])

    @property
    def nnz(self) -> int:
        """Stored values, fill-in zeros included."""
        return self.nnzb * self.block[0] * self.block[1]

    @property
    def density(self) -> float:
        """True nonzeros / (N * K)."""
        total = self.shape[0] * self.shape[1]
        return float((self.data != 0).sum()) / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.indices, self.indptr))

    @property
    def format(self) -> str:
        return "csr" if self.block == (1, 1) else "bsr"

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block={self.block}, format={self.format!r}, "
            f"nnzb={self.nnzb}, density={self.density:.4f})"
        )


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
class NMSparseMatrix:
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
    def density(self) -> float:
        """True nonzeros / (N * K)."""
        total = self.shape[0] * self.shape[1]
        return float((self.values != 0).sum()) / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta))

    @property
    def format(self) -> str:
        return "nm"

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def __repr__(self) -> str:
        return (f"NMSparseMatrix(shape={self.shape}, pattern={self.pattern!r}, groups={self.groups}, "
                f"density={self.density:.4f})")


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive columns of ``weight`` (N, K) holds at most ``n`` nonzeros."""
    rows, k = weight.shape
    g = -(-k // m)
    nz = torch.zeros(rows, g * m, dtype=torch.bool)
    nz[:, :k] = weight.detach().cpu() != 0
    return bool((nz.reshape(rows, g, m).sum(dim=2) <= n).all())


def to_format(weight: torch.Tensor, fmt: str, block: tuple):
    """Store ``weight`` (N, K) in ``fmt``: ``"nm"`` with ``block = (n, m)``, else BSR/CSR with block ``(br, bc)``.

    Raises
    ------
    InvalidSparsityError
        The weight does not fit the format (see the constructors).
    """
    if fmt == "nm":
        return NMSparseMatrix.from_dense(weight, int(block[0]), int(block[1]))
    return BlockSparseMatrix.from_dense(weight, block)
