"""Every sparse linear kernel family against torch dense (and onnxruntime dense), in one run.

Sections (``--section``, repeatable; default: all):

* ``linear``: for BERT (768x768, 3072x768, 768x3072) and MiniLM (384x384,
  1536x384, 384x1536) weights W (N x K) at M in {1, 16, 128}, the median time
  of torch dense ``F.linear``, onnxruntime dense ``Gemm`` (when installed:
  ``pip install -e .[bench]``), CSR, BSR 16x1 / 8x1 / 4x4 / 1x8 (random blocks
  at ``--density``, default 0.5 = the density of 2:4) and N:M 2:4 and 1:4
  (magnitude N:M of a random weight), all with a bias. Every function of one
  (W, M) cell is timed in the same interleaved rounds
  (:func:`sparsecc.runtime.timing.interleaved_ms`), and printed as the ratio
  to torch dense (lower is better).
* ``unstructured``: the unstructured families on the same six shapes at M in {1, 16, 128, 1024} and
  densities 0.5, 0.3, 0.1: CSR (scalar FMAs over an M tile) and ``xcsr`` (vectorized along M over a
  transposed X panel, :mod:`sparsecc.codegen.xcsr`), with a bias, as ratios to torch dense in the
  same interleaved rounds; then DeepSparse 1.8 on the same weights (one ONNX Gemm per case, static M) in
  its own virtual environment (``benchmarks/peers.py`` installs it; skipped with the reason where it
  cannot run), in the same invocation.
* ``batched``: a weight shared across a batch of sequences, X (B, S, K): one
  call on the (B, S, K) tensor (sparsecc folds it into M = B·S rows) against
  B calls of one sequence each (what a per-sequence batched kernel would do
  with the weight re-streamed per sequence), and torch dense on (B, S, K).
* ``attention``: MiniLM's attention (12 heads, head dim 32, a boolean padding mask) at batch 1 and 8, seq 128:
  torch's ``F.scaled_dot_product_attention``, the two-matmul form and the fused TVM kernel
  (:mod:`sparsecc.runtime.attention`), q, k, v laid out as the projections leave them, in the same
  interleaved rounds, as ratios to torch's op.
* ``conv``: ``benchmarks/conv.py``'s ``run(args)`` (sparse convolutions), if present.
* ``tune``: ``benchmarks/tune.py``'s ``run(args)`` (MetaSchedule), if present.

Results go to ``benchmarks/results/kernels.{md,json}`` (``kernels_<section>`` when one section runs). The machine is
shared and noisy: compare ratios within one run, not absolute times across runs.

Run: ``python benchmarks/kernel_speed.py [--section linear] [--threads 2] [--runs 30] [--quick]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparsecc.formats import BlockSparseMatrix, NMSparseMatrix  # noqa: E402
from sparsecc.passes.nm import nm_prune_weight  # noqa: E402
from sparsecc.runtime.kernels import SparseLinear  # noqa: E402
from sparsecc.runtime.nm import NMLinear  # noqa: E402
from sparsecc.runtime.timing import interleaved_ms  # noqa: E402
from sparsecc.runtime.xcsr import XCSRLinear  # noqa: E402
from sparsecc.formats import RowSparseMatrix  # noqa: E402
from sparsecc.formats import BSR  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BERT = [(768, 768), (3072, 768), (768, 3072)]
MINILM = [(384, 384), (1536, 384), (384, 1536)]
BLOCKS = [(16, 1), (8, 1), (4, 4), (1, 8)]
NMS = [(2, 4), (1, 4)]


def gemm_onnx(w: torch.Tensor, b: torch.Tensor, m="M") -> bytes:
    """ONNX model bytes of ``y = x @ w.T + b`` (one Gemm node), X: (m, K); ``m`` a name (dynamic) or an int."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w.numpy(), "w"), numpy_helper.from_array(b.numpy(), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def onnx_dense(w: torch.Tensor, b: torch.Tensor, threads: int):
    """``x -> x @ w.T + b`` as an onnxruntime session (one Gemm node), or None if onnxruntime is missing."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(gemm_onnx(w, b), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x.numpy()})[0]


DS_LAYERS = r"""
import json, sys, time
import numpy as np
from deepsparse import compile_model
folder, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cases = json.load(open(f"{folder}/cases.json"))
out = {}
for name, m in cases:
    x = np.load(f"{folder}/{name}.x.npy")
    engine = compile_model(f"{folder}/{name}.onnx", batch_size=m, num_cores=threads)
    for _ in range(3):
        y = engine([x])[0]
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter(); engine([x]); ts.append((time.perf_counter() - t0) * 1e3)
    out[name] = {"ms": float(np.median(ts)), "max_diff": float(np.abs(y - np.load(f"{folder}/{name}.y.npy")).max())}
print(json.dumps(out))
"""


def deepsparse_layers(cases: list, threads: int, runs: int) -> tuple[dict, str | None]:
    """DeepSparse 1.8 on single-Gemm ONNX models, in its own venv (see ``benchmarks/peers.py``).

    ``cases``: ``(name, w, b, x, y_ref)``; the batch of each engine is ``x.shape[0]`` (DeepSparse compiles
    static shapes). Returns ``({name: {"ms", "max_diff"}}, None)`` or ``({}, reason)`` where it cannot run.
    """
    if importlib.util.find_spec("onnx") is None:
        return {}, "onnx is not installed (pip install -e .[bench])"
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    py, why = peers.deepsparse_python()
    if py is None:
        return {}, why
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="sparsecc-ds-") as tmp:
        names = []
        for name, w, b, x, y in cases:
            (Path(tmp) / f"{name}.onnx").write_bytes(gemm_onnx(w, b, x.shape[0]))
            np.save(Path(tmp) / f"{name}.x.npy", x.numpy())
            np.save(Path(tmp) / f"{name}.y.npy", y.numpy())
            names.append((name, x.shape[0]))
        (Path(tmp) / "cases.json").write_text(json.dumps(names))
        r = subprocess.run([str(py), "-c", DS_LAYERS, tmp, str(threads), str(runs)], capture_output=True, text=True)
        if r.returncode != 0:
            return {}, f"DeepSparse failed: {r.stderr.strip()[-300:]}"
        return json.loads(r.stdout.strip().splitlines()[-1]), None


def linear_fns(n: int, k: int, density: float, threads: int, seed: int = 0) -> tuple[dict, dict]:
    """Functions ``x -> y`` of every kernel family for one weight shape, and their max error on a test input."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    fns = {"torch": lambda x: F.linear(x, w, b)}
    refs = {"torch": w}
    ort_fn = onnx_dense(w, b, threads)
    if ort_fn is not None:
        fns["onnxrt"] = ort_fn
        refs["onnxrt"] = w
    wc = BSR.calibration_weight((1, 1), n, k, density, seed)
    fns["csr"], refs["csr"] = SparseLinear(BlockSparseMatrix.from_dense(wc, (1, 1)), b, eager=True), wc
    for blk in BLOCKS:
        wb = BSR.calibration_weight(blk, n, k, density, seed)
        name = "%dx%d" % blk
        fns[name], refs[name] = SparseLinear(BlockSparseMatrix.from_dense(wb, blk), b, eager=True), wb
    for nn_, mm in NMS:
        wn = nm_prune_weight(w, nn_, mm)
        name = f"{nn_}:{mm}"
        fns[name], refs[name] = NMLinear(NMSparseMatrix.from_dense(wn, nn_, mm), b, eager=True), wn
    x = torch.randn(5, k, generator=g)
    errs = {}
    for name, fn in fns.items():
        y = torch.as_tensor(fn(x))
        errs[name] = float((y - F.linear(x, refs[name], b)).abs().max())
    return fns, errs


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def section_linear(args) -> dict:
    shapes = (BERT[1:2] if args.quick else BERT + MINILM)
    rows = []
    print(f"\n## linear: time / torch dense time, {args.threads} threads, {args.clock} clock, medians of {args.runs} "
          "interleaved rounds; "
          f"CSR/BSR at density {args.density}, 2:4 at 0.5, 1:4 at 0.25")
    header = None
    for n, k in shapes:
        fns, errs = linear_fns(n, k, args.density, args.threads)
        bad = {kname: e for kname, e in errs.items() if e > 1e-3 * max(1.0, k ** 0.5)}
        if bad:
            raise SystemExit(f"kernels disagree with torch for W {n}x{k}: {bad}")
        for m in args.m:
            x = torch.randn(m, k)
            t = interleaved_ms(fns, x, runs=args.runs, clock=_clock(args))
            ratios = {kname: v / t["torch"] for kname, v in t.items()}
            if header is None:
                header = list(ratios)
                print("| W (N x K) | M | torch ms | " + " | ".join(h for h in header if h != "torch") + " |")
                print("|---|---|---|" + "---|" * (len(header) - 1))
            print(f"| {n}x{k} | {m} | {t['torch']:.3f} | "
                  + " | ".join(f"{ratios[h]:.2f}" for h in header if h != "torch") + " |", flush=True)
            rows.append({"n": n, "k": k, "m": m, "ms": t, "ratio": ratios})
    return {"density": args.density, "rows": rows, "columns": header}


def section_unstructured(args) -> dict:
    shapes = (BERT[1:2] if args.quick else MINILM + BERT)
    ms = (128,) if args.quick else (1, 16, 128, 1024)
    print(f"\n## unstructured: time / torch dense time, {args.threads} threads, {args.clock} clock, medians of "
          f"{args.runs} interleaved rounds; DeepSparse 1.8 on the same weights right after, in its own process")
    rows, cases = [], []
    for n, k in shapes:
        for density in (0.5, 0.3, 0.1):
            g = torch.Generator().manual_seed(n * k)
            w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < density)
            b = torch.randn(n, generator=g)
            fns = {"torch": lambda x, w=w: F.linear(x, w, b),
                   "csr": SparseLinear(BlockSparseMatrix.from_dense(w, (1, 1)), b, eager=True),
                   "xcsr": XCSRLinear(RowSparseMatrix.from_dense(w), b)}
            for m in ms:
                x = torch.randn(m, k, generator=g)
                ref = F.linear(x, w, b)
                for name, fn in fns.items():
                    err = float((fn(x) - ref).abs().max())
                    if err > 1e-3 * max(1.0, k ** 0.5):
                        raise SystemExit(f"{name} disagrees with torch for W {n}x{k}, M={m}: {err}")
                t = interleaved_ms(fns, x, runs=args.runs, clock=_clock(args))
                r = {kname: v / t["torch"] for kname, v in t.items()}
                print(f"  {n}x{k} M={m} density {density}: torch {t['torch']:.3f} ms, csr {r['csr']:.2f}, "
                      f"xcsr {r['xcsr']:.2f}", flush=True)
                rows.append({"n": n, "k": k, "m": m, "density": density, "ms": t, "ratio": r})
                if not args.no_deepsparse:
                    cases.append((f"w{n}x{k}_d{density}_m{m}", w, b, x, ref))
    ds, why = deepsparse_layers(cases, args.threads, args.runs) if cases else ({}, "--no-deepsparse")
    if why:
        print(f"DeepSparse skipped: {why}")
    print("| W (N x K) | M | density | torch ms | csr | xcsr | DeepSparse | xcsr / DeepSparse time |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        d = ds.get(f"w{row['n']}x{row['k']}_d{row['density']}_m{row['m']}")
        if d:
            row["ms"]["deepsparse"], row["ratio"]["deepsparse"] = d["ms"], d["ms"] / row["ms"]["torch"]
            row["deepsparse_max_diff"] = d["max_diff"]
        r = row["ratio"]
        ds_cols = (f"{r['deepsparse']:.2f} | {r['xcsr'] / r['deepsparse']:.2f}" if d else "- | -")
        print(f"| {row['n']}x{row['k']} | {row['m']} | {row['density']} | {row['ms']['torch']:.3f} | "
              f"{r['csr']:.2f} | {r['xcsr']:.2f} | {ds_cols} |")
    return {"rows": rows, "deepsparse": why or "ran"}


def section_batched(args) -> dict:
    """(B, S, K) with a shared weight: one folded call vs a call per sequence."""
    print(f"\n## batched: X (B, S, K), W shared; ms and ratio to torch dense on (B, S, K), {args.threads} threads")
    print("| W (N x K) | B x S | pattern | torch ms | folded (one call) | per sequence (B calls) |")
    print("|---|---|---|---|---|---|")
    rows = []
    shapes = BERT[1:2] if args.quick else [BERT[1], MINILM[1]]
    for n, k in shapes:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g)
        wn = nm_prune_weight(w, 2, 4)
        mods = {"2:4": NMLinear(NMSparseMatrix.from_dense(wn, 2, 4), b, eager=True),
                "16x1": SparseLinear(BlockSparseMatrix.from_dense(BSR.calibration_weight((16, 1), n, k, 0.5), (16, 1)),
                                     b, eager=True)}
        for bsz, seq in ((8, 16), (4, 33)):
            x = torch.randn(bsz, seq, k)
            for pname, mod in mods.items():
                fns = {"torch": lambda t: F.linear(t, w, b), "folded": mod,
                       "per_seq": lambda t, mod=mod: [mod(t[i]) for i in range(t.shape[0])]}
                tm = interleaved_ms(fns, x, runs=args.runs, clock=_clock(args))
                print(f"| {n}x{k} | {bsz}x{seq} | {pname} | {tm['torch']:.3f} | {tm['folded'] / tm['torch']:.2f} | "
                      f"{tm['per_seq'] / tm['torch']:.2f} |", flush=True)
                rows.append({"n": n, "k": k, "b": bsz, "s": seq, "pattern": pname, "ms": tm})
    return {"rows": rows}


def _external(name: str, args) -> dict:
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.exists():
        print(f"\n## {name}: skipped (benchmarks/{name}.py does not exist yet)")
        return {"skipped": f"benchmarks/{name}.py missing"}
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "run"):
        print(f"\n## {name}: skipped (benchmarks/{name}.py has no run(args))")
        return {"skipped": "no run(args)"}
    sub = args
    if hasattr(mod, "parse_args"):  # its own options, with our threads and rounds; its files beside ours
        base = ["--threads", str(args.threads), "--runs", str(args.runs)]
        try:
            sub = mod.parse_args(base + ["--out", f"{args.out}_{name}"])
        except SystemExit:  # no --out option: it writes where it always does
            sub = mod.parse_args(base)
    print(f"\n## {name} (benchmarks/{name}.py)")
    out = mod.run(sub)
    return out if isinstance(out, dict) else {"result": str(out)}


def section_conv(args) -> dict:
    return _external("conv", args)


def section_tune(args) -> dict:
    return _external("tune", args)


def section_attention(args) -> dict:
    from sparsecc.runtime.attention import attention_bmm, attention_fused

    heads, dim, seq = 12, 32, 128
    print(f"\n## attention: time / torch scaled_dot_product_attention time, {args.threads} threads, {args.clock} "
          f"clock, medians of {args.runs} interleaved rounds; {heads} heads, head dim {dim}, seq {seq}, bool mask")
    rows = []
    for b in (1, 8):
        g = torch.Generator().manual_seed(b)
        # as the projections leave them: (B, S, H·D) viewed (B, S, H, D), transposed to (B, H, S, D)
        q, k, v = (torch.randn(b, seq, heads * dim, generator=g).view(b, seq, heads, dim).transpose(1, 2)
                   for _ in range(3))
        mask = torch.ones(b, 1, seq, seq, dtype=torch.bool)
        mask[..., 100:] = False  # padded keys
        fns = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               "bmm": lambda: attention_bmm(q, k, v, mask), "fused": lambda: attention_fused(q, k, v, mask)}
        ref = fns["torch"]()
        diff = {name: float((fn() - ref).abs().max()) for name, fn in fns.items() if name != "torch"}
        t = interleaved_ms(fns, runs=args.runs, clock=_clock(args))
        r = {name: ms / t["torch"] for name, ms in t.items()}
        print(f"  batch {b}: torch {t['torch']:.3f} ms, two matmuls {r['bmm']:.2f}, fused {r['fused']:.2f} "
              f"(max diff {max(diff.values()):.1e})", flush=True)
        rows.append({"batch": b, "ms": t, "ratio": r, "max_diff": diff})
    return {"rows": rows}


SECTIONS = {"linear": section_linear, "unstructured": section_unstructured, "batched": section_batched,
            "attention": section_attention, "conv": section_conv, "tune": section_tune}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", action="append", choices=list(SECTIONS), help="repeatable; default: all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30, help="interleaved rounds per cell")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 128], help="rows of X")
    p.add_argument("--density", type=float, default=0.5, help="density of the CSR/BSR weights")
    p.add_argument("--quick", action="store_true", help="one weight shape per section")
    p.add_argument("--no-deepsparse", action="store_true", help="unstructured section: skip DeepSparse")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (time.process_time), robust to other jobs stealing the "
                        "cores; only meaningful with --threads 1 (spinning pool threads would count)")
    p.add_argument("--out", default=None,
                   help="results path without extension (default: benchmarks/results/kernels, or kernels_<section> "
                        "when one section runs)")
    p.add_argument("--note", default="", help="a line written at the top of the results (e.g. machine load)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    sections = args.section or list(SECTIONS)
    t0 = time.time()
    res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
           "clock": args.clock, "note": args.note,
           "runs": args.runs, "command": "python benchmarks/kernel_speed.py " + " ".join(argv if argv else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "sections": {}}
    log = []
    for name in sections:
        import contextlib
        import io

        buf = io.StringIO()

        class Tee(io.TextIOBase):
            def write(self, s):
                sys.__stdout__.write(s)
                buf.write(s)
                return len(s)

        with contextlib.redirect_stdout(Tee()):
            res["sections"][name] = SECTIONS[name](args)
        log.append(buf.getvalue())
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out) if args.out else RESULTS / ("kernels" if len(sections) != 1 else f"kernels_{sections[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(
        f"# benchmarks/kernel_speed.py ({res['date']}, {args.threads} threads, {args.runs} interleaved rounds)\n\n"
        f"`{res['command']}`; ratios = time / torch dense time in the same rounds (lower is better); "
        "shared noisy machine.\n" + (f"\n{args.note}\n" if args.note else "") + "".join(log))
    print(f"\nwrote {out.with_suffix('.md')} and .json in {res['seconds']} s")
    return res


if __name__ == "__main__":
    main()
