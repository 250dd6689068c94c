"""Tile sweeps of the unstructured kernels on this CPU, each variant against torch dense in the same rounds.

    python benchmarks/tiles.py xcsr   --threads 2   # XCSRLinear: m_tile, accumulator chains, column blocks
    python benchmarks/tiles.py direct --threads 2   # the direct NCHW conv: pixel tile (hw_tile)

``xcsr``: the MiniLM shapes (384x384, 1536x384, 384x1536) at density 0.5 and 0.3, M = 128 and 1024.
``direct``: the stride-1 3x3 convs of ResNet-18 (batch 1) at density 0.5, 0.3 and 0.1.
Printed: torch dense ms and every variant's time / dense time (medians of interleaved rounds); the defaults are
:func:`sparsecc.targets.x86_xcsr.default_xcsr_params` and :func:`sparsecc.targets.x86_conv.default_conv_params`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sparsecc.formats import RowSparseMatrix  # noqa: E402
from sparsecc.runtime.conv import SparseConv2d  # noqa: E402
from sparsecc.runtime.timing import interleaved_ms  # noqa: E402
from sparsecc.runtime.xcsr import XCSRLinear  # noqa: E402
from sparsecc.targets.x86_conv import ConvParams  # noqa: E402
from sparsecc.targets.x86_xcsr import XCSRParams  # noqa: E402

XCSR_VARIANTS = {"mt64": (64, 128, 1), "mt64 chains2": (64, 128, 2), "mt32": (32, 128, 1), "mt32 chains2": (32, 128, 2),
                 "mt64 kb0": (64, 0, 1), "mt64 kb256": (64, 256, 1)}  # (m_tile, k_block, chains)


def _print(label: str, t: dict) -> None:
    print(f"{label}: dense {t['dense']:.3f} ms  "
          + "  ".join(f"{k} {v / t['dense']:.2f}" for k, v in t.items() if k != "dense"), flush=True)


def sweep_xcsr(runs: int) -> None:
    for d in (0.5, 0.3):
        for n, k in ((384, 384), (1536, 384), (384, 1536)):
            for m in (128, 1024):
                w = torch.randn(n, k) * (torch.rand(n, k) < d)
                b, x = torch.randn(n), torch.randn(m, k)
                fns = {"dense": lambda: F.linear(x, w, b)}
                for name, (mt, kb, chains) in XCSR_VARIANTS.items():
                    params = {"gemm": XCSRParams(mt, 128, kb, chains), "gemv": XCSRParams(1, 32, kb, 1)}
                    mod = XCSRLinear(RowSparseMatrix.from_dense(w), b, params=params)
                    fns[name] = lambda mod=mod: mod(x)
                _print(f"density {d} W {n}x{k} M={m}", interleaved_ms(fns, runs=runs))


def sweep_direct(runs: int) -> None:
    for d in (0.5, 0.3, 0.1):
        for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
            w = torch.randn(c, c, 3, 3) * (torch.rand(c, c, 3, 3) < d)
            b, x = torch.randn(c), torch.randn(1, c, hw, hw)
            fns = {"dense": lambda: F.relu(F.conv2d(x, w, b, 1, 1))}
            for ht in (16, 32, 64, 128):
                mod = SparseConv2d(w, b, 1, 1, "relu", (1, 1), layout="direct")
                mod._params = ConvParams(hw_tile=ht)
                fns[f"hw_tile {ht}"] = lambda mod=mod: mod(x)
            _print(f"density {d} conv {c}x{c}x3x3 on {hw}x{hw}", interleaved_ms(fns, runs=runs))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=("xcsr", "direct"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    {"xcsr": sweep_xcsr, "direct": sweep_direct}[args.kernel](args.runs)


if __name__ == "__main__":
    main()
