"""Structured pruning (whole channels, heads and FFN neurons removed): speed and accuracy, same-run ratios.

Sections (``--only`` picks some):

* ``cnn``: the ResNet-18-like CNN and the MobileNetV2-style network of the zoo (random weights), 50% of the
  units of every dependency group removed (``sparsecc.sparsify.structured.prune_channels``), batch 1, 224x224:
  latency of the smaller model against the dense one in three torch runtimes (eager NCHW; eager channels_last
  with batch norm folded; frozen TorchScript) and in sparsecc's torch-free artifact (``sparsecc.compile(...,
  sparsity=0)``, ``cm.export``, ``sparsecc.runtime.load``: numpy in and out; timed in its own rounds, after the
  torch ones, since the two thread pools slow each other), their MAC ratio (torch's FLOP counter) and
  parameter counts. The output shape must be unchanged.
* ``fashion``: the zoo's Fashion-MNIST CNN, 50% channels removed by ``sparsify(pattern="channel")`` and
  fine-tuned with the budget of ``benchmarks/accuracy.py`` (1 epoch of batch 128, Adam lr 5e-4; the last
  5000 training images held out); test accuracy against dense, and against dense fine-tuned for the same budget.
* ``minilm``: all-MiniLM-L6-v2, 50% of the heads and FFN neurons of every layer removed. Mean embedding cosine
  to dense on 256 held-out Debian ``fortunes`` quotes for: magnitude importance; activation importance (per
  layer, and pooled over layers); activation + least-squares reconstruction of the output projections, or of
  every linear (16 batches of 8 train quotes); that + a short distillation; and that + 50% unstructured
  SparseGPT inside what remains, compiled by sparsecc.
  Latency at batch 1 and 8 (seq 128) of torch dense, the smaller model in torch, and the combination compiled.

Run: ``python benchmarks/structured.py`` (2 threads, about 15 minutes; results in
``benchmarks/results/structured.{txt,json}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.runtime.timing import interleaved_ms
from sparsecc.sparsify.distill import distill_encoder
from sparsecc.sparsify.structured import prune_channels

SEQ = 128
OUT = Path(__file__).parent / "results"
LINES: list = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def macs(model, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(*args, **kwargs)
    return fc.get_total_flops() / 2


# ---------------------------------------------------------------------------------------------- CNNs


def section_cnn(runs: int) -> dict:
    say("## CNNs: 50% of every group's channels removed, batch 1, 224x224 (ratio = small / dense latency, ms)")
    say("runtimes: torch eager NCHW; eager channels_last with batch norm folded (torch.fx fuse); TorchScript "
        "frozen (torch.jit.optimize_for_inference); sparsecc's exported artifact (TVM, torch-free)")
    say(f"{'model':<12} {'params':>18} {'MACs':>6} | {'eager':>6} {'small':>6} {'ratio':>6} | {'cl+fold':>7} "
        f"{'small':>6} {'ratio':>6} | {'script':>6} {'small':>6} {'ratio':>6} | {'export':>6} {'small':>6} "
        f"{'ratio':>6}")
    import tempfile
    from torch.fx.experimental.optimization import fuse

    out = {}
    x = torch.randn(1, 3, 224, 224)
    xc = x.to(memory_format=torch.channels_last)
    for name, dense in (("resnet18", zoo.resnet18_like()), ("mobilenetv2", zoo.mobilenet_v2_like())):
        res = prune_channels(dense, x, 0.5)
        small = res.model
        fns = {}
        with torch.no_grad():
            assert small(x).shape == dense(x).shape
            for key, m in (("dense", dense), ("small", small)):
                fns[key] = (lambda m=m: m(x))
                cl = fuse(copy.deepcopy(m)).to(memory_format=torch.channels_last)
                fns[key + "_cl"] = (lambda m=cl: m(xc))
                js = torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(m), x))
                fns[key + "_script"] = (lambda m=js: m(x))
            ms = interleaved_ms(fns, runs=runs, warmup=3)
            exported = {}
            with tempfile.TemporaryDirectory() as tmp:
                for key, m in (("dense", dense), ("small", small)):
                    em = sparsecc.runtime.load(sparsecc.compile(m, (x,), sparsity=0.0).export(f"{tmp}/{key}"))
                    diff = float((torch.from_numpy(em(x.numpy())) - m(x)).abs().max())
                    assert diff < 1e-3, f"{name} {key}: the artifact is {diff} from torch"
                    exported[key + "_export"] = (lambda em=em, xn=x.numpy(): em(xn))
                ms.update(interleaved_ms(exported, runs=runs, warmup=3))
        mac_ratio = macs(small, x) / macs(dense, x)
        ratios = {k: ms["small" + k] / ms["dense" + k] for k in ("", "_cl", "_script", "_export")}
        say(f"{name:<12} {params(dense):>8}->{params(small):>8} {mac_ratio:>6.3f} | {ms['dense']:>6.2f} "
            f"{ms['small']:>6.2f} {ratios['']:>5.2f}x | {ms['dense_cl']:>7.2f} {ms['small_cl']:>6.2f} "
            f"{ratios['_cl']:>5.2f}x | {ms['dense_script']:>6.2f} {ms['small_script']:>6.2f} {ratios['_script']:>5.2f}x"
            f" | {ms['dense_export']:>6.2f} {ms['small_export']:>6.2f} {ratios['_export']:>5.2f}x")
        out[name] = {"params": [params(dense), params(small)], "mac_ratio": mac_ratio, "ms": ms,
                     "ratio_eager": ratios[""], "ratio_channels_last_folded": ratios["_cl"],
                     "ratio_torchscript": ratios["_script"], "ratio_exported": ratios["_export"],
                     "exported_small_vs_eager_dense": ms["small_export"] / ms["dense"], "removed": res.summary()}
    say()
    return out


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


def section_fashion(epochs: float, lr: float) -> dict:
    say(f"## Fashion-MNIST CNN: 50% channels removed, fine-tuned {epochs} epoch(s) of batch 128, Adam lr {lr}")
    xtr, ytr = datasets.fashion_mnist("train")
    xte, yte = datasets.fashion_mnist("test")
    dense = zoo.pretrained("fashion_cnn").eval()
    n_calib = 5000
    train = datasets.loader(xtr[:-n_calib], ytr[:-n_calib], 128, shuffle=True, seed=0)
    steps = int(epochs * len(train))
    test_acc = lambda m: zoo.accuracy(m, (xte, yte))  # noqa: E731
    example = xtr[:1]
    dense_acc = test_acc(dense)
    rows = {"dense": (dense_acc, dense)}
    same = sparsecc.sparsify(dense, example, sparsity=0.0, pattern="unstructured", data=train,
                             loss_fn=F.cross_entropy, finetune_steps=steps, lr=lr, schedule="oneshot",
                             progress=False)
    rows["dense + same fine-tuning"] = (test_acc(same.model), same.model)
    for method, label in (("magnitude", "magnitude"), ("impact", "Taylor")):
        t0 = time.perf_counter()
        res = sparsecc.sparsify(dense, example, sparsity=0.5, pattern="channel", method=method, data=train,
                                loss_fn=F.cross_entropy, finetune_steps=0, progress=False)
        rows[f"50% channels ({label}), no fine-tuning"] = (test_acc(res.model), res.model)
        res = sparsecc.sparsify(dense, example, sparsity=0.5, pattern="channel", method=method, data=train,
                                loss_fn=F.cross_entropy, finetune_steps=steps, lr=lr, progress=False)
        rows[f"50% channels ({label}), fine-tuned"] = (test_acc(res.model), res.model)
        say(f"  {label}: {time.perf_counter() - t0:.0f} s")
    x1, x64 = xte[:1], xte[:64]
    say(f"{'model':<44} {'test acc %':>10} {'vs dense pt':>11} {'params':>8} {'b1 ms':>7} {'b64 ms':>7}")
    out = {"steps": steps, "lr": lr, "rows": {}}
    with torch.no_grad():
        t1 = interleaved_ms({k: (lambda m=m: m(x1)) for k, (_, m) in rows.items()}, runs=30)
        t64 = interleaved_ms({k: (lambda m=m: m(x64)) for k, (_, m) in rows.items()}, runs=30)
    for k, (acc, m) in rows.items():
        say(f"{k:<44} {acc:>10.2f} {acc - dense_acc:>+11.2f} {params(m):>8} {t1[k]:>7.3f} {t64[k]:>7.3f}")
        out["rows"][k] = {"acc": acc, "drop": dense_acc - acc, "params": params(m), "b1_ms": t1[k],
                          "b64_ms": t64[k]}
    say()
    return out


# ---------------------------------------------------------------------------------------------- MiniLM


def encode(tok, sentences, length=SEQ, padding="longest"):
    e = tok(sentences, return_tensors="pt", truncation=True, max_length=length, padding=padding)
    return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}


def embeddings(model, batches):
    out = []
    with torch.no_grad():
        for enc in batches:
            out.append(zoo.mean_pool(model(**enc)[0], enc["attention_mask"]))
    return torch.cat(out)


def section_minilm(runs: int, distill_steps: int, distill_lr: float) -> dict:
    say("## all-MiniLM-L6-v2: 50% of the heads and FFN neurons of every layer removed")
    dense, tok = zoo.minilm()
    train = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(train)
    held = datasets.fortunes_sentences("heldout")[:256]
    calib = [(encode(tok, train[i * 8:(i + 1) * 8]), None) for i in range(16)]
    pool = train[16 * 8:]
    held_b = [encode(tok, held[i:i + 32]) for i in range(0, len(held), 32)]
    ref = embeddings(dense, held_b)

    def cosine(m):
        return float(F.cosine_similarity(embeddings(m, held_b), ref, dim=-1).mean())

    ex8 = encode(tok, (held * 8)[:8], padding="max_length")
    ex1 = {k: v[:1] for k, v in ex8.items()}
    share = {"heads": 0.5, "neurons": 0.5}
    rows, models = {}, {}
    t0 = time.perf_counter()
    r = prune_channels(dense, ex8, share)
    say(f"  {r.summary()}")
    models["magnitude"] = r.model
    models["activation"] = prune_channels(dense, ex8, share, importance="activation", data=calib, batches=16).model
    models["activation, global allocation"] = prune_channels(dense, ex8, share, importance="activation",
                                                             data=calib, batches=16, allocation="global").model
    models["activation + reconstruction"] = prune_channels(dense, ex8, share, importance="activation", data=calib,
                                                           batches=16, reconstruct=True).model
    rec = prune_channels(dense, ex8, share, importance="activation", data=calib, batches=16, reconstruct="all")
    models["activation + reconstruction of all linears"] = rec.model
    say(f"  importance and reconstruction: {time.perf_counter() - t0:.0f} s; refitted linears' relative error "
        f"{min(e[1] for e in rec.reconstruction):.3f}-{max(e[1] for e in rec.reconstruction):.3f} -> "
        f"{min(e[2] for e in rec.reconstruction):.3f}-{max(e[2] for e in rec.reconstruction):.3f}")
    student = copy.deepcopy(rec.model)
    t0 = time.perf_counter()
    distill_encoder(student, dense, lambda step: encode(tok, [pool[(step * 32 + i) % len(pool)] for i in range(32)]),
                    distill_steps, distill_lr, log=say)
    say(f"  distillation: {distill_steps} steps of 32 quotes, AdamW lr {distill_lr}: {time.perf_counter() - t0:.0f} s")
    models[f"+ distillation ({distill_steps} steps)"] = student
    t0 = time.perf_counter()
    inner = sparsecc.sparsify(student, ex8, sparsity=0.5, pattern="unstructured", method="sparsegpt",
                              reconstruct=True, schedule="oneshot", data=calib, calib_batches=16, progress=False)
    say(f"  50% unstructured inside (SparseGPT with reconstruction): {time.perf_counter() - t0:.0f} s")
    models["+ 50% unstructured inside"] = inner.model
    for k, m in models.items():
        rows[k] = {"cosine": cosine(m), "params": params(m)}
    t0 = time.perf_counter()
    cm8 = sparsecc.compile(inner.model, ex8, pattern="auto")
    cm1 = sparsecc.compile(inner.model, ex1, pattern="auto")
    say(f"  compiled at batch 8 and 1: {time.perf_counter() - t0:.0f} s; "
        f"{sum(a.format not in (None, 'dense') for a in cm8.layers)}/{len(cm8.layers)} linears sparse at batch 8")
    with torch.no_grad():
        diff = float((cm8(**ex8)[0] - inner.model(**ex8)[0]).abs().max())
    small = rec.model
    times = {}
    for b, ex, cm in ((1, ex1, cm1), (8, ex8, cm8)):
        with torch.no_grad():
            times[b] = interleaved_ms({"dense": lambda: dense(**ex), "small": lambda: small(**ex),
                                       "small+sparse": lambda: cm(**ex)}, runs=runs, warmup=2)
    say(f"{'model':<40} {'cosine':>7} {'params':>9}")
    for k, v in rows.items():
        say(f"{k:<40} {v['cosine']:>7.4f} {v['params']:>9}")
    say()
    say(f"{'latency (seq 128)':<40} {'b1 ms':>8} {'b1 x':>6} {'b8 ms':>8} {'b8 x':>6}")
    labels = {"dense": "torch dense", "small": "50% heads+neurons removed (torch)",
              "small+sparse": "+ 50% unstructured inside (sparsecc)"}
    for k, label in labels.items():
        say(f"{label:<40} {times[1][k]:>8.2f} {times[1]['dense'] / times[1][k]:>5.2f}x {times[8][k]:>8.2f} "
            f"{times[8]['dense'] / times[8][k]:>5.2f}x")
    say(f"compiled against the pruned torch model: max abs diff {diff:.2e}; weights "
        f"{cm8.original_weight_bytes / 2**20:.1f} MiB (the smaller model) -> {cm8.weight_bytes / 2**20:.1f} MiB, "
        f"dense {sum(p.numel() * 4 for p in dense.parameters()) / 2**20:.1f} MiB")
    say()
    return {"rows": rows, "ms": times, "max_abs_diff": diff, "weight_bytes": cm8.weight_bytes,
            "dense_bytes": sum(p.numel() * 4 for p in dense.parameters())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=("cnn", "fashion", "minilm"), default=["cnn", "fashion", "minilm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    say(f"# structured pruning: {args.threads} threads, medians of {args.runs} interleaved runs; "
        f"command: python benchmarks/structured.py {' '.join(sys.argv[1:])}".rstrip())
    say()
    out = {"threads": args.threads, "runs": args.runs}
    if "cnn" in args.only:
        out["cnn"] = section_cnn(args.runs)
    if "fashion" in args.only:
        out["fashion"] = section_fashion(args.epochs, args.lr)
    if "minilm" in args.only:
        out["minilm"] = section_minilm(max(5, args.runs // 2), args.distill_steps, args.distill_lr)
    OUT.mkdir(exist_ok=True)
    suffix = "" if set(args.only) == {"cnn", "fashion", "minilm"} else "_" + "_".join(args.only)
    (OUT / f"structured{suffix}.txt").write_text("\n".join(LINES) + "\n")
    (OUT / f"structured{suffix}.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
