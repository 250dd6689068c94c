"""``torch.compile(model, backend="sparsecc")`` on all-MiniLM-L6-v2: fidelity, latency and recompiles.

The model is pruned to ``--sparsity`` (default: 80% in 16x1 blocks by magnitude, no recovery; ``--method
sparsegpt``: unstructured, SparseGPT with least-squares reconstruction on ``--batches`` x 32 Debian ``fortunes``
train quotes), then run four ways in the same interleaved rounds, batch 1 and 8 at seq 128:

* torch eager, dense (the reference of every ratio);
* Inductor, dense (``torch.compile(model)``);
* ``sparsecc.compile(pruned, x)``;
* ``torch.compile(pruned, backend="sparsecc")``, first called at batch 1, then at batch 8 (dynamo re-traces the
  graph with a dynamic batch; the backend keeps the formats chosen the first time).

Printed: latency medians (ms) and ratios to eager dense; the max abs difference between the backend's outputs
and ``sparsecc.compile``'s; mean embedding cosine to the dense model on 256 held-out quotes; the backend's
compile counters and the seconds of its first call and of the first call at a new batch size.

Run: ``python benchmarks/torch_compile.py`` (2 threads, a few minutes; results in
``benchmarks/results/torch_compile.{txt,json}``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import datasets, dynamo, zoo
from sparsecc.runtime.timing import interleaved_ms

OUT = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--method", choices=("magnitude", "sparsegpt"), default="magnitude",
                    help="magnitude: --block blocks, no recovery; sparsegpt: unstructured one-shot (minutes)")
    ap.add_argument("--block", type=int, nargs=2, default=(16, 1))
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true", help="skip the Inductor column (it compiles slowly)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    model, tok = zoo.minilm()
    quotes = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(quotes)
    held_out = datasets.fortunes_sentences("heldout")[:256]

    def enc(s, length=None):
        kw = {"padding": "max_length", "max_length": length} if length else {"padding": True}
        e = tok(s, truncation=True, return_tensors="pt", **({"max_length": 128} | kw))
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    t0 = time.perf_counter()
    if args.method == "sparsegpt":
        calib = [enc(quotes[i * 32:(i + 1) * 32]) for i in range(args.batches)]
        pruned = sparsecc.sparsify(model, calib[0], target="x86", sparsity=args.sparsity, pattern="unstructured",
                                   method="sparsegpt", reconstruct=True, schedule="oneshot",
                                   data=[(e, e) for e in calib], calib_batches=args.batches, progress=False).model
        how = f"unstructured (SparseGPT + reconstruction, {args.batches} x 32 quotes)"
    else:
        pruned = sparsecc.prune(model, args.sparsity, block_shape=tuple(args.block))
        how = f"in {args.block[0]}x{args.block[1]} blocks by magnitude, no recovery"
    say(f"all-MiniLM-L6-v2 pruned one-shot to {args.sparsity:.0%} {how} in {time.perf_counter() - t0:.0f} s")

    x1, x8 = enc(quotes[-1:], 128), enc(quotes[-8:], 128)
    t0 = time.perf_counter()
    cm = sparsecc.compile(pruned, x1)
    say(f"sparsecc.compile: {time.perf_counter() - t0:.1f} s, "
        f"{sum(a.format not in (None, 'dense') for a in cm.layers)}/{len(cm.layers)} linears sparse")

    torch._dynamo.reset()
    dynamo.reset()
    backend = torch.compile(pruned, backend="sparsecc")
    with torch.no_grad():
        t0 = time.perf_counter()
        y1 = backend(**x1)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        y8 = backend(**x8)
        second_s = time.perf_counter() - t0
        stats_after_8 = dict(dynamo.STATS)
        backend(**enc(quotes[-3:], 128))  # a third batch size: served by the dynamic module
    stats = dict(dynamo.STATS)
    later = [c for e in dynamo._CACHE.values() for c in e.modules][1:]
    kept = sum("kept from the earlier compile" in (a.reason or "") for c in later for a in c.layers)
    diff = max(float((y1.last_hidden_state - cm(**x1).last_hidden_state).abs().max()),
               float((y8.last_hidden_state - cm(**x8).last_hidden_state).abs().max()))
    say(f"torch.compile(backend='sparsecc'): first call {first_s:.1f} s; first call at batch 8 {second_s:.1f} s "
        f"(counters then {stats_after_8}); after a third batch size {stats}; layers whose format was kept "
        f"rather than timed again: {kept}")
    say(f"max abs diff, backend vs sparsecc.compile (batch 1 and 8): {diff:.2e}")

    def emb(m, e):
        out = m(**e)
        return zoo.mean_pool(out.last_hidden_state, e["attention_mask"])

    with torch.no_grad():
        val = [enc(held_out[i:i + 32]) for i in range(0, len(held_out), 32)]
        ref = [emb(model, e) for e in val]
        cos = {name: float(torch.cat([F.cosine_similarity(emb(m, e), r, dim=-1) for e, r in zip(val, ref)]).mean())
               for name, m in (("pruned torch", pruned), ("sparsecc.compile", cm), ("backend", backend))}
    say("mean embedding cosine to dense on 256 held-out quotes: "
        + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))

    inductor = None
    if not args.no_inductor:
        inductor = torch.compile(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            inductor(**x1)
            inductor(**x8)
        say(f"Inductor (dense) compile and first calls: {time.perf_counter() - t0:.0f} s")

    results = {"sparsity": args.sparsity, "cosine": cos, "max_abs_diff": diff, "stats": stats,
               "first_call_s": first_s, "new_batch_call_s": second_s, "kept_formats": kept, "latency": {}}
    say("")
    say(f"{'batch x seq':<12} {'torch eager':>12} {'Inductor':>12} {'sparsecc':>12} {'backend':>12}"
        f" {'eager/sparsecc':>15} {'eager/backend':>14} {'Inductor/backend':>17}")
    for b, x in ((1, x1), (8, x8)):
        fns = {"eager": lambda x=x: model(**x), "sparsecc": lambda x=x: cm(**x),
               "backend": lambda x=x: backend(**x)}
        if inductor is not None:
            fns["inductor"] = lambda x=x: inductor(**x)
        with torch.no_grad():
            t = interleaved_ms(fns, runs=args.runs)
        ind, sp, be, ea = t.get("inductor"), t["sparsecc"], t["backend"], t["eager"]
        ind_ms = f"{ind:.2f}ms" if ind else "-"
        ind_ratio = f"{ind / be:.2f}x" if ind else "-"
        say(f"{f'{b} x 128':<12} {ea:>10.2f}ms {ind_ms:>12} {sp:>10.2f}ms {be:>10.2f}ms {ea / sp:>14.2f}x "
            f"{ea / be:>13.2f}x {ind_ratio:>17}")
        results["latency"][b] = t
    OUT.mkdir(exist_ok=True)
    (OUT / "torch_compile.txt").write_text("\n".join(lines) + "\n")
    (OUT / "torch_compile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
