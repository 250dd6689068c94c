"""One-shot layer-wise pruning of all-MiniLM-L6-v2 at one sparsity: fidelity for a calibration recipe.

``sparsify(model, ..., sparsity=S, pattern=P, method="sparsegpt", reconstruct=True)`` on ``--batches`` batches of
``--batch-size`` ``fortunes`` train quotes (random order, or sorted by length with ``--sorted``: little padding),
then the mean cosine of the sentence embeddings to the dense model's on 256 other train quotes (the validation
split of ``examples/minilm.py``) and the wall time.

Run: ``python benchmarks/oneshot.py --sparsity 0.5 --pattern unstructured --batches 16 --batch-size 64 --sorted``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparsecc  # noqa: E402
from sparsecc import datasets, zoo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sorted", action="store_true", help="calibration batches of similar length")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.minilm()
    train = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(train)

    def enc(s):
        e = tok(s, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    pool = train[:args.batches * args.batch_size]
    if args.sorted:
        pool = sorted(pool, key=lambda s: len(tok(s)["input_ids"]))
    calib = [enc(pool[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.batches)]
    val = [enc(train[-256:][i * 64:(i + 1) * 64]) for i in range(4)]

    def emb(m, e):
        return zoo.mean_pool(m(**e).last_hidden_state, e["attention_mask"])

    with torch.no_grad():
        ref = [emb(model, e) for e in val]

    def cosine(m):
        with torch.no_grad():
            return float(torch.cat([F.cosine_similarity(emb(m, e), r, dim=-1) for e, r in zip(val, ref)]).mean())

    t0 = time.perf_counter()
    sp = sparsecc.sparsify(model, calib[0], target="x86", sparsity=args.sparsity, pattern=args.pattern,
                           method=args.method, reconstruct=True, schedule="oneshot", data=[(e, e) for e in calib],
                           calib_batches=args.batches, eval_fn=cosine, progress=False)
    print(f"{args.pattern} at sparsity {args.sparsity}, {args.method}, {args.batches} x {args.batch_size} quotes"
          f"{' (sorted by length)' if args.sorted else ''}: validation cosine {cosine(sp.model):.4f}, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
