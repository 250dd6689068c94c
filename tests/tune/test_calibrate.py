"""The host calibration's guard against timings from a busy machine (no kernels timed: the measurement is faked)."""

from __future__ import annotations

import pytest

from sparsecc.errors import CalibrationWarning
from sparsecc.formats import Candidate
from sparsecc.targets import resolve_target
from sparsecc.tune import calibrate as cal

QUIET = (0.004, 0.03, 0.05, 0.9)      # ms: a 16x16 call, then M = 1, 4, 128 on 768x768
BUSY = (4.1, 4.0, 4.2, 4.3)           # every call waited a scheduler time slice


def test_implausible_fits_are_named():
    dense = Candidate("dense")
    fit = cal._fit_candidate(dense, QUIET, 768, 768, 0)
    assert cal.implausible(fit, QUIET) is None
    assert 10 < fit.gflops_gemm < 1e4
    assert "16x16 call took 4.10 ms" in cal.implausible(cal._fit_candidate(dense, BUSY, 768, 768, 0), BUSY)
    slow_tiny = (0.5, 0.4, 0.5, 0.9)
    assert "as long as" in cal.implausible(cal._fit_candidate(dense, slow_tiny, 768, 768, 0), slow_tiny)
    fast = (0.004, 0.0041, 0.0042, 0.0043)  # 768x768 at M = 128 in a microsecond: 10^5 GFLOP/s
    assert "GFLOP/s" in cal.implausible(cal._fit_candidate(dense, fast, 768, 768, 0), fast)


@pytest.mark.parametrize("busy_tries,cached", [(1, True), (3, False)])
def test_busy_timings_are_remeasured_and_never_cached(busy_tries, cached, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(make, n, k):
        calls.append(n)
        return BUSY if len(calls) <= busy_tries else QUIET

    monkeypatch.setattr(cal, "_measure_candidate", fake_measure)
    target = resolve_target("x86")
    if cached:
        model = cal.calibrate(target, candidates=[Candidate("dense")])
        assert "implausible" not in model.source
    else:
        with pytest.warns(CalibrationWarning, match="dense .*16x16 call took 4.10 ms.*not cached"):
            model = cal.calibrate(target, candidates=[Candidate("dense")])
        assert "implausible" in model.source
    assert len(calls) == min(busy_tries + 1, cal.MEASURE_TRIES)
    assert bool(list((tmp_path / "calibration").glob("*.json"))) == cached
    assert model.has(Candidate("dense"))
