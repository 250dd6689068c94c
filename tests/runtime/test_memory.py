"""keep_freed_memory: large tensors are reused without fresh page faults."""

import resource
import sys

import pytest
import torch

from sparsecc.runtime.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_allocations_stop_faulting():
    assert keep_freed_memory()
    for _ in range(2):
        torch.ones(4 << 20)  # 16 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(4 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 500  # 5 x 4096 pages without it
