"""all-MiniLM-L6-v2 on the same pruned weights in every engine: torch dense, onnxruntime, DeepSparse, sparsecc.

One invocation times, for each weight configuration (50/70/90% unstructured, 2:4, 90% in 16x1 blocks) and
batch (1, 8; seq 128):

* torch dense (the unpruned model) and torch on the pruned weights, in this process;
* onnxruntime on the ONNX export of the pruned model (``pip install -e .[bench]``), in this process;
* sparsecc ``compile(pruned, pattern="auto")`` (formats chosen per layer by the cost model and measurement);
* DeepSparse 1.8.0 (``compile_model(path, batch_size=B, num_cores=threads)``) on the same ONNX file, in its own
  virtual environment (``$SPARSECC_CACHE_DIR/deepsparse-venv``, created and installed with pip on first use;
  skipped with the reason printed where that fails), in a child process right after the in-process timings.

torch dense, torch pruned, onnxruntime and sparsecc are timed in the same interleaved rounds; DeepSparse's
median comes from its own process in the same invocation. Ratios are torch dense time / engine time (higher
is better). Each engine's output is checked against torch on the pruned weights.

Run: ``python benchmarks/peers.py [--threads 2] [--runs 15] [--configs 50,70,90,2:4,90b]``
Results: ``benchmarks/results/peers.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparsecc  # noqa: E402
from sparsecc import zoo  # noqa: E402
from sparsecc.cache import cache_root  # noqa: E402
from sparsecc.passes.nm import nm_prune_weight  # noqa: E402
from sparsecc.peers import Hidden, onnx_export, ort_session  # noqa: E402
from sparsecc.runtime.compiled import module_bytes  # noqa: E402
from sparsecc.runtime.timing import interleaved_ms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SENTENCES = ["A man is playing a guitar.", "The new movie is awesome.", "The cat sits outside.",
             "A woman is reading a book in the park.", "Stocks fell sharply on Monday.",
             "He drove to the office early.", "The weather will be sunny tomorrow.", "I love pasta with basil."]
CONFIGS = {"50": "50% unstructured", "70": "70% unstructured", "90": "90% unstructured", "2:4": "2:4",
           "90b": "90% in 16x1 blocks"}

DS_SCRIPT = r'''
import json, sys, time
import numpy as np
from deepsparse import compile_model
path, batch, threads, runs, io = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
inputs = [np.load(f"{io}/input_ids.npy"), np.load(f"{io}/attention_mask.npy")]
engine = compile_model(path, batch_size=batch, num_cores=threads)
for _ in range(3):
    out = engine(inputs)
ts = []
for _ in range(runs):
    t0 = time.perf_counter(); engine(inputs); ts.append((time.perf_counter() - t0) * 1e3)
np.save(f"{io}/deepsparse_out.npy", out[0])
print(json.dumps({"ms": float(np.median(ts))}))
'''


def pruned_model(model, config: str):
    """A pruned copy of ``model``: per-layer magnitude pruning (``sparsecc.prune``) or 2:4 along K."""
    if config == "2:4":
        import copy

        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for m in pruned.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(nm_prune_weight(m.weight, 2, 4))
        return pruned
    if config == "90b":
        return sparsecc.prune(model, 0.9, block_shape=(16, 1))
    return sparsecc.prune(model, int(config) / 100)


def deepsparse_python() -> tuple:
    """``(python, None)`` of the DeepSparse venv (created and installed on first use), or ``(None, reason)``."""
    venv = cache_root() / "deepsparse-venv"
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        probe = subprocess.run([str(py), "-c", "import deepsparse"], capture_output=True, text=True)
        if probe.returncode != 0:
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "deepsparse==1.8.0", "onnx"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                return None, f"pip install deepsparse==1.8.0 failed: {r.stderr.strip()[-300:]}"
        return py, None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot create the DeepSparse venv: {e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--configs", default="50,70,90,2:4,90b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-deepsparse", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "peers"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.minilm()
    ds_py, ds_why = (None, "--no-deepsparse") if args.no_deepsparse else deepsparse_python()
    if ds_py is None:
        print(f"DeepSparse skipped: {ds_why}")
    rows = []
    head = ("| weights | batch | torch dense ms | torch pruned | onnxruntime | DeepSparse | sparsecc | "
            "sparsecc weights / dense | max diff (sparsecc, DeepSparse) |")
    lines = [f"# all-MiniLM-L6-v2, seq 128, {args.threads} threads, ratio = torch dense time / engine time",
             "", head, "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for cfg in args.configs.split(","):
        pruned = pruned_model(model, cfg)
        for b in (int(v) for v in args.batches.split(",")):
            full = tok((SENTENCES * 8)[:b], padding="max_length", max_length=128, truncation=True,
                       return_tensors="pt")
            enc = {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]}
            cm = sparsecc.compile(pruned, enc, pattern="auto")
            with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
                ref = Hidden(pruned)(**enc)
                y_cm = cm(**enc).last_hidden_state
                onnx_path = Path(tmp) / "model.onnx"
                onnx_export(pruned, enc, onnx_path)
                fns = {"dense": Hidden(model), "pruned": Hidden(pruned),
                       "sparsecc": lambda input_ids, attention_mask: cm(input_ids=input_ids,
                                                                          attention_mask=attention_mask)}
                ort_fn = ort_session(onnx_path, args.threads)
                if ort_fn is not None:
                    fns["onnxruntime"] = ort_fn
                t = interleaved_ms(fns, runs=args.runs, **enc)
                ds_ms = ds_diff = None
                if ds_py is not None:
                    np.save(Path(tmp) / "input_ids.npy", enc["input_ids"].numpy())
                    np.save(Path(tmp) / "attention_mask.npy", enc["attention_mask"].numpy())
                    r = subprocess.run([str(ds_py), "-c", DS_SCRIPT, str(onnx_path), str(b), str(args.threads),
                                        str(args.runs), tmp], capture_output=True, text=True)
                    if r.returncode == 0:
                        ds_ms = json.loads(r.stdout.strip().splitlines()[-1])["ms"]
                        ds_diff = float(np.abs(np.load(Path(tmp) / "deepsparse_out.npy") - ref.numpy()).max())
                    else:
                        print(f"DeepSparse failed on {cfg} batch {b}: {r.stderr.strip()[-300:]}")
                diff = float((y_cm - ref).abs().max())
            d = t["dense"]
            row = {"config": CONFIGS[cfg], "batch": b, "ms": {**t, "deepsparse": ds_ms},
                   "ratio": {k: d / v for k, v in t.items()} | ({"deepsparse": d / ds_ms} if ds_ms else {}),
                   "weights_ratio": cm.weight_bytes / module_bytes(model), "max_diff": diff, "deepsparse_diff": ds_diff,
                   "formats": {f: sum(1 for a in cm.layers if a.format == f) for f in {a.format for a in cm.layers}}}
            rows.append(row)
            r_ = row["ratio"]
            line = (f"| {CONFIGS[cfg]} | {b} | {d:.2f} | {r_['pruned']:.2f}x | "
                    f"{r_['onnxruntime']:.2f}x | " if "onnxruntime" in r_ else f"| {CONFIGS[cfg]} | {b} | {d:.2f} | "
                    f"{r_['pruned']:.2f}x | - | ")
            line += (f"{r_['deepsparse']:.2f}x | " if "deepsparse" in r_ else "- | ")
            line += (f"{r_['sparsecc']:.2f}x | {row['weights_ratio']:.2f} | {diff:.1e}, "
                     + (f"{ds_diff:.1e} |" if ds_diff is not None else "- |"))
            lines.append(line)
            print(line, f"  formats {row['formats']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads,
                                                    "runs": args.runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
