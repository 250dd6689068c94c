"""all-MiniLM-L6-v2 pruned to 80% and recovered by distillation, then compiled for x86.

Teacher: the dense model. Student: a copy pruned with ``sparsecc.sparsify``
(gradual cubic schedule during fine-tuning) to match the teacher's sentence
embeddings (mean-pooled, L2-normalized, the sentence-transformers recipe) with
the loss ``1 - cos(student, teacher)``.

Text: the Debian package ``fortunes`` (quotations, jokes and definitions in
English; :func:`sparsecc.datasets.fortunes_sentences`), its deterministic
``"train"`` split for distillation and the ``"heldout"`` split for the cosine
reported. Latency: batch 8 and 1 at seq 128 (held-out sentences padded or
truncated to 128 tokens), torch dense vs sparsecc, interleaved medians.

Run: ``python benchmarks/accuracy.py minilm [--steps 600 --block 16x1]``
"""

from __future__ import annotations

import json
import math
import random
import sys

import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.runtime.timing import interleaved_ms


class Embedder(nn.Module):
    """Sentence embedding model: a BERT encoder + attention-masked mean pooling + L2 normalization.

    Inputs: ``input_ids``, ``attention_mask``: (batch, seq) int64. Output: (batch, hidden) float32.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return zoo.mean_pool(self.bert(input_ids=input_ids, attention_mask=attention_mask)[0], attention_mask)


class DistillEmbedder(Embedder):
    """:class:`Embedder` that, in training mode, also returns every layer's hidden states (batch, seq, hidden)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if not self.training:
            return super().forward(input_ids, attention_mask)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return zoo.mean_pool(out[0], attention_mask), out.hidden_states


def load(cls=Embedder, **config):
    """``cls`` around :func:`sparsecc.zoo.minilm` (``config``: its overrides), and the tokenizer."""
    bert, tok = zoo.minilm(**config)
    return cls(bert).eval(), tok


def distill_loss(teacher: DistillEmbedder):
    """Layer-wise distillation: Σ over layers of the masked MSE of hidden states + (1 - cos) of the embeddings.

    Matching every layer's hidden states (as in TinyBERT, Jiao et al. 2020) guides a pruned student far
    better than the final embedding alone. ``target`` is the batch's inputs; the teacher runs inside.
    """

    def loss(out, enc):
        emb, hs = out
        teacher.train()  # teacher has no dropout (config); train mode only makes it return hidden states
        with torch.no_grad():
            t_emb, t_hs = teacher(**enc)
        m = enc["attention_mask"].unsqueeze(-1).to(emb.dtype)
        n = m.sum() * hs[0].shape[-1]
        layer = sum(((h - t) ** 2 * m).sum() / n for h, t in zip(hs[1:], t_hs[1:]))
        return layer + (1.0 - F.cosine_similarity(emb, t_emb, dim=-1)).mean()

    return loss


def cosine(model: nn.Module, teacher_emb: list, encs: list) -> float:
    """Mean cosine between ``model``'s and the teacher's embeddings over the batches ``encs``."""
    was = model.training
    model.eval()
    with torch.no_grad():
        cs = [F.cosine_similarity(model(**e), t, dim=-1) for e, t in zip(encs, teacher_emb)]
    model.train(was)
    return float(torch.cat(cs).mean())


def run(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.keep_freed_memory:  # process-wide: torch dense, torch pruned and sparsecc all run with it
        from sparsecc.runtime.memory import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    teacher, tok = load()
    # the student trains without dropout: it must reproduce the teacher, not regularize a task
    no_drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    t_distill, _ = load(DistillEmbedder, **no_drop)
    student0, _ = load(DistillEmbedder, **no_drop)
    train_s = datasets.fortunes_sentences("train")
    held_s = datasets.fortunes_sentences("heldout")
    random.Random(0).shuffle(train_s)
    n_batches = len(train_s) // args.batch
    batches = []
    for i in range(n_batches):
        enc = dict(tok(train_s[i * args.batch:(i + 1) * args.batch], padding=True, truncation=True,
                       max_length=args.max_len, return_tensors="pt"))
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        batches.append((enc, enc))
    held = []
    for i in range(0, len(held_s), 64):
        enc = dict(tok(held_s[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        held.append({k: enc[k] for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        held_t = [teacher(**e) for e in held]
    print(f"fortunes: {len(train_s)} train / {len(held_s)} held-out sentences; {n_batches} distillation batches "
          f"of {args.batch}, {args.steps} steps", flush=True)
    ex = batches[0][0]
    eval_fn = lambda m: cosine(m, held_t[:4], held[:4])  # noqa: E731  (a quick calibration metric)
    loss = distill_loss(t_distill)
    block = tuple(int(v) for v in args.block.split("x")) if args.block else None

    from sparsecc.cache import cache_root

    tag = f"{args.sparsity}-{args.pattern}-{args.block}-{args.method}-{args.steps}" + ("-rec" if args.reconstruct else "")
    tag += "" if args.allocation == "uniform" else f"-{args.allocation}"
    saved = cache_root() / "models" / f"minilm-distilled-{tag}.pt"
    # no recovery: the same sparsity, one-shot magnitude
    sp0 = sparsecc.sparsify(teacher, ex, target="x86", sparsity=args.sparsity, pattern=args.pattern,
                            block_shape=block, schedule="oneshot", progress=False)
    cos0 = cosine(sp0.model, held_t, held)
    print(f"one-shot {args.sparsity:.0%} without recovery: held-out mean cosine {cos0:.4f}", flush=True)
    if args.reuse and saved.exists():  # latency only: the distilled student of an earlier run of this command
        student, _ = load()
        student.load_state_dict(torch.load(saved))
        student.eval()
        seconds, pattern = float("nan"), "(reused)"
        print(f"reusing the distilled student {saved}")
    else:
        schedule = dict(schedule="oneshot", reconstruct=True, calib_batches=args.calib, allocation=args.allocation,
                        densities=tuple(float(d) for d in args.densities.split(","))) if args.reconstruct else \
            dict(schedule="gradual")
        optimizer = None
        if args.warmup or args.decay != "none":
            def factor(t: int) -> float:  # linear warm-up, then constant or cosine decay to 0 at the last step
                warm = min(1.0, (t + 1) / args.warmup) if args.warmup else 1.0
                if args.decay == "cosine":
                    return warm * 0.5 * (1.0 + math.cos(math.pi * min(t, args.steps) / max(1, args.steps)))
                return warm

            def optimizer(params):  # Adam with that schedule (sparsify steps the optimizer once per batch)
                opt = torch.optim.Adam(params, lr=args.lr)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
                step = opt.step

                def stepped(*a, **k):
                    out = step(*a, **k)
                    sched.step()
                    return out

                opt.step = stepped
                return opt
        sp = sparsecc.sparsify(student0, ex, target="x86", sparsity=args.sparsity, pattern=args.pattern,
                               block_shape=block, method=args.method, data=batches, loss_fn=loss, eval_fn=eval_fn,
                               finetune_steps=args.steps, lr=args.lr, optimizer=optimizer, progress=True,
                               **schedule)
        student = Embedder(sp.model.bert).eval()
        print(sp.report(), flush=True)
        seconds, pattern = sp.seconds, sp.layers[0].pattern
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(student.state_dict(), saved.with_suffix(".tmp"))
        saved.with_suffix(".tmp").replace(saved)
    cos = cosine(student, held_t, held)
    nz = [m.weight for m in student.modules() if isinstance(m, nn.Linear)]
    sparsity = 1 - sum(int(w.count_nonzero()) for w in nz) / sum(w.numel() for w in nz)
    with torch.no_grad():
        min_cos = min(float(F.cosine_similarity(student(**e), t, dim=-1).min()) for e, t in zip(held, held_t))
    print(f"distilled to sparsity {sparsity:.3f} ({pattern}): held-out mean cosine to dense {cos:.4f} "
          f"(min {min_cos:.4f}); {args.steps} steps in {seconds:.0f} s", flush=True)

    lat = {}
    for b in (8, 1):
        enc = dict(tok(held_s[:b], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
        enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
        cm = sparsecc.compile(student, enc, target="x86")
        t = interleaved_ms({"dense": teacher, "pruned torch": student, "sparsecc": cm}, runs=args.runs, **enc)
        with torch.no_grad():
            diff = float((cm(**enc) - student(**enc)).abs().max())
        lat[b] = dict(t, ratio=t["dense"] / t["sparsecc"], max_abs_diff=diff)
        print(f"batch {b} x seq 128: torch dense {t['dense']:.1f} ms, torch pruned {t['pruned torch']:.1f} ms, "
              f"sparsecc {t['sparsecc']:.1f} ms -> {t['dense'] / t['sparsecc']:.2f}x faster than dense "
              f"(max abs diff sparsecc vs pruned torch {diff:.1e})", flush=True)
    from benchmarks.accuracy import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy_minilm.json").write_text(json.dumps({
        "sparsity": sparsity, "pattern": pattern, "min_cosine": min_cos, "method": args.method, "steps": args.steps,
        "reconstruct": args.reconstruct, "warmup": args.warmup, "decay": args.decay, "allocation": args.allocation,
        "layer_density": {n: float((m.weight != 0).float().mean()) for n, m in student.named_modules()
                          if isinstance(m, nn.Linear)},
        "lr": args.lr, "batch": args.batch, "max_len": args.max_len, "heldout_cosine": cos,
        "oneshot_cosine": cos0, "latency": lat, "train_sentences": len(train_s), "heldout_sentences": len(held_s),
        "seconds": seconds, "command": "python benchmarks/accuracy.py minilm " + " ".join(sys.argv[2:])}, indent=1))
