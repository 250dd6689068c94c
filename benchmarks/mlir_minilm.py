"""One all-MiniLM-L6-v2 layer through MLIR: ``cm.to_mlir()``, the sparsifier passes and MLIR's ExecutionEngine.

Layer 0 of the model, pruned 80% in 16x1 blocks and compiled by sparsecc, is emitted as linalg on tensors with
``#sparse_tensor.encoding`` on its six weights, verified in a fresh context, lowered and run on the
ExecutionEngine; printed: the weights' encodings and nnz, the times of each step, and the max abs difference
to eager torch with the same masks (``sparsecc.prune``) and to the compiled module.

Run: ``python benchmarks/mlir_minilm.py [--out layer0.mlir]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import sparsecc
from sparsecc import zoo


class Layer(torch.nn.Module):
    """One BERT layer as ``hidden (batch, seq, 384) -> hidden``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h):
        return self.layer(h)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the MLIR text here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = zoo.minilm()
    block = Layer(model.encoder.layer[0]).eval()
    x = torch.randn(1, args.seq, 384)
    cm = sparsecc.compile(block, x, sparsity=0.8, pattern="block", block_shape=(16, 1))
    t = time.perf_counter()
    mm = cm.to_mlir((x,))
    t_export = time.perf_counter() - t
    mm.verify()
    for w in mm.weights:
        print(f"{w.layer}: {w.layout} {w.block} {tuple(w.shape)}, nnz {w.nnz}")
    print(f"#sparse_tensor.encoding in the text: {mm.text.count('#sparse_tensor.encoding')}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(mm.text)
    t = time.perf_counter()
    y = mm.run(x)[0]
    t_run = time.perf_counter() - t
    with torch.no_grad():
        ref = sparsecc.prune(block, 0.8, block_shape=(16, 1))(x).numpy()
        ref_cm = cm(x).numpy()
    print(f"export {t_export:.1f} s; sparsifier + ExecutionEngine {t_run:.1f} s")
    print(f"max abs diff, ExecutionEngine vs eager torch (same masks): {float(np.abs(y - ref).max()):.2e}; "
          f"vs the compiled module: {float(np.abs(y - ref_cm).max()):.2e}")


if __name__ == "__main__":
    main()
