"""ARM must-show: a ResNet-style CNN at 80% sparsity cross-compiled for aarch64, run under qemu, outputs match.

    python benchmarks/arm.py                       # resnet18_like (sparsecc.zoo), 224x224, batch 1, 80% in 16x1
    python benchmarks/arm.py --size 64 --dense     # smaller input, and also time an all-dense artifact
    python benchmarks/arm.py --device neoverse-n1 --sparsity 0.9

Prints the per-layer formats, the max abs difference between the aarch64 artifact (run by the aarch64 TVM
runtime under qemu-aarch64 user-mode emulation) and the pruned torch model, and times: compile, export, and
the emulated forward (median of ``--repeat`` runs inside one qemu process). Emulated times measure qemu's
translation of NEON code on this x86 host: compare them with each other (sparse vs dense artifact, same run),
never with a board's latency. Timings are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import sparsecc
from sparsecc.runtime.export import run_artifact_under_qemu
from sparsecc.zoo import resnet18_like


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--block", default="16x1", help="pruning block, rows x cols (default 16x1)")
    ap.add_argument("--device", default="arm", help="arm, cortex-a76, neoverse-n1, neoverse-v1, ...")
    ap.add_argument("--repeat", type=int, default=3, help="emulated forwards timed (median)")
    ap.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS inside qemu (default 1)")
    ap.add_argument("--dense", action="store_true", help="also export and time the unpruned model (slow)")
    ap.add_argument("--out", default=None, help="keep the artifact folder here (default: a temporary one)")
    args = ap.parse_args()
    block = tuple(int(v) for v in args.block.split("x"))

    model = resnet18_like(num_classes=1000, seed=0)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    tmp = Path(tempfile.mkdtemp(prefix="sparsecc-arm-bench-"))
    try:
        t0 = time.perf_counter()
        cm = sparsecc.compile(model, x, target=args.device, sparsity=args.sparsity, pattern="block",
                              block_shape=block)
        t_compile = time.perf_counter() - t0
        print(cm.report())
        out = Path(args.out) if args.out else tmp / "sparse"
        t0 = time.perf_counter()
        cm.export(out, overwrite=True)
        t_export = time.perf_counter() - t0
        ref = sparsecc.prune(model, args.sparsity, block_shape=block)(x)
        y, t_sparse = run_artifact_under_qemu(out, x, repeat=args.repeat, threads=args.threads)
        diff = float((y - ref).abs().max())
        scale = float(ref.abs().max())
        print(f"\nresnet18_like {args.size}x{args.size} batch 1, sparsity {args.sparsity} in {args.block} blocks, "
              f"target {cm.target.describe()}")
        print(f"compile {t_compile:.1f} s, export (Relax build + aarch64 link) {t_export:.1f} s")
        print(f"max abs diff vs pruned torch: {diff:.3e} (output scale {scale:.3e}, relative {diff / scale:.2e})")
        print(f"qemu-aarch64 emulated forward: {t_sparse:.1f} ms (median of {args.repeat}, "
              f"{args.threads} thread(s))")
        if args.dense:
            cmd = sparsecc.compile(model, x, target=args.device, pattern="dense")
            cmd.export(tmp / "dense", overwrite=True)
            yd, t_dense = run_artifact_under_qemu(tmp / "dense", x, repeat=args.repeat, threads=args.threads)
            print(f"dense artifact (TVM default schedules): {t_dense:.1f} ms emulated, max abs diff vs torch dense "
                  f"{float((yd - model(x)).abs().max()):.3e}; sparse / dense = {t_sparse / t_dense:.2f}")
        if diff > 1e-3 * scale:
            raise SystemExit(f"MISMATCH: {diff:.3e} > 1e-3 x output scale")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
