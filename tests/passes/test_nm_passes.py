"""N:M through the passes: pruning, detection, format choice, lowering to NMLinear, compile(pattern="2:4")."""

import pytest
import torch

import sparsecc
from sparsecc.errors import InvalidSparsityError, UnknownLayerError
from sparsecc.formats import is_nm_sparse
from sparsecc.ir import capture, get_annotation
from sparsecc.passes import ChooseFormat, DetectSparsity, NMPrune, PassContext, PassManager
from sparsecc.passes.detect import detect_nm
from sparsecc.passes.nm import nm_prune_weight
from sparsecc.formats import NM, Candidate, M, candidates
from sparsecc.targets.x86 import X86Target
from tests.conftest import MLP, check_close


class NMTarget(X86Target):
    """The x86 target (real kernels) with a hand-set roofline: N:M slow at M < 8, fast at M >= 8."""

    def roofline(self):
        return {Candidate("dense"): (100.0, 100.0, 30.0, 0.01), Candidate("nm", (2, 4)): (5.0, 150.0, 30.0, 0.01),
                Candidate("nm", (1, 4)): (5.0, 150.0, 30.0, 0.01)}


def test_nm_prune_weight_and_detect():
    torch.manual_seed(0)
    w = torch.randn(6, 10)  # K not a multiple of 4
    p = nm_prune_weight(w, 2, 4)
    assert is_nm_sparse(p, 2, 4) and not is_nm_sparse(w, 2, 4)
    kept = p != 0
    assert int(kept[:, :8].sum()) == 6 * 4 and int(kept[:, 8:].sum()) == 6 * 2  # last group: 2 real columns
    assert torch.equal(nm_prune_weight(p, 2, 4), p)  # idempotent
    assert detect_nm(p) == (2, 4)
    assert detect_nm(nm_prune_weight(w, 1, 4)) == (1, 4)
    assert detect_nm(w) is None
    assert detect_nm(torch.zeros(3, 5)) == (1, 4)


def test_candidates_and_keys():
    assert Candidate("nm", (2, 4)).key == "nm_2:4" and Candidate.parse("nm_2:4") == Candidate("nm", (2, 4))
    nm24 = Candidate("nm", (2, 4))
    assert nm24 in candidates((64, 64), "auto", 0.5, nm=(2, 4))
    assert nm24 in candidates((64, 64), "auto", 0.25, nm=(1, 4))  # a 1:4 weight also fits 2:4
    assert candidates((64, 64), "2:4", 0.5, nm=(2, 4)) == [Candidate("dense"), nm24]
    assert candidates((64, 64), "1:4", 0.5, nm=(2, 4)) == [Candidate("dense")]
    assert nm24 not in candidates((64, 64), "block", 0.5, nm=(2, 4))
    assert NM.flops((2, 4), 8, 8, 16).subs(M, 3) == 2 * 3 * 16
    assert NM.bytes((2, 4), 8, 8, 16).subs(M, 1) == 6 * 16 + 4 * 8 + 4 * 8 + 8 * 8


def test_choose_dense_at_m1_nm_at_m16():
    torch.manual_seed(0)
    model = MLP(64, 256, 64).eval()
    for m, expected in ((1, "dense"), (16, "nm")):
        g = capture(model, (torch.randn(m, 64),))
        ctx = PassContext(target=NMTarget())
        g = PassManager([NMPrune(2, 4), DetectSparsity(), ChooseFormat("2:4", measure=False)]).run(g, ctx)
        a = get_annotation(g.site("fc2").node)
        assert a.pattern == "n:m" and a.nm == (2, 4)
        assert a.format == expected, a.est_ms
        assert set(a.est_ms) == {"dense", "nm_2:4"}


def test_compile_pattern_2_4_matches_pruned_torch(mlp):
    x = torch.randn(3, 5, 32)  # (B, S, K): folded into M = 15
    cm = sparsecc.compile(mlp, (x,), target=NMTarget(), pattern="2:4", measure=False)
    ref = MLP().eval()
    ref.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        for lin in (ref.fc1, ref.fc2, ref.fc3):
            lin.weight.copy_(nm_prune_weight(lin.weight, 2, 4))
        expected = ref(x)
    check_close(cm(x), expected, atol=1e-4, rtol=1e-4)
    from sparsecc.runtime.nm import NMLinear

    kernels = [mod for mod in cm.graph.gm.modules() if isinstance(mod, NMLinear)]
    formats = {a.name: a.format for a in cm.layers}
    assert formats["fc1"] == formats["fc2"] == "nm", formats  # fc3 (16x64) may stay dense: call overhead
    assert len(kernels) == sum(f == "nm" for f in formats.values())
    report = cm.report()
    fc1_row = next(line for line in report.splitlines() if line.startswith("fc1 "))
    assert "nm 2:4" in fc1_row and "nm_2x4_gemm_bias_relu" in fc1_row
    est = {a.name: a.est_ms["nm_2:4"] for a in cm.layers}["fc1"]
    assert f"{est:.3f}" in fc1_row  # the estimate of the chosen candidate is reported


def test_compile_nm_argument_errors(mlp):
    x = torch.randn(4, 32)
    with pytest.raises(InvalidSparsityError, match="sparsity 0.5"):
        sparsecc.compile(mlp, (x,), pattern="2:4", sparsity=0.9, measure=False)
    with pytest.raises(UnknownLayerError, match="nope"):
        sparsecc.compile(mlp, (x,), target=NMTarget(), pattern="2:4", sparsity={"nope": 0.5}, measure=False)
