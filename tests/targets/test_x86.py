"""x86 target detection and schedule rules."""

import pytest

from sparsecc.errors import KernelBuildError
from sparsecc.formats import BLOCK_SHAPES
from sparsecc.targets import x86


def test_host_target_keeps_vector_isa():
    t = x86.host_target()
    cfg = t.export()
    assert cfg["kind"] == "llvm"
    assert cfg["mcpu"] not in ("native", "generic", "")
    flags = x86._cpu_flags()
    if "avx512f" in flags:
        assert x86.target_vector_bits(t) == 512
    elif "avx2" in flags:
        assert x86.target_vector_bits(t) >= 256


def test_num_threads(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert x86.num_threads() == 3


def test_regime_for():
    assert [x86.regime_for(m) for m in (0, 1, 7, 8, 1024)] == ["gemv"] * 3 + ["gemm"] * 2


@pytest.mark.parametrize("block", BLOCK_SHAPES)
def test_exactly_one_rule_per_block(block):
    func = x86.template_for(block, "gemm", bias=False, activation=None)
    applicable = [r for r in x86.RULES if r(func, None, x86.default_params(block, "gemm")) is not None]
    assert len(applicable) == 1


def test_schedule_is_parallel_and_vectorized():
    sch = x86.schedule_linear((8, 1), "gemm", bias=True, activation="relu")
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized(8)" in text
    asm = x86.build(sch).mod.inspect_source("asm")
    assert "vfmadd" in asm  # FMA vector code, not generic x86-64


def test_unknown_regime():
    with pytest.raises(KernelBuildError, match="gemx"):
        x86.schedule_linear((8, 1), "gemx", bias=False)
