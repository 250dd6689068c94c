"""Quick kernel benchmark: TVM sparse linear / torch dense F.linear, same run, medians.

    python benchmarks/kernels_quick.py [--minilm]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from sparsecc.formats import BlockSparseMatrix
from sparsecc.runtime.kernels import SparseLinear
from sparsecc.runtime.timing import measure_ms


def weight(n, k, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    mask = (torch.rand(n // br, k // bc, generator=g) < density).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return torch.randn(n, k, generator=g) * mask


def ratio(n, k, block, m, density=0.1, repeat=20):
    w = weight(n, k, block, density)
    b = torch.randn(n)
    mod = SparseLinear(BlockSparseMatrix.from_dense(w, block), b, eager=True)
    x = torch.randn(m, k)
    torch.testing.assert_close(mod(x), F.linear(x, w, b), atol=1e-3, rtol=1e-3)
    t = measure_ms(mod, x, repeat=repeat)
    d = measure_ms(F.linear, x, w, b, repeat=repeat)
    return t / d, t, d


def main():
    print(f"torch threads: {torch.get_num_threads()}")
    shapes = [(3072, 768, (1, 128, 1024) if False else (1, 16, 128))]
    if "--minilm" in sys.argv:
        shapes = [(384, 384, (128, 1024)), (1536, 384, (128, 1024)), (384, 1536, (128, 1024))]
    blocks = [(1, 1), (1, 4), (1, 8), (4, 1), (4, 4), (8, 1), (16, 1)]
    for n, k, ms in shapes:
        for block in blocks:
            row = []
            for m in ms:
                r, t, d = ratio(n, k, block, m)
                row.append(f"M={m}: {r:.2f} ({t:.3f}/{d:.3f} ms)")
            print(f"W {n}x{k} d=0.1 {block[0]}x{block[1]:<3}", "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
