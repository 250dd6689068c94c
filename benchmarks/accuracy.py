"""Accuracy vs sparsity vs measured latency: sparsify + compile on real data.

Fashion-MNIST (Debian package ``dataset-fashion-mnist``, fetched and cached by
:mod:`sparsecc.datasets`) with :class:`sparsecc.zoo.FashionCNN` trained dense
once (2 epochs, cached). For every method (magnitude, impact, movement) and
schedule (one-shot + fine-tuning, gradual, RigL) at the same fine-tuning budget,
the pruned model's test accuracy; each pruned model compiled with sparsecc for
x86 and timed against the dense model in torch in the same run (medians,
interleaved). Also one-shot magnitude without fine-tuning, uniform block-sparse
models (the x86 block shape) and the per-layer choice under
``accuracy_budget=0.005``.

Writes ``benchmarks/results/accuracy_fashion.{json,md,png}``.

Run::

    python benchmarks/accuracy.py fashion            # ~25 min on 2 cores
    python benchmarks/accuracy.py fashion --quick    # digits, a few minutes
    python benchmarks/accuracy.py minilm             # distillation of all-MiniLM-L6-v2 (see --help)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sparsecc  # noqa: E402
from sparsecc import datasets, zoo  # noqa: E402
from sparsecc.runtime.timing import interleaved_ms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def fashion(args) -> None:
    torch.set_num_threads(args.threads)
    if args.quick:
        xtr, ytr = datasets.digits("train")
        xte, yte = datasets.digits("test")
        dense = zoo.pretrained("digits_cnn")
        n_calib, batch = 300, 64
        sparsities, name = [0.8, 0.9], "digits"
    else:
        xtr, ytr = datasets.fashion_mnist("train")
        xte, yte = datasets.fashion_mnist("test")
        dense = zoo.pretrained("fashion_cnn")
        n_calib, batch = 5000, 128
        sparsities, name = [0.8, 0.9], "fashion"
    dense.eval()
    # calibration split (sensitivity, budgets) carved from the training set; the test set stays unseen
    calib = (xtr[-n_calib:], ytr[-n_calib:])
    train = datasets.loader(xtr[:-n_calib], ytr[:-n_calib], batch, shuffle=True, seed=0)
    steps = int(args.epochs * len(train))
    eval_fn = lambda m: zoo.accuracy(m, calib) / 100.0  # noqa: E731
    test_acc = lambda m: zoo.accuracy(m, (xte, yte))  # noqa: E731
    dense_acc = test_acc(dense)
    print(f"{name}: dense test accuracy {dense_acc:.2f}%  (fine-tuning budget {steps} steps = {args.epochs} epochs "
          f"of batch {batch}, Adam lr {args.lr})", flush=True)
    common = dict(target="x86", data=train, loss_fn=F.cross_entropy, eval_fn=eval_fn, lr=args.lr, progress=False)

    rows = []
    store = model_store(name)
    store.mkdir(parents=True, exist_ok=True)

    def record(label, method, schedule, pattern, target_sparsity, sp_model, sp=None, extra=None):
        acc = test_acc(sp_model)
        sparsity = sp.sparsity if sp is not None else target_sparsity
        row = dict(label=label, method=method, schedule=schedule, pattern=pattern, target_sparsity=target_sparsity,
                   sparsity=round(sparsity, 4), test_acc=round(acc, 2), drop_pt=round(dense_acc - acc, 2),
                   latency={}, model=f"{len(rows)}.pt",
                   layers={c.name: [c.pattern, round(c.density, 4)] for c in sp.layers} if sp is not None else {},
                   seconds=round(sp.seconds, 1) if sp is not None else 0.0)
        if extra:
            row.update(extra)
        torch.save(sp_model.state_dict(), store / row["model"])
        rows.append(row)
        print(f"{label:<34} sparsity {sparsity:.3f}  acc {acc:6.2f}%  drop {dense_acc - acc:+5.2f} pt", flush=True)
        return row

    # ---- the dense model fine-tuned with the same budget (is a sparse model's gain only more training?)
    sp = sparsecc.sparsify(dense, xte[:1], sparsity=0.0, pattern="unstructured", schedule="oneshot",
                           finetune_steps=steps, **common)
    record("dense + same fine-tuning", "none", "finetune", "dense", 0.0, sp.model, sp)
    # ---- one-shot magnitude without fine-tuning
    for s in sparsities:
        sp = sparsecc.sparsify(dense, xte[:1], target="x86", sparsity=s, pattern="unstructured",
                               schedule="oneshot", progress=False)
        record("magnitude one-shot, no fine-tune", "magnitude", "oneshot-noft", "unstructured", s, sp.model, sp)
    # ---- methods x schedules at the same fine-tuning budget, unstructured, one threshold over all layers
    for s in sparsities:
        for method, schedule in (("magnitude", "oneshot"), ("magnitude", "gradual"), ("impact", "gradual"),
                                 ("movement", "gradual")):
            sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="unstructured", method=method,
                                   schedule=schedule, allocation="global", finetune_steps=steps, **common)
            record(f"{method} {schedule}", method, schedule, "unstructured", s, sp.model, sp)
        # RigL drops by magnitude and grows by gradient (its own criterion)
        sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="unstructured", schedule="rigl",
                               allocation="global", finetune_steps=steps, **common)
        record("rigl (global magnitude init)", "rigl", "rigl", "unstructured", s, sp.model, sp)
        if args.full:
            sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="unstructured", schedule="rigl",
                                   layer_densities="erk", finetune_steps=steps, **common)
            record("rigl (ERK)", "rigl", "rigl-erk", "unstructured", s, sp.model, sp)
            for method in ("impact", "movement"):
                sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="unstructured", method=method,
                                       schedule="oneshot", allocation="global", finetune_steps=steps, **common)
                record(f"{method} oneshot", method, "oneshot", "unstructured", s, sp.model, sp)
            sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="unstructured", method="magnitude",
                                   schedule="gradual", allocation="uniform", finetune_steps=steps, **common)
            record("magnitude gradual, uniform layers", "magnitude", "gradual", "unstructured", s, sp.model, sp)
    # ---- uniform block sparsity (the x86 block shape), gradual: the latency reference
    uniform = []
    for s in (0.7, 0.8, 0.9, 0.95):
        sp = sparsecc.sparsify(dense, xte[:1], sparsity=s, pattern="block", method="magnitude", schedule="gradual",
                               finetune_steps=steps, **common)
        pat = max(sp.layers, key=lambda c: math.prod(c.shape)).pattern  # the largest layer's
        uniform.append(record(f"uniform {pat} gradual", "magnitude", "gradual", pat, s, sp.model, sp))
    # ---- per-layer choice under an accuracy budget
    sp = sparsecc.sparsify(dense, xte[:1], accuracy_budget=args.budget, pattern="auto", method="magnitude",
                           schedule="gradual", finetune_steps=steps, search_rounds=4, **common)
    print(sp.report(), flush=True)
    record(f"accuracy_budget={args.budget}", "magnitude", "gradual", "auto", None, sp.model, sp,
           extra={"rounds": sp.rounds, "calib_drop": round(sp.metric_dense - sp.metric_sparse, 4)})

    out = {"dataset": name, "dense_test_acc": dense_acc, "epochs": args.epochs, "lr": args.lr,
           "threads": args.threads, "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{name}.json").write_text(json.dumps(out, indent=1))
    if not args.no_latency:
        latency_phase(args)


def model_store(name: str) -> Path:
    from sparsecc.cache import cache_root

    return cache_root() / "bench" / f"accuracy_{name}"


def latency_phase(args) -> None:
    """Compile every model of the accuracy phase for x86 and time it against the dense model in torch."""
    torch.set_num_threads(args.threads)
    name = "digits" if args.quick else "fashion"
    out = json.loads((RESULTS / f"accuracy_{name}.json").read_text())
    rows = out["rows"]
    dense = zoo.pretrained("digits_cnn" if args.quick else "fashion_cnn").eval()
    xte, _ = datasets.digits("test") if args.quick else datasets.fashion_mnist("test")
    x_lat = {1: xte[:1].contiguous(), args.batch: xte[:args.batch].contiguous()}
    store = model_store(name)
    print(f"latency: {args.threads} threads, medians of {args.runs} interleaved runs (torch dense vs sparsecc)")
    for r in rows:
        model = (zoo.DigitsCNN() if args.quick else zoo.FashionCNN()).eval()
        model.load_state_dict(torch.load(store / r["model"]))
        lat = {}
        for b, xb in x_lat.items():
            cm = sparsecc.compile(model, xb, target="x86")
            t = interleaved_ms({"dense": dense, "sparse": cm}, xb, runs=args.runs)
            lat[str(b)] = {"dense_ms": t["dense"], "sparsecc_ms": t["sparse"]}
        r["latency"] = lat
        print(f"{r['label']:<34} sparsity {r['sparsity']:.3f}  " + "  ".join(
            f"b{b}: {v['dense_ms'] / v['sparsecc_ms']:.2f}x ({v['sparsecc_ms']:.3f} ms)" for b, v in lat.items()),
            flush=True)
    # the budget model against every other fine-tuned model of the same or better test accuracy (uniform block
    # sparsity, and the unstructured ones, which compile to dense kernels where CSR loses)
    b = str(args.batch)
    budget_row = next(r for r in rows if r["label"].startswith("accuracy_budget"))
    ratio = lambda r, bb: r["latency"][bb]["dense_ms"] / r["latency"][bb]["sparsecc_ms"]  # noqa: E731
    others = [r for r in rows if r is not budget_row and r["schedule"] != "oneshot-noft" and r["sparsity"] > 0]
    same = [r for r in others if r["test_acc"] >= budget_row["test_acc"] - 0.05]
    lines = [f"budget model: sparsity {budget_row['sparsity']}, {budget_row['test_acc']:.2f}%, "
             f"{ratio(budget_row, '1'):.2f}x (batch 1) / {ratio(budget_row, b):.2f}x (batch {b}) faster than dense"]
    uni = [r for r in others if r["label"].startswith("uniform")]
    if uni:
        best_uni = max(uni, key=lambda r: r["test_acc"])
        lines.append(f"most accurate uniform block model: {best_uni['label']} sparsity {best_uni['sparsity']}, "
                     f"{best_uni['test_acc']:.2f}%, {ratio(best_uni, '1'):.2f}x / {ratio(best_uni, b):.2f}x")
    if same:
        for bb in ("1", b):
            fastest = max(same, key=lambda r: ratio(r, bb))
            lines.append(f"fastest other model within 0.05 pt of the budget model's accuracy at batch {bb}: "
                         f"{fastest['label']} sparsity {fastest['sparsity']}, {fastest['test_acc']:.2f}%, "
                         f"{ratio(fastest, bb):.2f}x")
    cmp_line = "\n".join(lines)
    print(cmp_line)
    out["budget_vs_uniform"] = cmp_line
    out["latency_command"] = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    write_outputs(name, out, args)


def write_outputs(name: str, out: dict, args) -> None:
    rows, dense_acc, b = out["rows"], out["dense_test_acc"], str(args.batch)
    (RESULTS / f"accuracy_{name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# {name}: accuracy vs sparsity vs latency", "",
             f"Dense test accuracy {dense_acc:.2f}%. Fine-tuning budget {out['epochs']} epoch(s), Adam lr {out['lr']}; "
             f"{args.threads} threads; latency medians of {args.runs} interleaved runs, ratio = torch dense / sparsecc "
             f"in the same run.", "",
             f"| run | sparsity | test acc % | drop pt | b1 dense/sparsecc | b{b} dense/sparsecc | b{b} sparsecc ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency"]
        f1 = f"{lat['1']['dense_ms'] / lat['1']['sparsecc_ms']:.2f}x" if "1" in lat else "-"
        fb = f"{lat[b]['dense_ms'] / lat[b]['sparsecc_ms']:.2f}x" if b in lat else "-"
        ms = f"{lat[b]['sparsecc_ms']:.3f}" if b in lat else "-"
        lines.append(f"| {r['label']} | {r['sparsity']:.3f} | {r['test_acc']:.2f} | {r['drop_pt']:+.2f} | {f1} | {fb} | {ms} |")
    lines += ["", out.get("budget_vs_uniform", ""), "", "Accuracy: `" + out["command"] + "`",
              "Latency: `" + out.get("latency_command", "") + "`"]
    (RESULTS / f"accuracy_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(name, dense_acc, rows, b)


def plot(name: str, dense_acc: float, rows: list, b: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    markers = "os^vD<>pPX*h"
    for i, (label, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["sparsity"])
        m = markers[i % len(markers)]
        ax1.plot([r["sparsity"] for r in rs], [r["test_acc"] for r in rs], marker=m, label=label)
        pts = [(r["latency"][b]["sparsecc_ms"], r["test_acc"]) for r in rs if b in r["latency"]]
        if pts:
            ax2.plot(*zip(*sorted(pts)), marker=m, linestyle="", label=label)
    dense_ms = [r["latency"][b]["dense_ms"] for r in rows if b in r["latency"]]
    for ax in (ax1, ax2):
        ax.axhline(dense_acc, color="k", linestyle="--", linewidth=0.8, label="dense")
        ax.axhline(dense_acc - 0.5, color="gray", linestyle=":", linewidth=0.8, label="dense - 0.5 pt")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(0.0, min(r["test_acc"] for r in rows) - 2), dense_acc + 1.5)
        ax.grid(alpha=0.3)
    if dense_ms:
        ax2.axvline(statistics.median(dense_ms), color="k", linestyle="-.", linewidth=0.8, label="torch dense")
    ax1.set_xlabel("sparsity of the prunable layers")
    ax2.set_xlabel(f"latency at batch {b}, ms (sparsecc on x86)")
    ax1.set_title(f"{name}: accuracy vs sparsity")
    ax2.set_title(f"{name}: accuracy vs measured latency")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"accuracy_{name}.png", dpi=110)
    print(f"wrote {RESULTS / f'accuracy_{name}.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fashion", help="Fashion-MNIST CNN grid (or digits with --quick)")
    f.add_argument("--quick", action="store_true", help="digits instead of Fashion-MNIST")
    f.add_argument("--epochs", type=float, default=1.0, help="fine-tuning budget per run, in epochs")
    f.add_argument("--lr", type=float, default=5e-4)
    f.add_argument("--budget", type=float, default=0.005, help="accuracy budget (fraction, 0.005 = 0.5 pt)")
    f.add_argument("--batch", type=int, default=64, help="batch of the second latency column")
    f.add_argument("--runs", type=int, default=30)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--no-latency", action="store_true", help="accuracy phase only")
    f.add_argument("--full", action="store_true",
                   help="also RigL with ERK, one-shot impact/movement and uniform layer sparsity (~2x longer)")
    f.add_argument("--latency-only", action="store_true",
                   help="time the models of an earlier accuracy phase (on a quiet machine)")
    f.set_defaults(fn=lambda a: latency_phase(a) if a.latency_only else fashion(a))
    m = sub.add_parser("minilm", help="all-MiniLM-L6-v2 at 80%% sparsity, distilled on fortunes")
    m.add_argument("--sparsity", type=float, default=0.8)
    m.add_argument("--pattern", default="block")
    m.add_argument("--block", default=None, help="block shape, e.g. 8x1 (default: the x86 target's choice)")
    m.add_argument("--method", default="magnitude")
    m.add_argument("--steps", type=int, default=600)
    m.add_argument("--lr", type=float, default=1e-4)
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--max-len", type=int, default=64)
    m.add_argument("--runs", type=int, default=10)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory (sparsecc.runtime.memory), for every model timed")
    m.add_argument("--reuse", action="store_true", help="reuse the student distilled by an earlier identical run")
    m.add_argument("--reconstruct", action="store_true",
                   help="one-shot layer-wise pruning with least-squares reconstruction, then distillation "
                        "with fixed masks (default: gradual pruning during distillation)")
    m.add_argument("--calib", type=int, default=8, help="calibration batches of --reconstruct")
    m.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    m.add_argument("--decay", choices=["none", "cosine"], default="none",
                   help="lr after the warm-up: constant, or cosine decay to 0 at the last step")
    m.add_argument("--allocation", default="uniform", choices=["uniform", "error"],
                   help="per-layer densities: all equal, or by output error (needs --reconstruct)")
    m.add_argument("--densities", default="0.05,0.08,0.1,0.13,0.16,0.2,0.25,0.3,0.35,0.4,0.5,0.6",
                   help="candidate per-layer densities of --allocation error")
    m.set_defaults(fn=minilm)
    args = p.parse_args()
    args.fn(args)


def minilm(args) -> None:
    from benchmarks.minilm_distill import run

    run(args)


if __name__ == "__main__":
    main()
