"""Fuzz suite, long profile: generated models (``tests/fuzz_grammar.py``) compiled and checked against
``sparsecc.prune``'s torch reference; prints how many were generated, the errors raised by class, the
mismatches (there must be none) and what the models held.

Run: ``python benchmarks/fuzz.py [--examples 500] [--seed 0]`` or ``make fuzz``.
Results: ``benchmarks/results/fuzz.{md,json}``. Exits 1 when any mismatch is found.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.fuzz_grammar import check, specs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz"))
    args = p.parse_args()
    outcomes, layers, patterns, mismatches = collections.Counter(), collections.Counter(), collections.Counter(), []
    t0 = time.perf_counter()

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(spec=specs())
    def run(spec):
        outcome, detail = check(spec)
        outcomes[outcome] += 1
        layers.update(spec["layers"])
        patterns[(spec["pattern"], spec["dtype"])] += 1
        if outcome == "mismatch":
            mismatches.append({"spec": spec, "detail": detail})

    import random

    random.seed(args.seed)
    run()
    total = sum(outcomes.values())
    lines = [f"# Fuzz profile: {total} generated models in {time.perf_counter() - t0:.0f} s (seed {args.seed})", "",
             "| outcome | models |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])]
    lines += ["", f"mismatches: {len(mismatches)}", "", "| layer | uses |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(layers.items())]
    lines += ["", "| pattern, dtype | models |", "|---|---|"]
    lines += [f"| {k[0]}, {k[1]} | {v} |" for k, v in sorted(patterns.items())]
    print("\n".join(lines))
    for m in mismatches[:10]:
        print("MISMATCH", m)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"examples": total, "outcomes": outcomes, "mismatches": mismatches},
                                                   indent=1, default=str))
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
