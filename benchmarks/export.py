"""Exported artifact vs ``cm`` vs torch dense on all-MiniLM-L6-v2 (batch 1 and 8, seq 128).

The model is pruned to ``--sparsity`` in ``--block`` blocks (magnitude, ``sparsecc.prune``: no recovery; this
measures speed, not fidelity), wrapped as ``(input_ids, attention_mask) -> last_hidden_state``
(:class:`sparsecc.peers.Hidden`), compiled with ``sparsecc.compile`` at each batch, exported with
``cm.export`` (static shapes: the example's), loaded with ``sparsecc.runtime.load`` and timed in the same
interleaved rounds (:func:`sparsecc.runtime.timing.interleaved_ms`, 20 ms pause before each call: torch's
OpenMP workers spin after a call and would slow the exported module's own thread pool) as torch dense (the
unpruned model) and ``cm``. The exported module is called with numpy inputs (the deployment path, no torch at run time).

Printed per batch: median latency (ms) of each, ratios to torch dense, and the max abs difference of the
exported module's output to ``cm``'s.

Run: ``python benchmarks/export.py`` (2 threads, a few minutes); smoke: ``--runs 2 --batches 1``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.peers import Hidden
from sparsecc.runtime.timing import interleaved_ms

SEQ = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, nargs=2, default=[16, 1], metavar=("ROWS", "COLS"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = zoo.minilm()
    dense = Hidden(model).eval()
    pruned = Hidden(sparsecc.prune(model, args.sparsity, block_shape=tuple(args.block))).eval()
    sentences = datasets.fortunes_sentences("heldout") * 8
    rows = []
    for b in args.batches:
        enc = tok(sentences[:b], return_tensors="pt", truncation=True, max_length=SEQ, padding="max_length")
        x = (enc["input_ids"], enc["attention_mask"])
        t0 = time.perf_counter()
        cm = sparsecc.compile(pruned, x, target="x86", pattern="block", block_shape=tuple(args.block))
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            cm.export(f"{tmp}/minilm")
            t2 = time.perf_counter()
            em = sparsecc.runtime.load(f"{tmp}/minilm")
            xn = tuple(t.numpy() for t in x)
            with torch.no_grad():
                diff = float(np.abs(em(*xn) - cm(*x).numpy()).max())
            ms = interleaved_ms({"torch dense": lambda: dense(*x), "cm": lambda: cm(*x),
                                 "exported": lambda: em(*xn)}, runs=args.runs, pause_s=0.02)
        rows.append((b, ms, diff))
        print(f"batch {b}, seq {SEQ}: compile {t1 - t0:.1f} s, export {t2 - t1:.1f} s")
        for name, v in ms.items():
            print(f"  {name:>12}: {v:8.2f} ms  ({v / ms['torch dense']:.2f}x torch dense)")
        print(f"  exported / cm: {ms['exported'] / ms['cm']:.2f}x; max abs diff exported vs cm: {diff:.1e}")
    return rows


if __name__ == "__main__":
    main()
