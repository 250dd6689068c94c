"""Page faults of repeated large allocations with and without ``keep_freed_memory()``.

Memory behaviour, so it is a benchmark, not a test: glibc's heap placement
depends on address-space randomization and on which libraries are mapped, and
the counts vary from run to run (measured here, 4 fresh processes per mode:
default 0 to 20,480 faults, keep 4,096 to 12,288 for five 16 MB tensors).

Run: ``python benchmarks/memory_faults.py [--runs 5]``; prints the median minor
page faults of each mode over fresh processes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from sparsecc.runtime.memory import keep_freed_memory
    if sys.argv[1] == "keep" and not keep_freed_memory():
        sys.exit("keep_freed_memory() is not available (not glibc)")
    for _ in range(3):
        torch.ones(4 << 20)  # 16 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(4 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> int:
    """Minor page faults of five 16 MB allocations in a fresh process (``mode``: "keep" or "default")."""
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         timeout=120)
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    res = {m: [faults(m) for _ in range(args.runs)] for m in ("default", "keep")}
    for m, v in res.items():
        print(f"{m:8s} median {statistics.median(v):8.0f} faults  runs {v}")


if __name__ == "__main__":
    main()
