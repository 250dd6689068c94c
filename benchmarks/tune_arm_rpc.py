"""ARM tuning through TVM's RPC tracker on localhost, with an aarch64 server under qemu-aarch64.

    python benchmarks/tune_arm_rpc.py                  # all-MiniLM-L6-v2, 80% in 16x1 blocks, seq 32, 8 trials
    python benchmarks/tune_arm_rpc.py --trials 16 --seq 64
    python benchmarks/tune_arm_rpc.py --tracker HOST:PORT --key rk3399   # a real board already on a tracker

Steps, each printed with its time:

1. start a tracker (``tvm.rpc.tracker.Tracker``) and one emulated device registered under ``--key``
   (:class:`sparsecc.targets.qemu_rpc.QemuRPCServer`), unless ``--tracker`` names one;
2. ``compile(target="arm", rpc=...)``: the cost model is fitted to kernels timed on the device;
3. ``sparsecc.tune(..., target="arm", rpc=...)``: every sparse workload tuned on the device; the records
   written to the work folder are listed;
4. a fresh ``TuningDatabase`` reads them back; ``compile(..., tuning_db=work, rpc=...)`` and ``cm.export``
   build the aarch64 artifact with the tuned kernels (the manifest lists them), also one with the hand
   schedules;
5. both artifacts run under qemu: max abs difference to the compiled module, and their emulated latency
   (median of ``--repeat`` forwards in one qemu process).

The model is pruned by magnitude without recovery (a speed run, not an accuracy one), and every time under
qemu is an emulation time: compare the two artifacts with each other, never with a board.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import sparsecc
from sparsecc import datasets, zoo
from sparsecc.peers import Hidden
from sparsecc.runtime.export import run_artifact_under_qemu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--block", default="16x1")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tracker", default=None, help="use this tracker (host:port) instead of starting one")
    ap.add_argument("--key", default="arm")
    ap.add_argument("--work-dir", default=None, help="tuning folder (default: a temporary one)")
    args = ap.parse_args()
    block = tuple(int(v) for v in args.block.split("x"))

    t0 = time.perf_counter()
    tracker = server = None
    if args.tracker is None:
        from tvm.rpc.tracker import Tracker

        from sparsecc.targets.qemu_rpc import QemuRPCServer

        tracker = Tracker("127.0.0.1", port=9190, port_end=9290, silent=True)
        server = QemuRPCServer(f"127.0.0.1:{tracker.port}", args.key).start()
        args.tracker = f"127.0.0.1:{tracker.port}"
        print(f"[{time.perf_counter() - t0:6.1f} s] tracker {args.tracker}, qemu aarch64 server on port "
              f"{server.port}, key {args.key!r}")
    rpc = f"{args.tracker}/{args.key}"
    try:
        model, tok = zoo.minilm()
        pruned = Hidden(sparsecc.prune(model, args.sparsity, block_shape=block)).eval()
        enc = tok(datasets.fortunes_sentences("heldout")[:1], return_tensors="pt", truncation=True,
                  max_length=args.seq, padding="max_length")
        x = (enc["input_ids"], enc["attention_mask"])
        kw = dict(target="arm", pattern="block", block_shape=block, dynamic_shapes=None, rpc=rpc)

        cm = sparsecc.compile(pruned, x, **kw)
        from sparsecc.tune.cost_model import cost_model_for

        print(f"[{time.perf_counter() - t0:6.1f} s] compile(rpc=...): cost model {cost_model_for(cm.target).source}")
        formats = {}
        for a in cm.layers:
            formats[a.format] = formats.get(a.format, 0) + 1
        print(f"  formats: {formats}")

        work = Path(args.work_dir or tempfile.mkdtemp(prefix="sparsecc-tune-arm-"))
        summary = sparsecc.tune(pruned, x, trials=args.trials, work_dir=work, progress=False,
                                **kw)
        print(f"[{time.perf_counter() - t0:6.1f} s] tuned over RPC into {work}:")
        print(summary)
        for f in sorted(work.rglob("*.json")):
            lines = sum(1 for _ in f.open()) if f.name.startswith("database") else None
            print(f"  {f.relative_to(work)}" + (f": {lines} lines" if lines is not None else ""))

        from sparsecc.tune.lookup import TuningDatabase

        db = TuningDatabase(work)
        tuned = {k: e for k, e in db.entries(cm.target.deploy_tvm_target()).items() if e["choice"] == "tuned"}
        print(f"  reloaded: {len(db.entries(cm.target.deploy_tvm_target()))} entries for the aarch64 target, "
              f"{len(tuned)} with a tuned schedule")

        with tempfile.TemporaryDirectory() as tmp:
            arts = {}
            for name, db_arg in (("hand", None), ("tuned", work)):
                c = sparsecc.compile(pruned, x, tuning_db=db_arg, **kw)
                arts[name] = (c.export(Path(tmp) / name), c)
            man = json.loads((Path(tmp) / "tuned" / "manifest.json").read_text())
            print(f"[{time.perf_counter() - t0:6.1f} s] exported; tuned kernels in the artifact: "
                  f"{len(man['tuned_kernels'])} {man['tuned_kernels']}")
            with torch.no_grad():
                ref = cm(*x)
            ms = {}
            for name, (art, c) in arts.items():
                y, t = run_artifact_under_qemu(art, *x, repeat=args.repeat)
                ms[name] = t
                print(f"  {name:>5} artifact under qemu: max abs diff to cm {float((y - ref).abs().max()):.1e}, "
                      f"emulated {t:.1f} ms (median of {args.repeat})")
            same = "" if man["tuned_kernels"] else " (the same kernels: tuning kept every hand schedule, so this is noise)"
            print(f"  tuned / hand (emulated): {ms['tuned'] / ms['hand']:.2f}x{same}")
        print(f"[{time.perf_counter() - t0:6.1f} s] done")
    finally:
        if server is not None:
            server.stop()
        if tracker is not None:
            tracker.terminate()


if __name__ == "__main__":
    main()
