"""Block compressed sparse row storage (BSR) and the ``bsr`` registry entry (pure torch; no TVM import).

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
from sparsecc.formats.base import Candidate, Format, M, StorageStats, register_format

__all__ = ["BLOCK_SHAPES", "BSR", "BlockFormat", "BlockSparseMatrix", "block_candidate", "block_fill_ratio",
           "count_nonzero_blocks"]

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
class BlockSparseMatrix(StorageStats):
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
    def format(self) -> str:
        return block_candidate(self.block).format

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block={self.block}, format={self.format!r}, "
            f"nnzb={self.nnzb}, density={self.density:.4f})"
        )


class BlockFormat(Format):
    """BSR with block shape ``(rows, cols)`` as the candidate's params; CSR is the entry with the one block (1, 1).

    Kernels: :mod:`sparsecc.codegen.linear` (x86/ARM rules :mod:`sparsecc.targets.x86`, CUDA
    :mod:`sparsecc.targets.cuda`) and :mod:`sparsecc.codegen.conv`; runtime modules
    :class:`~sparsecc.runtime.kernels.SparseLinear`, :class:`~sparsecc.runtime.conv.SparseConv2d`,
    :class:`~sparsecc.runtime.cuda_kernels.CudaSparseLinear` register themselves on the entry.
    """

    storage = BlockSparseMatrix

    def __init__(self, name: str, blocks: tuple, patterns: tuple):
        super().__init__()
        self.name = name
        self.blocks = tuple(tuple(b) for b in blocks)
        self.patterns = patterns

    def slug(self, params):
        return self.name if len(self.blocks) == 1 else super().slug(params)

    def label(self, params):
        return self.name if len(self.blocks) == 1 else super().label(params)

    def candidates(self, shape, pattern, *, nm=None, column_group=None):
        if pattern not in self.patterns:
            return []
        n, k = shape
        return [Candidate(self.name, b) for b in self.blocks
                if not (n % b[0] or k % b[1] or (b[1] > 1 and column_group and column_group % b[1]))]

    def to_storage(self, weight, params):
        return BlockSparseMatrix.from_dense(weight, tuple(params))

    def stored(self, params, shape, nnz, fill_ratio):
        return int(round(fill_ratio.get(tuple(params), 1.0) * nnz / (params[0] * params[1])))

    def units_of(self, matrix) -> int:
        return matrix.nnzb

    def flops(self, params, n, k, stored):
        # fill-in zeros count: the kernel multiplies them too
        return 2 * M * stored * params[0] * params[1]

    def bytes(self, params, n, k, stored):
        br, bc = params
        return 4 * stored * br * bc + 4 * stored + 4 * (n // br + 1) + 4 * M * k + 4 * M * n

    def calibration_weight(self, params, n, k, density, seed=0):
        """Random W: (N, K) whose nonzeros fill a random ``density`` fraction of the blocks."""
        g = torch.Generator().manual_seed(seed)
        br, bc = params
        keep = torch.rand(n // br, k // bc, generator=g) < density
        mask = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
        return torch.randn(n, k, generator=g) * mask

    def calibration_candidates(self):
        return [Candidate(self.name, b) for b in self.blocks]


#: BSR: every block shape of :data:`BLOCK_SHAPES` but (1, 1) (that one is CSR, :mod:`sparsecc.formats.csr`).
BSR = register_format(BlockFormat("bsr", tuple(b for b in BLOCK_SHAPES if b != (1, 1)), ("auto", "block")))


def block_candidate(block) -> Candidate:
    """The candidate of a block shape: CSR for (1, 1), else BSR with that block."""
    block = tuple(int(b) for b in block)
    return Candidate("csr" if block == (1, 1) else "bsr", block)
