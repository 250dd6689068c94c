"""sparsecc CUDA kernels vs torch dense (cuBLAS) and torch's semi-structured 2:4, on BERT-shaped linears.

Needs a CUDA GPU (exits with a message and status 2 otherwise). For each weight
W: (N, K) in {768x768, 3072x768, 768x3072}, M in {1, 16, 128}:

* ``dense``: ``F.linear(x, W, b)`` in fp32 (cuBLAS; TF32 off, torch's default for matmuls)
* ``sparsecc <fmt>``: the CUDA kernel for W pruned to ``--density`` in each block shape (CSR = 1x1)
* ``2:4 fp16`` / ``2:4 sparsecc``: W pruned 2:4 along K; torch's ``to_sparse_semi_structured``
  (fp16 only: cuSPARSELt / CUTLASS sparse tensor cores; fp16 dense ``F.linear`` timed alongside for
  its own baseline) and sparsecc's kernel on the same weight (fp32, CSR kernel)

Times are medians of ``--runs`` interleaved rounds (every function once per round), each call
timed with CUDA events after ``--warmup`` calls; ratios are sparsecc / dense (fp32) within the
same run, lower is better. ``python benchmarks/gpu.py --json out.json`` also writes the table.

Written without a GPU at hand: never run by its author. It checks every sparsecc kernel against
``F.linear`` on the pruned weight before timing it (max abs error printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [(768, 768), (3072, 768), (768, 3072)]
MS = [1, 16, 128]
BLOCKS = [(1, 1), (1, 8), (4, 4), (8, 1), (16, 1)]


def cuda_event_medians(fns: dict, runs: int, warmup: int) -> dict:
    """Median ms per function, calls interleaved, each timed by a pair of CUDA events."""
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        torch.cuda.synchronize()
        times = {k: [] for k in fns}
        for _ in range(runs):
            for k, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def prune_blocks(w: torch.Tensor, block, density: float, g: torch.Generator) -> torch.Tensor:
    """Keep the ``density`` fraction of (br, bc) blocks with the largest mean |w| (magnitude pruning)."""
    n, k = w.shape
    br, bc = block
    score = w.abs().reshape(n // br, br, k // bc, bc).mean(dim=(1, 3))
    keep_n = max(1, round(density * score.numel()))
    thr = score.flatten().kthvalue(score.numel() - keep_n + 1).values
    mask = (score >= thr).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return w * mask


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights along K."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    idx = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return (groups * mask).reshape(n, k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--density", type=float, default=0.1, help="block density of the BSR/CSR weights")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--arch", default=None, help="CUDA arch (default: the GPU's own)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    from sparsecc.targets import cuda

    if not cuda.cuda_device_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is "
              f"{torch.cuda.is_available()} (torch {torch.__version__}); nothing was measured.", file=sys.stderr)
        return 2
    from sparsecc.formats import BlockSparseMatrix
    from sparsecc.runtime.cuda_kernels import CudaSparseLinear

    torch.backends.cuda.matmul.allow_tf32 = False
    arch = args.arch or cuda.detect_arch() or "sm_80"
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(0)} ({arch}), torch {torch.__version__}, density {args.density}, "
          f"medians of {args.runs} interleaved runs (CUDA events)")
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        to_sparse_semi_structured = None
    g = torch.Generator().manual_seed(0)
    results = []
    cols = [("csr" if b == (1, 1) else f"{b[0]}x{b[1]}") for b in BLOCKS]
    print("| W (N x K) | M | dense fp32 ms | " + " | ".join(cols) + " | 2:4 sparsecc | 2:4 torch fp16 / dense fp16 |")
    print("|---|---|---|" + "---|" * (len(cols) + 2))
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g)
        mods, weights = {}, {}
        for blk in BLOCKS:
            wp = prune_blocks(w, blk, args.density, g)
            weights[blk] = wp.to(dev)
            mods[blk] = CudaSparseLinear(BlockSparseMatrix.from_dense(wp, blk), b, arch=arch, device=dev)
        w24 = prune_24(w)
        mod24 = CudaSparseLinear(BlockSparseMatrix.from_dense(w24, (1, 1)), b, arch=arch, device=dev)
        wd, bd, w24d = w.to(dev), b.to(dev), w24.to(dev)
        semi = None
        if to_sparse_semi_structured is not None:
            try:
                semi = to_sparse_semi_structured(w24d.half())
            except Exception as e:  # noqa: BLE001 - unsupported GPU / shape: reported, not fatal
                print(f"# to_sparse_semi_structured failed for {n}x{k}: {e}")
        for m in MS:
            x = torch.randn(m, k, generator=g).to(dev)
            # correctness first: every sparsecc kernel against F.linear on its own pruned weight
            errs = {blk: float((mods[blk](x) - F.linear(x, weights[blk], bd)).abs().max()) for blk in BLOCKS}
            errs["2:4"] = float((mod24(x) - F.linear(x, w24d, bd)).abs().max())
            bad = {kk: e for kk, e in errs.items() if not e < 1e-3}
            if bad:
                print(f"# WRONG RESULTS {n}x{k} M={m}: {bad}")
            fns = {"dense": lambda x=x, wd=wd, bd=bd: F.linear(x, wd, bd)}
            for blk in BLOCKS:
                fns[blk] = lambda x=x, mod=mods[blk]: mod(x)
            fns["2:4"] = lambda x=x, mod24=mod24: mod24(x)
            if semi is not None:
                xh, bh, wh = x.half(), bd.half(), w24d.half()
                # semi-structured sparse matmuls want M >= 32 or so on some backends: pad rows like a user would
                mp = max(m, 32)
                xh_p = torch.zeros(mp, k, device=dev, dtype=torch.float16)
                xh_p[:m] = xh
                fns["semi"] = lambda xh_p=xh_p, bh=bh, semi=semi: F.linear(xh_p, semi, bh)
                fns["dense16"] = lambda xh_p=xh_p, wh=wh, bh=bh: F.linear(xh_p, wh, bh)
            try:
                t = cuda_event_medians(fns, args.runs, args.warmup)
            except Exception as e:  # noqa: BLE001 - e.g. semi-structured refusing a shape
                fns.pop("semi", None)
                fns.pop("dense16", None)
                print(f"# {n}x{k} M={m}: semi-structured timing failed ({e}); timing without it")
                t = cuda_event_medians(fns, args.runs, args.warmup)
            row = {"n": n, "k": k, "m": m, "dense_ms": t["dense"], "max_abs_err": errs,
                   "sparsecc_ms": {("csr" if blk == (1, 1) else f"{blk[0]}x{blk[1]}"): t[blk] for blk in BLOCKS},
                   "sparsecc_24_ms": t["2:4"], "semi_fp16_ms": t.get("semi"), "dense_fp16_ms": t.get("dense16")}
            results.append(row)
            rat = " | ".join(f"{t[blk] / t['dense']:.2f}" for blk in BLOCKS)
            semi_txt = (f"{t['semi']:.4f} / {t['dense16']:.4f} ms" if "semi" in t else "n/a")
            print(f"| {n}x{k} | {m} | {t['dense']:.4f} | {rat} | {t['2:4'] / t['dense']:.2f} | {semi_txt} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "arch": arch, "density": args.density,
                       "runs": args.runs, "results": [{**r, "max_abs_err": {str(k): v for k, v in
                                                                              r["max_abs_err"].items()}}
                                                      for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
