"""The x86 BSR linear kernel at M = 128 for each register tile (rows of X per tile) on this CPU.

    python benchmarks/m_tile.py            # MiniLM shapes, 2 threads

For each weight (block shape, W: (N, K), block density) the hand schedule is built with M tiles of 2, 4 and 8
rows and timed as the runtime calls it (:class:`sparsecc.tune.measure.Measurement`, 10th percentiles of 15
rotated rounds, :func:`sparsecc.tune.measure.compare`). Printed: ms and GFLOP/s per tile, and the tile
:func:`sparsecc.targets.x86.default_params` picks for this CPU (half of the vector register file for the
accumulators: see its docstring).
"""

from __future__ import annotations

import argparse

import torch
import tvm

from sparsecc.targets import x86
from sparsecc.tune import space
from sparsecc.tune.measure import Measurement, compare, runnable
from sparsecc.tune.space import Workload

SHAPES = (((16, 1), 1536, 384, 0.2), ((16, 1), 384, 384, 1.0), ((8, 1), 1536, 384, 0.2), ((4, 1), 384, 1536, 0.2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=128, help="rows of X (default 128)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target = x86.host_target()
    lanes, regs = x86.host_vector_file()
    print(f"{target}: {regs} vector registers of {lanes} float32 lanes, M = {args.m}")
    for block, n, k, density in SHAPES:
        wl = Workload(block, n, k, density, args.m, True, None)
        fns = {}
        for mt in (2, 4, 8):
            sch = tvm.s_tir.Schedule(space.workload_func(wl, mt), enable_check=False)
            space.apply_params(sch, wl.block, wl.regime, x86.ScheduleParams(m_tile=mt, m_outer=True))
            fns[mt] = runnable(x86.build(sch.mod, target))["main"]
        meas = Measurement(wl, 0)
        meas.calibrate(fns[8])
        times = compare(fns, meas, rounds=15)
        flops = 2.0 * args.m * n * k * density
        cells = ", ".join(f"{mt} rows {ms:.3f} ms ({flops / ms / 1e6:.1f} GFLOP/s)" for mt, ms in times.items())
        print(f"{block[0]}x{block[1]} W ({n}, {k}) density {density}: {cells}; "
              f"default {x86.default_params(block, 'gemm').m_tile} rows")


if __name__ == "__main__":
    main()
