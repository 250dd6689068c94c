"""Per-layer relative output error of all-MiniLM-L6-v2's linears pruned alone, by mask method and density.

Each layer is pruned alone in the dense model, its kept weights refit by least
squares (:func:`sparsecc.sparsify.reconstruct.solve_kept`), and its relative
output error ``‖X(W - W')ᵀ‖² / ‖XWᵀ‖²`` measured on the calibration inputs (the
quantity ``sparsify(..., allocation="error")`` allocates densities by).
Calibration: ``--calib`` batches of 32 training quotes from Debian's
``fortunes`` (at most 64 tokens), as ``benchmarks/accuracy.py minilm``.

Run: ``python benchmarks/layer_errors.py [--block 16x1 --densities 0.2,0.35,0.5 --layers 0,2]``
"""

from __future__ import annotations

import argparse
import random

import torch

from sparsecc import datasets, zoo
from sparsecc.sparsify.patterns import Pattern, as_matrix
from sparsecc.sparsify.reconstruct import collect_statistics, layer_keep, output_error, solve_kept

METHODS = ("magnitude", "activation", "sparsegpt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", default="16x1", help="block shape RxC, or 1x1 for unstructured")
    p.add_argument("--densities", default="0.2,0.35,0.5")
    p.add_argument("--layers", default="0,1,2,3,4,5", help="encoder layers to measure")
    p.add_argument("--calib", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = zoo.minilm()
    sents = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(sents)
    calib = []
    for i in range(a.calib):
        enc = tok(sents[32 * i:32 * (i + 1)], padding=True, truncation=True, max_length=64, return_tensors="pt")
        calib.append({k: enc[k] for k in ("input_ids", "attention_mask")})
    r, c = (int(v) for v in a.block.split("x"))
    pattern = Pattern("unstructured") if (r, c) == (1, 1) else Pattern("block", (r, c))
    dens = [float(d) for d in a.densities.split(",")]
    print(f"relative output error after least-squares refit, {pattern}, {a.calib} calibration batches of 32")
    print(f"{'layer':44s} " + " ".join(f"{m[:5]}@{d:<5}" for d in dens for m in METHODS))
    for layer in (int(v) for v in a.layers.split(",")):
        for sub in ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense", "intermediate.dense", "output.dense"):
            name = f"encoder.layer.{layer}.{sub}"
            stats = collect_statistics(model, model, name, calib, lambda m, b: m(**b))
            wm = as_matrix(model.get_submodule(name).weight.detach())
            row = []
            for d in dens:
                for m in METHODS:
                    keep = layer_keep(m, wm, stats, d, pattern, wm.abs(), damp=0.01)
                    row.append(output_error(wm, solve_kept(wm, keep, stats), stats))
            print(f"{name:44s} " + " ".join(f"{e:11.4f}" for e in row), flush=True)


if __name__ == "__main__":
    main()
