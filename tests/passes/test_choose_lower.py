import pytest
import sympy
import torch

from sparsecc.errors import PassError
from sparsecc.ir import capture, get_annotation
from sparsecc.passes import (ChooseFormat, DetectSparsity, LowerSparseLinears, MagnitudePrune, PassContext,
                             PassManager)
from sparsecc.formats import BSR, DENSE, Candidate, M
from sparsecc.tune.cost_model import cost_model_for
from tests.conftest import FakeTarget


def _pruned(mlp, sparsity, block=(1, 1), m=16):
    g = capture(mlp, (torch.randn(m, 32),))
    ctx = PassContext(target=FakeTarget())
    g = PassManager([MagnitudePrune(sparsity, block=block), DetectSparsity()]).run(g, ctx)
    return g, ctx


def test_cost_model_formulas():
    assert sympy.simplify(DENSE.flops((), 3, 5, 0) - 30 * M) == 0
    assert BSR.flops((4, 1), 8, 8, 3).subs(M, 2) == 2 * 2 * 3 * 4
    assert BSR.bytes((4, 1), 8, 8, 3).subs(M, 1) == 4 * 12 + 4 * 3 + 4 * 3 + 4 * 8 + 4 * 8
    cm = cost_model_for(FakeTarget())
    # dense 100 GFLOP/s: 2*128*768*768 flop = 0.151 GFLOP -> 1.51 ms (+0.01 overhead), compute bound
    assert cm.estimate_ms(Candidate("dense"), 768, 768, 128) == pytest.approx(0.01 + 2 * 128 * 768 * 768 / 100e6, rel=1e-6)
    # gemv regime at M=1 is memory bound: 4*768*768 bytes / 30 GB/s
    assert cm.estimate_ms(Candidate("dense"), 768, 768, 1) == pytest.approx(0.01 + (4 * 768 * 768 + 4 * 1536) / 30e6, rel=1e-6)


def test_chooses_dense_where_csr_loses_and_bsr_where_it_wins(mlp):
    # density 0.5 unstructured: CSR (int32 index per value) would store more bytes than dense: not offered
    g, ctx = _pruned(mlp, {"fc2": 0.5})
    ChooseFormat("auto", measure=False).run(g, ctx)
    a = get_annotation(g.site("fc2").node)
    assert a.format == "dense" and "csr_1x1" not in a.est_ms and "dense" in a.est_ms
    # density 0.3: CSR is offered (smaller than dense) and at 10 GFLOP/s on 0.3 of the flops loses to dense at 100
    g, ctx = _pruned(mlp, {"fc2": 0.7})
    ChooseFormat("auto", measure=False).run(g, ctx)
    a = get_annotation(g.site("fc2").node)
    assert a.format == "dense" and a.est_ms["csr_1x1"] > a.est_ms["dense"]
    # 8x1 blocks at density 0.1: BSR at 60 GFLOP/s on a tenth of the flops wins
    g, ctx = _pruned(mlp, {"fc2": 0.9}, block=(8, 1))
    ChooseFormat("auto", measure=False).run(g, ctx)
    a = get_annotation(g.site("fc2").node)
    assert a.format == "bsr" and a.format_params == (8, 1)
    assert a.est_ms["bsr_8x1"] < a.est_ms["dense"] and a.est_ms["bsr_8x1"] < a.est_ms["csr_1x1"]
    assert a.est_ms["bsr_16x1"] > a.est_ms["bsr_8x1"]  # fill-in doubles the stored values


def test_pattern_restricts_candidates(mlp):
    g, ctx = _pruned(mlp, {"fc2": 0.9}, block=(8, 1))
    ChooseFormat("unstructured", measure=False).run(g, ctx)
    a = get_annotation(g.site("fc2").node)
    assert set(a.est_ms) == {"dense", "csr_1x1"}
    ChooseFormat("dense", measure=False).run(g, ctx)
    assert get_annotation(g.site("fc2").node).format == "dense"


def test_lower_rewrites_fuses_and_frees_dense_weights(mlp):
    x = torch.randn(16, 32)
    g, ctx = _pruned(mlp, 0.9, block=(8, 1))
    ref = g.gm(x)
    g = PassManager([ChooseFormat("block", measure=False), LowerSparseLinears()]).run(g, ctx)
    mods = [n for n in g.graph.nodes if n.op == "call_module" and n.target.startswith("sparsecc_")]
    assert [n.target for n in mods] == ["sparsecc_fc1", "sparsecc_fc2", "sparsecc_fc3"]
    anns = [get_annotation(n) for n in mods]
    assert [a.epilogue for a in anns] == ["relu", "gelu", None]
    ops = {str(n.target) for n in g.graph.nodes if n.op == "call_function"}
    assert not any("relu" in o or "gelu" in o or "linear" in o for o in ops)
    assert not any(n.op == "get_attr" for n in g.graph.nodes)
    assert not hasattr(g.gm, "fc1") or not hasattr(g.gm.fc1, "weight")
    torch.testing.assert_close(g.gm(x), ref, atol=1e-5, rtol=1e-5)


def test_requires_and_failures_name_the_pass(mlp):
    g = capture(mlp, (torch.randn(2, 32),))
    with pytest.raises(PassError, match="requires \\['detect_sparsity'\\]"):
        PassManager([ChooseFormat()]).run(g, PassContext(target=FakeTarget()))

    class Broken(DetectSparsity):
        name = "broken"

        def run(self, graph, ctx):
            raise ValueError("boom")

    with pytest.raises(PassError, match="'broken' failed \\(passes run before: \\['detect_sparsity'\\]\\).*boom"):
        PassManager([DetectSparsity(), Broken()]).run(g, PassContext(target=FakeTarget()))


def test_dump_dir_and_print_after(mlp, tmp_path, capsys):
    g, _ = _pruned(mlp, 0.5)
    ctx = PassContext(target=FakeTarget(), dump_dir=tmp_path, print_after=("choose_format",))
    PassManager([DetectSparsity(), ChooseFormat(measure=False)]).run(g, ctx)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_detect_sparsity.txt", "01_choose_format.txt"]
    assert "fc1" in (tmp_path / "01_choose_format.txt").read_text()
    out = capsys.readouterr().out
    assert "# after choose_format" in out and "unstructured" in out and "fc2" in out


def test_choose_times_the_runner_up_and_compares_ratios_to_dense():
    from sparsecc.passes.choose_format import MEASURE_WITHIN, choose

    calls = []

    def measure(cand, table):
        calls.append(cand.key)
        return table[cand.key]

    est = {"dense": 10.0, "xcsr": 5.0, "nm_2:4": 6.0, "bsr_16x1": 9.0}
    # the runner-up (6.0 <= 1.5 * 5.0) is timed; it is faster against its own dense time (0.5 vs 0.8), though its
    # absolute time is larger (the machine slowed down between the two measurements)
    cand, ms, dense_ms, reason = choose(est, "M=128", 0.5, "auto",
                                        lambda c: measure(c, {"xcsr": (8.0, 10.0), "nm_2:4": (9.0, 18.0)}))
    assert calls == ["xcsr", "nm_2:4"] and cand.key == "nm_2:4" and (ms, dense_ms) == (9.0, 18.0)
    assert "2.00x faster" in reason and "xcsr 1.25x" in reason
    # both slower than dense: dense, with the dense time of the best ratio
    cand, ms, dense_ms, reason = choose(est, "M=128", 0.5, "auto",
                                        lambda c: {"xcsr": (12.0, 10.0), "nm_2:4": (13.0, 10.0)}[c.key])
    assert cand.is_dense and ms == dense_ms == 10.0 and "≥ dense" in reason
    # a runner-up estimated beyond MEASURE_WITHIN of the best is not timed
    calls.clear()
    far = {"dense": 10.0, "xcsr": 2.0, "nm_2:4": 2.0 * MEASURE_WITHIN + 0.1}
    cand, *_ = choose(far, "M=128", 0.5, "auto", lambda c: measure(c, {"xcsr": (1.0, 10.0)}))
    assert calls == ["xcsr"] and cand.key == "xcsr"
    # no measurement: the lowest estimate
    assert choose(est, "M=128", 0.5, "auto")[0].key == "xcsr"
