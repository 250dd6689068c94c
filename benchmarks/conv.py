"""Sparse convolution benchmark: a ResNet-18-like CNN at 80% block sparsity, and its conv layers.

Prints, in one run (all times are medians of interleaved runs, ratios taken within the run):

1. the whole model at batch 1, 224x224: torch dense (the user's model, NCHW), torch dense
   ``channels_last``, torch with the same pruned weights, and sparsecc; the max abs difference
   between sparsecc and the pruned torch model relative to its output scale;
2. every distinct conv layer: sparsecc kernel (NHWC, implicit im2col) / torch ``F.conv2d`` dense,
   plus the NCHW 1x1 kernel for 1x1 stride-1 layers and, for unstructured weights (``--block 1x1``), the
   direct NCHW kernel;
3. with ``--im2col-study``: explicit im2col (``F.unfold`` + the BSR linear kernel) against the
   implicit-im2col conv kernel, the measurement behind the choice in ``sparsecc/codegen/conv.py``.

Writes ``benchmarks/results/conv.{md,json}`` (``--out`` to change).

    python benchmarks/conv.py --threads 2 --runs 20 --im2col-study
    python benchmarks/conv.py --threads 2 --runs 20 --block 1x1 --sparsity 0.7 --out benchmarks/results/conv_unstructured
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sparsecc  # noqa: E402
from sparsecc.runtime.conv import SparseConv2d  # noqa: E402
from sparsecc.runtime.timing import interleaved_ms  # noqa: E402
from sparsecc.zoo import resnet18_like  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20, help="interleaved rounds per timing")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--block", default="16x1", help="pruning block of the (C_out, kh·kw·C_in) matrix; 1x1: unstructured")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--im2col-study", action="store_true", help="also time explicit im2col + linear kernel")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or this process's CPU time (robust to other jobs at --threads 1)")
    p.add_argument("--out", default=str(RESULTS / "conv"), help="results path without extension")
    return p.parse_args(argv)


def _conv_layers(model):
    """Distinct (C_out, C_in, k, stride, padding, input H) conv layers of the model, with their names."""
    seen, out = {}, []
    x = torch.randn(1, 3, 224, 224)
    shapes = {}

    def hook(name):
        def f(mod, inp, _out):
            shapes[name] = tuple(inp[0].shape)
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            key = (m.out_channels, m.in_channels, m.kernel_size[0], m.stride[0], m.padding[0], shapes[n][2])
            if key not in seen:
                seen[key] = n
                out.append((n, m, shapes[n]))
    return out


def run(args) -> dict:
    """Run the benchmark with parsed ``args`` (see :func:`parse_args`); returns the results dict."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # read when TVM's pool starts (first kernel)
    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    block = tuple(int(v) for v in args.block.split("x"))
    model = resnet18_like()
    x = torch.randn(args.batch, 3, args.size, args.size)
    res = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "runs": args.runs,
           "clock": getattr(args, "clock", "wall"), "load_average_1min": os.getloadavg()[0],
           "sparsity": args.sparsity, "block": list(block), "input": list(x.shape),
           "date": time.strftime("%Y-%m-%d %H:%M")}

    unstructured = block == (1, 1)
    t0 = time.perf_counter()
    if unstructured:
        cm = sparsecc.compile(model, x, sparsity=args.sparsity, pattern="unstructured")
    else:
        cm = sparsecc.compile(model, x, sparsity=args.sparsity, pattern="block", block_shape=block)
    res["compile_s"] = time.perf_counter() - t0
    ref = sparsecc.prune(model, args.sparsity, block_shape=block).eval()
    with torch.no_grad():
        y, r = cm(x), ref(x)
    scale = float(r.abs().max())
    res["max_abs_diff"] = float((y - r).abs().max())
    res["output_scale"] = scale
    res["rel_diff"] = res["max_abs_diff"] / scale
    model_cl = resnet18_like().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t = interleaved_ms({"torch dense": lambda: model(x), "torch dense channels_last": lambda: model_cl(x_cl),
                        "torch pruned": lambda: ref(x), "sparsecc": lambda: cm(x)}, runs=args.runs, clock=clock)
    res["model_ms"] = t
    res["speedup_vs_dense"] = t["torch dense"] / t["sparsecc"]
    res["speedup_vs_dense_channels_last"] = t["torch dense channels_last"] / t["sparsecc"]
    res["report"] = cm.report()
    print(cm.report())
    where = "unstructured" if unstructured else f"in {block[0]}x{block[1]} blocks"
    print(f"\nResNet-18-like, {args.batch}x3x{args.size}x{args.size}, {args.sparsity:.0%} sparsity {where}, "
          f"{args.threads} threads, medians of {args.runs} interleaved runs:")
    for k, v in t.items():
        print(f"  {k:28s} {v:8.2f} ms   ({t['torch dense'] / v:.2f}x of torch dense)")
    print(f"  max |sparsecc - pruned torch| = {res['max_abs_diff']:.2e} (output scale {scale:.3f}, "
          f"relative {res['rel_diff']:.1e})")

    layers = []
    if not args.no_layers:
        pruned_mods = dict(ref.named_modules())
        print("\nper conv layer (distinct shapes), ms, sparse / torch F.conv2d dense:")
        for name, m, in_shape in _conv_layers(model):
            w_dense = m.weight.detach()
            w_sparse = pruned_mods[name].weight.detach()
            b = torch.randn(m.out_channels)
            xi = torch.randn(args.batch, *in_shape[1:])
            xi_cl = xi.contiguous(memory_format=torch.channels_last)
            s, p = m.stride, m.padding
            nhwc = SparseConv2d(w_sparse, b, s, p, "relu", block)
            fns = {"dense": lambda: F.relu(F.conv2d(xi, w_dense, b, s, p)),
                   "dense_cl": lambda: F.relu(F.conv2d(xi_cl, w_dense, b, s, p)),
                   "nhwc": lambda: nhwc(xi_cl)}
            if m.kernel_size == (1, 1) and s == (1, 1) and block[1] == 1:
                nchw = SparseConv2d(w_sparse, b, 1, 0, "relu", block, layout="nchw")
                fns["nchw"] = lambda: nchw(xi)
            if unstructured:
                direct = SparseConv2d(w_sparse, b, s, p, "relu", block, layout="direct")
                fns["direct"] = lambda: direct(xi)
            if args.im2col_study and m.kernel_size != (1, 1):
                im2col = _explicit_im2col(w_sparse, b, s, p, block)
                fns["im2col"] = lambda: im2col(xi_cl)
            tt = interleaved_ms(fns, runs=args.runs, clock=clock)
            row = {"layer": name, "weight": list(w_dense.shape), "stride": s[0], "input": list(xi.shape),
                   "ms": tt, "ratio_nhwc": tt["nhwc"] / tt["dense"]}
            if "nchw" in tt:
                row["ratio_nchw"] = tt["nchw"] / tt["dense"]
            if "im2col" in tt:
                row["ratio_im2col"] = tt["im2col"] / tt["dense"]
            if "direct" in tt:
                row["ratio_direct"] = tt["direct"] / tt["dense"]
            layers.append(row)
            extra = "".join(f"  {k} {tt[k]:.3f} ({tt[k] / tt['dense']:.2f})" for k in ("nchw", "direct", "im2col")
                            if k in tt)
            print(f"  {name:24s} {'x'.join(map(str, w_dense.shape)):12s} s{s[0]} in {in_shape[2]:3d}: dense "
                  f"{tt['dense']:.3f} (cl {tt['dense_cl']:.3f})  nhwc {tt['nhwc']:.3f} ({row['ratio_nhwc']:.2f})"
                  + extra)
    res["layers"] = layers
    _write(res, Path(args.out))
    return res


def _explicit_im2col(w, b, stride, padding, block):
    """Explicit im2col in NHWC (``F.unfold`` + permute to (HW, kh·kw·C_in)) + the BSR linear kernel."""
    from sparsecc.formats import BlockSparseMatrix
    from sparsecc.runtime.kernels import SparseLinear
    from sparsecc.sparsify.patterns import as_matrix

    c_out, c_in, kh, kw = w.shape
    lin = SparseLinear(BlockSparseMatrix.from_dense(as_matrix(w), block), b, activation="relu")

    def f(x_cl):
        n, _, h, wd = x_cl.shape
        oh = (h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (wd + 2 * padding[1] - kw) // stride[1] + 1
        cols = F.unfold(x_cl, (kh, kw), padding=padding, stride=stride)  # (N, C_in·kh·kw, L), order (ci, dh, dw)
        cols = cols.view(n, c_in, kh * kw, oh * ow).permute(0, 3, 2, 1).reshape(n * oh * ow, kh * kw * c_in)
        return lin(cols).view(n, oh, ow, c_out).permute(0, 3, 1, 2)
    return f


def _write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    t = res["model_ms"]
    lines = [
        "# Sparse convolution: ResNet-18-like CNN",
        "",
        f"`python benchmarks/conv.py --threads {res['threads']} --runs {res['runs']} --clock {res['clock']}"
        f" --block {res['block'][0]}x{res['block'][1]} --sparsity {res['sparsity']}"
        f"{' --im2col-study' if any('ratio_im2col' in r for r in res['layers']) else ''}` ({res['date']}, "
        f"{res['machine']}, {res['threads']} threads; medians of {res['runs']} interleaved runs on a shared, "
        f"noisy machine: compare ratios within this run only; 1-min load average at start "
        f"{res.get('load_average_1min', float('nan')):.1f} on {os.cpu_count()} cores).",
        "",
        f"Input {tuple(res['input'])}, {res['sparsity']:.0%} sparsity "
        + ("unstructured" if tuple(res['block']) == (1, 1) else f"in {res['block'][0]}x{res['block'][1]} blocks")
        + f" in every conv's (C_out, kh·kw·C_in) matrix; BN folded; compile {res['compile_s']:.1f} s.",
        "",
        "| model | ms | torch dense / this |",
        "|---|---|---|",
    ]
    for k, v in t.items():
        lines.append(f"| {k} | {v:.2f} | {t['torch dense'] / v:.2f}x |")
    lines += ["", f"max |sparsecc - pruned torch| = {res['max_abs_diff']:.2e}, output scale {res['output_scale']:.3f} "
                  f"(relative {res['rel_diff']:.1e}).", ""]
    if res["layers"]:
        lines += ["## Per conv layer (sparse kernel ms / torch `F.conv2d` dense ms, same run)", "",
                  "| layer | weight | stride | input | dense ms | dense channels_last ms | NHWC sparse ms | ratio | "
                  "NCHW 1x1 ratio | direct NCHW ratio | explicit im2col ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["layers"]:
            ms = r["ms"]
            lines.append(
                f"| {r['layer']} | {'x'.join(map(str, r['weight']))} | {r['stride']} | "
                f"{'x'.join(map(str, r['input']))} | {ms['dense']:.3f} | {ms['dense_cl']:.3f} | {ms['nhwc']:.3f} | "
                f"{r['ratio_nhwc']:.2f} | {r.get('ratio_nchw', float('nan')):.2f} | "
                f"{r.get('ratio_direct', float('nan')):.2f} | "
                f"{r.get('ratio_im2col', float('nan')):.2f} |")
    lines += ["", "## Compile report", "", "```", res["report"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    run(parse_args())
