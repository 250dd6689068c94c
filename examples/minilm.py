"""Main job: compile all-MiniLM-L6-v2 at 90% block sparsity for x86 and compare with torch.

Prints the per-layer report; latency at batch 1 and 8, seq 128, of
(a) torch eager on the dense model, (b) torch eager on the same pruned
weights, (c) sparsecc; weight memory of (a) and (c); and max abs difference
and cosine between the embeddings of (b) and (c) on real sentences.

Run: ``make demo`` (or ``python examples/minilm.py --sparsity 0.9 --runs 10``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import zoo
from sparsecc.runtime.compiled import module_bytes
from sparsecc.runtime.timing import interleaved_ms

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse neural networks skip the multiplications by zero.",
    "A compiler turns a model graph into fast kernels for one machine.",
    "The weather in Lisbon is mild in November.",
    "Pruning removes the weights that matter least.",
    "She bought fresh bread at the bakery on the corner.",
    "Block sparsity keeps groups of weights together so that vector units stay busy.",
    "How many layers does a small sentence encoder have?",
]


def embed(run, enc):
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe), and the hidden states."""
    out = run(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return zoo.mean_pool(hidden, enc["attention_mask"]), hidden


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--pattern", default="block", choices=["auto", "unstructured", "block", "dense"])
    ap.add_argument("--block", default=None, help="block shape 'RxC' (default: chosen by the cost model)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this process's CPU time (with --threads 1, robust to other load on the machine)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc keeps freed blocks for reuse (no page faults per op; applies to (a), (b), (c))")
    args = ap.parse_args()
    if args.keep_freed_memory:
        from sparsecc.runtime.memory import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    torch.set_num_threads(args.threads)

    model, tok = zoo.minilm()
    seq = 128
    example = dict(tok(SENTENCES, padding="max_length", max_length=seq, truncation=True, return_tensors="pt"))
    batch, seqd = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dyn = {k: {0: batch, 1: seqd} for k in example}
    block = tuple(int(v) for v in args.block.split("x")) if args.block else None

    cm = sparsecc.compile(model, example, target="x86", sparsity=args.sparsity, pattern=args.pattern,
                          dynamic_shapes=dyn, block_shape=block)
    print(cm.report())
    print()

    # (b) the same pruned weights in eager torch
    pruned = sparsecc.prune(model, args.sparsity, block_shape=cm.prune_block)

    with torch.no_grad():
        enc = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
        e_pruned, h_pruned = embed(pruned, enc)
        e_sparse, h_sparse = embed(cm, enc)
        e_dense, _ = embed(model, enc)
    cos = F.cosine_similarity(e_pruned, e_sparse, dim=-1)
    print(f"embeddings of {len(SENTENCES)} sentences, (b) pruned torch vs (c) sparsecc: "
          f"max abs diff {float((h_pruned - h_sparse).abs().max()):.2e} (hidden states), "
          f"{float((e_pruned - e_sparse).abs().max()):.2e} (embeddings); "
          f"min cosine {float(cos.min()):.6f}")
    print(f"cosine of pruned to dense embeddings (accuracy before any recovery): "
          f"mean {float(F.cosine_similarity(e_dense, e_pruned, dim=-1).mean()):.3f}")
    print()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"latency ({args.clock} clock), seq {seq}, {args.threads} threads, median of {args.runs} interleaved runs (ms):")
    print(f"{'batch':>5}  {'(a) torch dense':>15}  {'(b) torch pruned':>16}  {'(c) sparsecc':>12}  "
          f"{'a/c speed-up':>12}")
    with torch.no_grad():
        for b in (1, 8):
            sents = (SENTENCES * 8)[:b]
            enc = dict(tok(sents, padding="max_length", max_length=seq, truncation=True, return_tensors="pt"))
            t = interleaved_ms({"a": model, "b": pruned, "c": cm}, runs=args.runs, clock=clock, **enc)
            print(f"{b:>5}  {t['a']:>15.2f}  {t['b']:>16.2f}  {t['c']:>12.2f}  {t['a'] / t['c']:>11.2f}x")
    print()
    print(f"weight memory: (a) dense {module_bytes(model):,} bytes; (c) sparsecc {cm.weight_bytes:,} bytes "
          f"({cm.weight_bytes / module_bytes(model):.2f}x)")
    print(f"compile time: {cm.compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
