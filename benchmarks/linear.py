"""BERT-shaped sparse linears: sparsecc kernel time / torch dense time, same run.

For W in {768x768, 3072x768, 768x3072} (N x K), M in {1, 16, 128}, density
in {0.5, 0.3, 0.1} and every block shape, a weight is pruned with random
blocks of that shape; each cell is the median time of the sparsecc kernel
divided by the median time of torch dense ``F.linear`` measured in the same
run (lower is better), followed by the format the cost model picks for that
weight ("d" = stays dense, "c" = CSR, "b" = BSR with the block it was pruned
with, "b*" = BSR with another block).

Run: ``make bench`` or ``python benchmarks/linear.py [--quick | --minilm]``
(``--minilm``: all-MiniLM-L6-v2's shapes at M = 128 and 1024, i.e. seq 128 at
batch 1 and 8; ``--between``: run a torch layer norm, untimed, before every timed
call, as in a model, where torch's OpenMP workers are still spinning when the
next linear starts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsecc.formats import BLOCK_SHAPES, BlockSparseMatrix
from sparsecc.formats import BSR, Candidate, candidates
from sparsecc.runtime import make_linear
from sparsecc.tune.cost_model import cost_model_for
from sparsecc.passes.detect import detect_block_shape
from sparsecc.runtime.timing import measure_ms
from sparsecc.targets.base import resolve_target


def time_between(fn, x, op, repeat: int) -> float:
    """Median ms of ``fn(x)`` when each call follows ``op()`` (untimed), as between layers of a model."""
    for _ in range(3):
        op()
        fn(x)
    times = []
    for _ in range(repeat):
        op()
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    ap.add_argument("--minilm", action="store_true", help="MiniLM shapes, M in {128, 1024}")
    ap.add_argument("--density", type=float, action="append", help="densities (repeatable)")
    ap.add_argument("--between", action="store_true", help="a torch layer norm before every timed call")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = resolve_target("x86")
    cost = cost_model_for(target)
    print(f"# target {target.describe()}, {args.threads} threads; cost model: {cost.source}")
    shapes = [(3072, 768)] if args.quick else [(768, 768), (3072, 768), (768, 3072)]
    ms, densities = (1, 16, 128), (0.5, 0.3, 0.1)
    if args.minilm:
        shapes, ms, densities = [(384, 384), (1536, 384), (384, 1536)], (128, 1024), (0.3, 0.1)
    densities = tuple(args.density) if args.density else densities
    repeat = 8 if args.quick else args.repeat
    blocks = list(BLOCK_SHAPES)
    names = ["csr" if b == (1, 1) else "%dx%d" % b for b in blocks]
    print(f"{'W (NxK)':>9} {'M':>4} {'dens':>5} {'dense ms':>8}  " + "  ".join(f"{n:>8}" for n in names))
    for n, k in shapes:
        for m in ms:
            x = torch.randn(m, k)
            ln_in = torch.randn(m, k)

            def timed(fn, x=x, ln_in=ln_in, k=k):
                if args.between:
                    return time_between(fn, x, lambda: F.layer_norm(ln_in, (k,)), repeat)
                return measure_ms(fn, x, repeat=repeat)

            for density in densities:
                w_dense = torch.randn(n, k)
                b = torch.randn(n)
                t_dense = timed(lambda t: F.linear(t, w_dense, b))
                cells = []
                for blk in blocks:
                    w = BSR.calibration_weight(blk, n, k, density, seed=hash((n, k, m, blk)) & 0xFFFF)
                    mod = make_linear(target, BlockSparseMatrix.from_dense(w, blk), b)
                    t = timed(mod)
                    nnz = int(torch.count_nonzero(w))
                    _, fill = detect_block_shape(w)
                    est = cost.estimates(candidates((n, k), "auto", nnz / w.numel()), (n, k), m, nnz, fill)
                    pick = Candidate.parse(min(est, key=est.get))
                    fmt, pblk = pick.format, pick.params or None
                    pick = {"dense": "d", "csr": "c"}.get(fmt, "b" if pblk == blk else "b*")
                    cells.append(f"{t / t_dense:5.2f} {pick:<2}")
                print(f"{n}x{k:<4} {m:>4} {density:>5} {t_dense:>8.3f}  " + "  ".join(f"{c:>8}" for c in cells),
                      flush=True)


if __name__ == "__main__":
    main()
