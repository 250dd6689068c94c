"""Main job: all-MiniLM-L6-v2 pruned as far as a fidelity budget allows, compiled for x86, fidelity and speed side by side.

1. ``sparsecc.sparsify`` prunes the model one-shot with SparseGPT and least-squares reconstruction on
   calibration quotes (Debian ``fortunes``, train split), searching the fastest plan whose measured fidelity
   stays within ``--budget`` (mean cosine of the sentence embeddings to the dense model's on validation quotes
   of the train split): first uniform plans of each pattern (unstructured, blocks, 2:4) over the sparsity,
   then per-layer patterns and densities chosen from each layer's output error. It runs once and is cached.
2. A short distillation (cached; ``--distill-steps``, 0 to skip) trains the pruned model's remaining weights
   towards the dense model's embeddings on train quotes, its zeros kept; the fidelity before it is printed too.
3. ``sparsecc.compile`` compiles the pruned model (formats per layer by the cost model and measurement).
4. Fidelity on held-apart data: the mean cosine to the dense embeddings on the held-out quotes, and the
   accuracy on a labeled task that ships offline, the topic of a quote (which of 8 fortune files it comes
   from: ``sparsecc.datasets.fortunes_topics``), with a logistic-regression head trained on the dense
   model's embeddings of the train split and applied unchanged to the compiled model's.
5. Latency at batch 1 and 8, seq 128, of torch dense, onnxruntime dense (when installed) and sparsecc, in
   the same interleaved rounds; weight memory.

A second row, labelled "speed at any cost", compiles the same model at 90% sparsity in 16x1 blocks
(magnitude pruning, no recovery): fast, and no longer the same model.

Run: ``make demo`` (or ``python examples/minilm.py --budget 0.08 --runs 10``; ``--fresh`` re-runs the search).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.cache import cache_root
from sparsecc.peers import Hidden, onnx_export, ort_session
from sparsecc.runtime.compiled import module_bytes
from sparsecc.runtime.timing import interleaved_ms
from sparsecc.sparsify.distill import distill_encoder

SEQ = 128
#: Bump when the search's recipe changes: the cached pruned weights are keyed by it.
RECIPE_VERSION = 2
#: Bump when the distillation's recipe changes (its cache is keyed by it and by the pruned weights).
DISTILL_VERSION = 1


def encode(tok, sentences, **kw):
    enc = tok(sentences, return_tensors="pt", truncation=True, max_length=SEQ, **({"padding": True} | kw))
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embeddings(run, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe) of every batch."""
    out = []
    with torch.no_grad():
        for enc in batches:
            o = run(**enc)
            hidden = o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]
            out.append(zoo.mean_pool(hidden, enc["attention_mask"]))
    return torch.cat(out)


def batched(tok, sentences, size=64):
    return [encode(tok, sentences[i:i + size]) for i in range(0, len(sentences), size)]


def train_head(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """Multinomial logistic regression on embeddings (L-BFGS, weight decay 1e-3)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def accuracy(head, x, y) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def search(model, tok, args):
    """The budget search of ``sparsify`` (cached): returns (pruned model, its SparsifyResult summary)."""
    train = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(train)
    # calibration quotes in batches of similar length (little padding: fewer tokens to run, and the layer
    # statistics see real tokens, not padding)
    pool = sorted(train[:args.calib * 64], key=lambda s: len(tok(s)["input_ids"]))
    calib = [encode(tok, pool[i * 64:(i + 1) * 64]) for i in range(args.calib)]
    val = batched(tok, train[-args.val:])
    val_ref = embeddings(model, val)

    def fidelity(m):
        return float(F.cosine_similarity(embeddings(m, val), val_ref, dim=-1).mean())

    key = json.dumps({"v": RECIPE_VERSION, "batch": 64, "budget": args.budget, "calib": args.calib, "val": args.val,
                      "patterns": args.pattern, "torch": torch.__version__, "sparsecc": sparsecc.__version__})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_root() / "models" / f"minilm-budget-{digest}.pt"
    pruned = copy.deepcopy(model)
    if path.is_file() and not args.fresh:
        saved = torch.load(path, weights_only=True)
        pruned.load_state_dict(saved["state_dict"])
        print(f"pruned weights from the cache ({path}; --fresh re-runs the search)")
        return pruned, saved["summary"]
    t0 = time.perf_counter()
    res = sparsecc.sparsify(model, calib[0], target="x86", accuracy_budget=args.budget, pattern=args.pattern,
                            method="sparsegpt", reconstruct=True, schedule="oneshot", data=[(e, e) for e in calib],
                            calib_batches=args.calib, eval_fn=fidelity, progress=True)
    summary = {"rounds": [{k: r[k] for k in ("pattern", "sparsity", "drop", "pred_ms", "passed", "patterns") if k in r}
                          for r in res.rounds],
               "metric_dense": res.metric_dense, "metric_sparse": res.metric_sparse,
               "seconds": time.perf_counter() - t0}
    pruned = res.model
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        torch.save({"state_dict": pruned.state_dict(), "summary": summary}, f)
    os.replace(f.name, path)
    return pruned, summary


def distill(model, pruned, tok, args):
    """A short distillation of the pruned model to the dense one (cached): its zeros stay zeros.

    Student: the pruned model, trained with AdamW (lr ``--distill-lr``) for ``--distill-steps`` steps of 32
    train quotes (the validation quotes of the search excluded). Loss: ``1 - cos`` of the sentence embeddings
    plus the mean squared error of the last hidden states over real tokens, against the dense model's. After
    every step the pruned weights are multiplied by their masks again, so the sparsity pattern (and the
    compiled kernels' work) does not change. Returns (model, seconds or None when read from the cache).
    """
    masks = {n: p != 0 for n, p in pruned.named_parameters() if p.dim() == 2 and float((p == 0).float().mean()) > 0.2}
    key = json.dumps({"v": DISTILL_VERSION, "steps": args.distill_steps, "lr": args.distill_lr,
                      "weights": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                                         for p in pruned.parameters())).hexdigest()})
    path = cache_root() / "models" / f"minilm-distilled-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    student = copy.deepcopy(pruned)
    if path.is_file() and not args.fresh:
        student.load_state_dict(torch.load(path, weights_only=True))
        print(f"distilled weights from the cache ({path})")
        return student.eval(), None
    train = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(train)
    pool = train[:-args.val]
    t0 = time.perf_counter()
    distill_encoder(student, model, lambda step: encode(tok, [pool[(step * 32 + i) % len(pool)] for i in range(32)]),
                    args.distill_steps, args.distill_lr, masks=masks, log=lambda s: print(s, flush=True))
    student.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        torch.save(student.state_dict(), f)
    os.replace(f.name, path)
    return student, time.perf_counter() - t0


def onnxruntime_fn(model, enc, threads):
    """onnxruntime on the ONNX export of ``model`` (None, with the reason printed, where it cannot run)."""
    path = Path(tempfile.mkdtemp(prefix="sparsecc-demo-")) / "model.onnx"
    try:
        onnx_export(model, enc, path, dynamic_batch=True)
    except Exception as e:  # onnx missing, or the exporter refuses the model
        print(f"onnxruntime column skipped: ONNX export failed ({type(e).__name__}: {e}); pip install -e .[bench]")
        return None
    fn = ort_session(path, threads)
    if fn is None:
        print("onnxruntime column skipped: pip install -e .[bench]")
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.08,
                    help="largest allowed drop of the validation cosine to the dense embeddings")
    ap.add_argument("--pattern", default="auto", help="sparsify's pattern= (auto: unstructured, 2:4, blocks)")
    ap.add_argument("--calib", type=int, default=16, help="calibration batches of 64 quotes")
    ap.add_argument("--val", type=int, default=256, help="validation quotes (train split) of the search")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="re-run the search instead of reading its cache")
    ap.add_argument("--no-speed-row", action="store_true", help="skip the 90%% 16x1 'speed at any cost' row")
    ap.add_argument("--distill-steps", type=int, default=400,
                    help="steps of the short distillation after pruning (0: none)")
    ap.add_argument("--distill-lr", type=float, default=5e-5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = zoo.minilm()
    pruned, summary = search(model, tok, args)
    print(f"\nbudget search (validation cosine to dense, drop allowed {args.budget}):")
    for r in summary["rounds"]:
        print(f"  {r['pattern']:>12} at sparsity {r['sparsity']:.2f}: cosine drop {r['drop']:.4f} -> "
              f"{'within' if r['passed'] else 'over'} budget (predicted {r['pred_ms']:.1f} ms of linears)"
              + (" [" + ", ".join(f"{k}: {v} layers" for k, v in sorted(r["patterns"].items())) + "]"
                 if "patterns" in r else ""))

    one_shot = pruned
    if args.distill_steps:
        pruned, secs = distill(model, one_shot, tok, args)
        if secs is not None:
            print(f"distilled in {secs:.0f} s ({args.distill_steps} steps)")

    example = encode(tok, datasets.fortunes_sentences("heldout")[:8], padding="max_length")
    batch, seqd = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dyn = {k: {0: batch, 1: seqd} for k in example}
    points = {"sparsecc (budget point)": pruned}
    if not args.no_speed_row:
        points["sparsecc (speed at any cost: 90% 16x1, magnitude)"] = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    compiled = {name: sparsecc.compile(m, example, target="x86", pattern="auto", dynamic_shapes=dyn)
                for name, m in points.items()}
    cm = compiled["sparsecc (budget point)"]
    print()
    print(cm.report())

    # fidelity on held-apart data
    held = batched(tok, datasets.fortunes_sentences("heldout"))
    tr_s, tr_y, cats = datasets.fortunes_topics("train")
    te_s, te_y, _ = datasets.fortunes_topics("heldout")
    e_dense = embeddings(model, held)
    head = train_head(embeddings(model, batched(tok, tr_s)), tr_y, len(cats))
    te_b = batched(tok, te_s)
    acc_dense = accuracy(head, embeddings(model, te_b), te_y)
    fid = {"torch dense": (1.0, acc_dense)}
    if args.distill_steps:  # what the distillation bought: the one-shot pruned model, in torch
        fid["one-shot pruned, before distillation (torch)"] = (
            float(F.cosine_similarity(embeddings(one_shot, held), e_dense, dim=-1).mean()),
            accuracy(head, embeddings(one_shot, te_b), te_y))
    for name, c in compiled.items():
        e = embeddings(c, held)
        with torch.no_grad():  # the compiled model computes what its pruned torch model computes
            diff = max(float((c(**b).last_hidden_state - points[name](**b).last_hidden_state).abs().max())
                       for b in held[:2])
        fid[name] = (float(F.cosine_similarity(e, e_dense, dim=-1).mean()), accuracy(head, embeddings(c, te_b), te_y))
        print(f"{name}: max abs diff to its pruned torch model {diff:.1e}")
    print(f"\nheld-apart data: {len(datasets.fortunes_sentences('heldout'))} held-out quotes (cosine); topic task "
          f"{len(te_s)} held-out quotes of {len(cats)} fortune files ({', '.join(cats)}), head trained on "
          f"{len(tr_s)} train quotes' dense embeddings")

    # latency, same interleaved rounds
    ms, ort = {}, onnxruntime_fn(model, example, args.threads)
    with torch.no_grad():
        for b in (1, 8):
            enc = encode(tok, (datasets.fortunes_sentences("heldout") * 8)[:b], padding="max_length")
            fns = {"torch dense": Hidden(model)}
            if ort is not None:
                fns["onnxruntime dense"] = ort
            for name, c in compiled.items():
                fns[name] = (lambda c: lambda **e: c(**e))(c)
            ms[b] = interleaved_ms(fns, runs=args.runs, **enc)
    mib = {"torch dense": module_bytes(model), "onnxruntime dense": module_bytes(model)}
    mib |= {name: c.weight_bytes for name, c in compiled.items()}

    print(f"\nall-MiniLM-L6-v2, seq {SEQ}, {args.threads} threads, median of {args.runs} interleaved runs; "
          f"speed-up = torch dense time / time")
    head_ = ("engine", "held-out cosine", "topic accuracy", "batch 1 ms", "speed-up", "batch 8 ms", "speed-up",
             "weights MiB")
    rows = [head_]
    for name in ms[1]:
        cos, acc = fid.get(name, fid["torch dense"] if name == "onnxruntime dense" else (None, None))
        rows.append((name, f"{cos:.3f}", f"{100 * acc:.1f}%", f"{ms[1][name]:.1f}",
                     f"{ms[1]['torch dense'] / ms[1][name]:.2f}x", f"{ms[8][name]:.1f}",
                     f"{ms[8]['torch dense'] / ms[8][name]:.2f}x", f"{mib[name] / 2**20:.1f}"))
    for name, (cos, acc) in fid.items():  # fidelity-only rows (not compiled, not timed)
        if name not in ms[1]:
            rows.append((name, f"{cos:.3f}", f"{100 * acc:.1f}%", "-", "-", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head_))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(onnxruntime runs the dense model: the same fidelity as torch dense)")


if __name__ == "__main__":
    main()
