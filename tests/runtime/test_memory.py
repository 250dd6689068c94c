"""keep_freed_memory: large tensors are reused without fresh page faults (checked in a fresh process)."""

import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from sparsecc.runtime.memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    for _ in range(3):
        torch.ones(4 << 20)  # 16 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(4 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_allocations_stop_faulting():
    assert _faults("keep") < 0.2 * max(_faults("default"), 1)
