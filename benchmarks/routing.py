"""Activation routing (contextual sparsity) and the run-time level knob: speed and fidelity, same-run ratios.

Sections (``--only`` picks some):

* ``ffn``: all-MiniLM-L6-v2's feed-forward blocks on their real activations (held-out Debian ``fortunes`` quotes,
  padded to seq 128; gate thresholds calibrated on train quotes): the dense torch block (up projection, GELU,
  down projection) against the same block with the down projection gated at 70/50/30% activation density, for
  1 to 1024 tokens (batch x seq). Prints the down projection's and the block's speed-up, the realized per-token
  density and the density of the union the chosen kernel reads.
* ``model``: ``sparsecc.compile(minilm, activation_density=[0.7, 0.5, 0.3])``: per level the whole-model
  latency at batch 1 and 8 (seq 128) against torch dense and the mean embedding cosine to dense on held-out
  quotes; the level-switch cost; the weight bytes of the module with three levels against one.
* ``moe``: MoE-fication of MiniLM's FFNs (``sparsecc.compile(..., moe=(experts, top_k))``), 4 to 16 experts,
  top-1/2/4: embedding cosine on held-out quotes, router recall, whole-model latency at batch 1 and 8.
* ``relu``: a ReLU MLP trained on Fashion-MNIST, routed at density 1 (threshold 0: exact zeros skipped) and
  at lower densities (``gate_bias_correction=False``: the correction cost this classifier accuracy): speed-up,
  max difference to torch at threshold 0, test accuracy per level.

Run: ``python benchmarks/routing.py`` (2 threads; results in ``benchmarks/results/routing.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.ir.annotations import ROUTING_META_KEY
from sparsecc.runtime.gated import GatedLinear
from sparsecc.runtime.timing import interleaved_ms

SEQ = 128
DENSITIES = (0.7, 0.5, 0.3)
TOKENS = (1, 4, 8, 16, 32, 64, 128, 1024)
OUT = Path(__file__).parent / "results"


def encode(tok, sentences, length=SEQ):
    e = tok(sentences, return_tensors="pt", truncation=True, max_length=length, padding="max_length")
    return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}


def quotes():
    train = datasets.fortunes_sentences("train")
    random.Random(0).shuffle(train)
    return train, datasets.fortunes_sentences("heldout")


def ffn_inputs(model, batches):
    """Per layer: the FFN block's input x (tokens, 384) and intermediate h = GELU(up(x)) (tokens, 1536)."""
    xs, hs = {}, {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        hooks.append(layer.intermediate.dense.register_forward_pre_hook(
            lambda m, a, i=i: xs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: hs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in hs.items()}


def section_ffn(model, tok, runs, layers=(0, 3, 5), tokens=TOKENS):
    train, held = quotes()
    x_cal, h_cal = ffn_inputs(model, [encode(tok, train[i * 32:(i + 1) * 32]) for i in range(4)])
    x_held, h_held = ffn_inputs(model, [encode(tok, held[:8])])  # batch 8 x seq 128 = 1024 tokens
    rows = []
    for li in layers:
        layer = model.encoder.layer[li]
        up, down = layer.intermediate.dense, layer.output.dense
        def thresholds(v):
            a = v.abs().reshape(-1)
            a = a[torch.randint(a.numel(), (2_000_000,), generator=torch.Generator().manual_seed(0))]
            return [float(torch.quantile(a, 1 - d)) for d in DENSITIES]

        g = GatedLinear(down.weight.detach(), down.bias.detach(), thresholds(h_cal[li]), DENSITIES,
                        name=f"layer{li}.down")
        gu = GatedLinear(up.weight.detach(), up.bias.detach(), thresholds(x_cal[li]), DENSITIES, name=f"layer{li}.up")
        wu, bu, wd, bd = (t.detach() for t in (up.weight, up.bias, down.weight, down.bias))
        for m in tokens:
            x, h = x_held[li][:m].contiguous(), h_held[li][:m].contiguous()
            for lv in range(len(DENSITIES)):
                g.set_level(lv)
                g.choose_schedule(m, h)
                gu.set_level(lv)
                gu.choose_schedule(m, x)
            fns = {"dense_block": lambda: F.linear(F.gelu(F.linear(x, wu, bu)), wd, bd),
                   "dense_down": lambda: F.linear(h, wd, bd)}

            def block(lv):
                def run():
                    g.set_level(lv)
                    return g(F.gelu(F.linear(x, wu, bu)))
                return run

            def both(lv):  # TEAL's form: the up projection's input gated too
                def run():
                    g.set_level(lv)
                    gu.set_level(lv)
                    return g(F.gelu(gu(x)))
                return run

            def down(lv):
                def run():
                    g.set_level(lv)
                    return g(h)
                return run

            for lv in range(len(DENSITIES)):
                fns[("block", lv)], fns[("down", lv)], fns[("both", lv)] = block(lv), down(lv), both(lv)
            t = interleaved_ms(fns, runs=runs)
            for lv, d in enumerate(DENSITIES):
                mt = g.schedule[lv][m][0]
                rows.append({"layer": li, "tokens": m, "density": d, "schedule": list(g.schedule[lv][m]),
                             "realized_density": g.realized_density(h, lv),
                             "union_density": g.realized_density(h, lv, m_tile=mt),
                             "dense_block_ms": t["dense_block"], "block_ms": t[("block", lv)],
                             "dense_down_ms": t["dense_down"], "down_ms": t[("down", lv)],
                             "block_speedup": t["dense_block"] / t[("block", lv)],
                             "both_ms": t[("both", lv)], "both_speedup": t["dense_block"] / t[("both", lv)],
                             "up_realized_density": gu.realized_density(x, lv),
                             "down_speedup": t["dense_down"] / t[("down", lv)]})
                r = rows[-1]
                print(f"layer {li} tokens {m:5d} density {d:.1f}: realized {r['realized_density']:.3f} union "
                      f"{r['union_density']:.3f} (m_tile {mt}); down {r['dense_down_ms']:.3f} -> {r['down_ms']:.3f} "
                      f"ms ({r['down_speedup']:.2f}x); block {r['dense_block_ms']:.3f} -> {r['block_ms']:.3f} ms "
                      f"({r['block_speedup']:.2f}x); up+down gated (up input realized "
                      f"{r['up_realized_density']:.3f}) {r['both_ms']:.3f} ms ({r['both_speedup']:.2f}x)", flush=True)
    return rows


def mean_cos(run, batches, ref):
    out = []
    with torch.no_grad():
        for b in batches:
            o = run(**b)
            out.append(zoo.mean_pool(o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0],
                                     b["attention_mask"]))
    return float(F.cosine_similarity(torch.cat(out), ref, dim=-1).mean())


def section_model(model, tok, runs, gate="down"):
    train, held = quotes()
    cal = [encode(tok, train[i * 8:(i + 1) * 8]) for i in range(8)]
    test = [encode(tok, held[i:i + 8]) for i in range(0, 256, 8)]
    with torch.no_grad():
        ref = torch.cat([zoo.mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in test])
    res = {}
    ex1, ex8 = encode(tok, held[:1]), encode(tok, held[:8])
    t0 = time.perf_counter()
    cms = {}
    cal1 = [{k: v[i:i + 1] for k, v in c.items()} for c in cal for i in range(8)]  # the batch-1 example's shape
    for name, ex, calib in (("batch1", ex1, cal1), ("batch8", ex8, cal)):
        cms[name] = sparsecc.compile(model, ex, activation_density=list(DENSITIES), calibration=calib, activation_gate=gate)
    res["compile_s"] = time.perf_counter() - t0
    cm = cms["batch8"]
    print(cm.report())
    res["levels"] = []
    for lv, d in enumerate(DENSITIES):
        cm.set_level(lv)
        res["levels"].append({"level": lv, "density": d, "cosine": mean_cos(cm, test, ref)})
    dense_cos = 1.0
    for name, ex in (("batch1", ex1), ("batch8", ex8)):
        c = cms[name]
        fns = {"torch": lambda: model(**ex)} | {lv: (lambda lv=lv: c(**ex, level=lv)) for lv in range(len(DENSITIES))}
        t = interleaved_ms(fns, runs=runs)
        for r in res["levels"]:
            r[f"{name}_ms"], r[f"{name}_torch_ms"] = t[r["level"]], t["torch"]
            r[f"{name}_speedup"] = t["torch"] / t[r["level"]]
        routed = sum(1 for _ in c.gated_layers())
        res[f"{name}_routed_layers"] = routed
    # the switch itself
    sw = []
    for i in range(200):
        t1 = time.perf_counter()
        cm.set_level(i % len(DENSITIES))
        sw.append((time.perf_counter() - t1) * 1e3)
    res["switch_ms"] = statistics.median(sw)
    res["dense_cos"] = dense_cos
    one = sparsecc.compile(model, ex8, activation_density=DENSITIES[1], calibration=cal, activation_gate=gate)
    res["weight_bytes_levels"], res["weight_bytes_one"] = cm.weight_bytes, one.weight_bytes
    for r in res["levels"]:
        print(f"gate {gate} level {r['level']} (density {r['density']}): cosine {r['cosine']:.4f}; batch 1 "
              f"{r['batch1_torch_ms']:.1f} -> {r['batch1_ms']:.1f} ms ({r['batch1_speedup']:.2f}x); batch 8 "
              f"{r['batch8_torch_ms']:.1f} -> {r['batch8_ms']:.1f} ms ({r['batch8_speedup']:.2f}x)")
    print(f"routed layers: batch 1 {res['batch1_routed_layers']}, batch 8 {res['batch8_routed_layers']}; "
          f"switch {res['switch_ms'] * 1e3:.1f} us; weights with 3 levels {res['weight_bytes_levels'] / 2**20:.2f} MiB,"
          f" with 1 level {res['weight_bytes_one'] / 2**20:.2f} MiB")
    return res


def section_moe(model, tok, runs):
    """MoE-fied FFNs: experts x top-k against fidelity and whole-model latency (batch 1 and 8, seq 128)."""
    train, held = quotes()
    cal = [encode(tok, train[i * 8:(i + 1) * 8]) for i in range(8)]
    test = [encode(tok, held[i:i + 8]) for i in range(0, 256, 8)]
    with torch.no_grad():
        ref = torch.cat([zoo.mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in test])
    ex1, ex8 = encode(tok, held[:1]), encode(tok, held[:8])
    rows = []
    for experts, top_ks in ((4, (1, 2)), (8, (1, 2, 4)), (16, (1, 2, 4))):
        for k in top_ks:
            cm8 = sparsecc.compile(model, ex8, moe=(experts, k), calibration=cal)
            cm1 = sparsecc.compile(model, ex1, moe=(experts, k), calibration=cal)
            recall = [n.meta[ROUTING_META_KEY]["moe"]["recall"] for n in cm8.graph.graph.nodes
                      if n.op == "call_module" and "moe" in n.meta.get(ROUTING_META_KEY, {})]
            row = {"experts": experts, "top_k": k, "cosine": mean_cos(cm8, test, ref),
                   "recall": sum(recall) / len(recall), "blocks": len(recall)}
            for name, ex, cm in (("batch1", ex1, cm1), ("batch8", ex8, cm8)):
                t = interleaved_ms({"torch": lambda: model(**ex), "moe": lambda: cm(**ex)}, runs=runs)
                row[f"{name}_ms"], row[f"{name}_torch_ms"] = t["moe"], t["torch"]
                row[f"{name}_speedup"] = t["torch"] / t["moe"]
            rows.append(row)
            print(f"MoE {experts} experts top-{k}: cosine {row['cosine']:.4f}, router recall {row['recall']:.3f}; batch 1 "
                  f"{row['batch1_torch_ms']:.1f} -> {row['batch1_ms']:.1f} ms ({row['batch1_speedup']:.2f}x); batch 8 "
                  f"{row['batch8_torch_ms']:.1f} -> {row['batch8_ms']:.1f} ms ({row['batch8_speedup']:.2f}x)",
                  flush=True)
    return rows


class ReluMLP(torch.nn.Module):
    """784 → 1024 → ReLU → 1024 → ReLU → 10: an MLP on Fashion-MNIST pixels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(784, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def section_relu(runs):
    torch.manual_seed(0)
    xtr, ytr = datasets.fashion_mnist("train")
    xte, yte = datasets.fashion_mnist("test")
    model = ReluMLP()
    zoo.train(model, datasets.loader(xtr, ytr, batch_size=128, shuffle=True), epochs=2, lr=1e-3, progress=False)
    model.eval()
    res = {"dense_accuracy": zoo.accuracy(model, (xte, yte))}
    cal = [xtr[i * 256:(i + 1) * 256] for i in range(4)]
    levels = [1.0, 0.1, 0.05]
    out = {}
    batch = torch.export.Dim("batch", min=1, max=4096)
    cm = sparsecc.compile(model, xte[:64], activation_density=levels, calibration=cal,
                          dynamic_shapes={"x": {0: batch}}, gate_bias_correction=False)
    gl = cm.gated_layers()
    print(cm.report())
    acc = []
    for lv in range(len(levels)):
        cm.set_level(lv)
        with torch.no_grad():
            correct = sum(int((cm(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum()) for i in range(0, len(xte), 500))
        acc.append(100.0 * correct / len(xte))
    hs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: hs.setdefault(n, a[0])) for n, m in gl]
    cm(xte[:1000], level=0)
    for h in hooks:
        h.remove()
    for b in (1, 64):
        ex = xte[:b]
        with torch.no_grad():
            ref = model(ex)
            h = torch.relu(model.fc1(ex.flatten(1)))
        ((_, g),) = gl
        lt = interleaved_ms({"torch": lambda: model.fc2(h)} | {lv: (lambda lv=lv: (g.set_level(lv), g(h)))
                                                               for lv in range(len(levels))}, runs=runs)
        g.set_level(0)
        diff = float((cm(ex, level=0) - ref).abs().max())
        fns = {"torch": lambda: model(ex)} | {lv: (lambda lv=lv: cm(ex, level=lv)) for lv in range(len(levels))}
        t = interleaved_ms(fns, runs=runs)
        out[b] = {"max_abs_diff_level0": diff, "torch_ms": t["torch"], "fc2_torch_ms": lt["torch"],
                  "fc2_ms": [lt[lv] for lv in range(len(levels))],
                  "levels": [{"density": d, "ms": t[lv], "speedup": t["torch"] / t[lv], "accuracy": acc[lv],
                              "realized": {n: m.realized_density(hs[n], lv) for n, m in gl}}
                             for lv, d in enumerate(levels)]}
        for lv, r in enumerate(out[b]["levels"]):
            print(f"relu MLP batch {b}: level {lv} (density {r['density']}): model {t['torch']:.3f} -> {r['ms']:.3f} ms "
                  f"({r['speedup']:.2f}x), fc2 alone {lt['torch']:.4f} -> {lt[lv]:.4f} ms ({lt['torch'] / lt[lv]:.2f}x); "
                  f"realized {r['realized']}; accuracy {r['accuracy']:.2f}%")
        print(f"relu MLP batch {b}: level 0 (threshold 0) max |cm - torch| = {diff:.2e}")
    res["batches"] = out
    print(f"dense accuracy {res['dense_accuracy']:.2f}%")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=["ffn", "model", "moe", "relu"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--layers", type=int, nargs="*", default=[0, 3, 5], help="ffn section: MiniLM layers")
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS), help="ffn section: token counts")
    ap.add_argument("--gate", nargs="*", default=["down", "both"], help="model section: which inputs are gated")
    ap.add_argument("--out", default=str(OUT / "routing.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("SPARSECC_THREADS", "2")))
    res = {"threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    model = tok = None
    if {"ffn", "model", "moe"} & set(args.only):
        model, tok = zoo.minilm()
    if "ffn" in args.only:
        res["ffn"] = section_ffn(model, tok, args.runs, layers=args.layers, tokens=args.tokens)
    if "model" in args.only:
        res["model"] = {g: section_model(model, tok, args.runs, gate=g) for g in args.gate}
    if "moe" in args.only:
        res["moe"] = section_moe(model, tok, args.runs)
    if "relu" in args.only:
        res["relu"] = section_relu(args.runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
