"""The export's packed dense linear (``sparsecc.codegen.dense``) against torch's GEMM, per register tile.

MiniLM's linear shapes at M = 128 (batch 1 x 128 tokens) and M = 1024 (batch 8); tiles of 6, 4 and 2 rows by a
panel of two vectors (16 columns on AVX2), the one :func:`sparsecc.targets.x86.dense_params` picks marked "(rule)".
Kernels run on TVM's pool with every CPU of the process (``sparsecc.runtime.deploy.use_threads``), torch with
``--threads``. Torch is timed first, for every shape, before TVM's pool starts: once both pools live in one
process, each one's idle workers slow the other's next call. The tiles' calls are then interleaved.

Then the attention softmax over MiniLM's scores (12 heads x 128 x 128 per sequence, batch 1 and 8): torch's,
the export's row kernel (``sparsecc.codegen.softmax``) and TVM's own legalized softmax, each through the export's
Relax pipeline.

Printed per shape: median ms and GFLOP/s of torch and of each tile, and each tile's time / torch's; per softmax
shape the three medians in ms and their ratios to torch.

Run: ``python benchmarks/dense.py`` (about a minute); ``--runs 5`` for a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from sparsecc.runtime.deploy import use_threads

SHAPES = [(384, 384), (1536, 384), (384, 1536)]  # (N, K): attention projections, FFN up, FFN down
SCORES = [(12, 128, 128), (96, 128, 128)]  # (batch x heads, query, key)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, nargs="+", default=[128, 1024])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    use_threads(args.threads)
    import tvm

    from sparsecc.codegen.dense import pack_weight, padded_n
    from sparsecc.runtime.timing import interleaved_ms
    from sparsecc.targets import x86

    lanes, regs = x86.host_vector_file()
    print(f"{x86.host_target()}: {regs} vector registers of {lanes} float32 lanes, {args.threads} threads")
    cases = [(m, n, k, torch.randn(m, k), torch.randn(n, k), torch.randn(n)) for m in args.m for n, k in SHAPES]
    torch_ms = [interleaved_ms({"torch": lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b)},
                               runs=args.runs)["torch"] for _, _, _, x, w, b in cases]
    scores = [torch.randn(shape) for shape in SCORES]
    torch_softmax_ms = [interleaved_ms({"torch": lambda s=s: torch.softmax(s, -1)}, runs=args.runs)["torch"]
                        for s in scores]
    for (m, n, k, x, w, b), t_torch in zip(cases, torch_ms):
        rule = x86.dense_params(m, k, lanes, regs)
        tiles = {mr: dataclasses.replace(rule, mr=mr) for mr in sorted({6, 4, 2, rule.mr}, reverse=True)}
        ref = torch.nn.functional.linear(x, w, b).numpy()
        fns = {}
        for mr, p in tiles.items():
            mp = -(-m // p.mr) * p.mr
            lib = x86.build(x86.schedule_dense(mp, n, k, bias=True, params=p))
            xp = np.zeros((mp, k), np.float32)
            xp[:m] = x.numpy()
            a = [tvm.runtime.tensor(xp), tvm.runtime.tensor(pack_weight(w.numpy(), p.nb)),
                 tvm.runtime.tensor(b.numpy()), tvm.runtime.tensor(np.zeros((mp, padded_n(n, p.nb)), np.float32))]
            lib(*a)
            assert np.abs(a[-1].numpy()[:m, :n] - ref).max() < 1e-3
            fns[f"{mr}x{p.nb}" + (" (rule)" if mr == rule.mr else "")] = lambda lib=lib, a=a: lib(*a)
        ms = {"torch": t_torch, **interleaved_ms(fns, runs=args.runs)}
        gflop = 2.0 * m * n * k / 1e9
        cells = ", ".join(f"{name} {t:.3f} ms {gflop / t * 1e3:.0f} GFLOP/s ({t / t_torch:.2f}x)"
                          for name, t in ms.items())
        print(f"M {m} W ({n}, {k}): {cells}")
    for s, t_torch in zip(scores, torch_softmax_ms):
        vms = {name: _softmax_vm(tuple(s.shape), vector) for name, vector in (("sparsecc", True), ("TVM", False))}
        xs = tvm.runtime.tensor(s.numpy())
        for name, vm in vms.items():
            assert np.abs(vm(xs).numpy() - torch.softmax(s, -1).numpy()).max() < 1e-5, name
        ms = interleaved_ms({name: lambda vm=vm: vm(xs) for name, vm in vms.items()}, runs=args.runs)
        cells = ", ".join(f"{name} {t:.3f} ms ({t / t_torch:.2f}x)" for name, t in ms.items())
        print(f"softmax {tuple(s.shape)}: torch {t_torch:.3f} ms, {cells}")


def _softmax_vm(shape, vector_softmax):
    """``softmax(x, -1)`` of a float32 ``shape`` built by the export's Relax pipeline, as a callable."""
    import tvm
    from tvm import relax

    from sparsecc.runtime.export import _relax_pipeline
    from sparsecc.targets import x86

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x, axis=-1))
        bb.emit_func_output(y)
    target = x86.host_target()
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=_relax_pipeline(target, vector_softmax=vector_softmax))
    return relax.VirtualMachine(ex, tvm.cpu())["main"]


if __name__ == "__main__":
    main()
