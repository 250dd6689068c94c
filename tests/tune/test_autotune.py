"""MetaSchedule autotuning: tuned kernels are correct, the database reloads, resumes, survives crashes,
and compile(tuning_db=...) uses it. Small workloads and 2-4 trials each to stay fast on 2 CI cores."""

from __future__ import annotations

import json
import re

import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsecc
from sparsecc.errors import TuningError
from sparsecc.formats import BlockSparseMatrix
from sparsecc.runtime.kernels import SparseLinear
from sparsecc.targets import x86
from sparsecc.tune import database, lookup, measure, search, space, tuner
from sparsecc.tune.space import Workload


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(512, 1024)
        self.down = torch.nn.Linear(1024, 512)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class SameShapesOtherNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(512, 1024)
        self.second = torch.nn.Linear(1024, 512)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _weight(n, k, block, density, seed=0, empty_rows=True):
    """Random (N, K) weight with whole blocks zero at ``density`` and (optionally) an empty block row."""
    g = torch.Generator().manual_seed(seed)
    br, bc = block
    keep = torch.rand(n // br, k // bc, generator=g) < density
    if empty_rows:
        keep[0] = False  # a block row without nonzeros
    w = torch.randn(n, k, generator=g) * keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return w


def _run_kernel(fn, m_tile, mat, bias, x, activation):
    lin = SparseLinear(mat, bias, activation=activation)
    lin.tuned = _Fixed(fn, m_tile)
    return lin(x)


class _Fixed:
    """A TunedKernels stand-in that always returns one kernel."""

    tag = "fixed"

    def __init__(self, fn, m_tile):
        self.out = (fn, m_tile)

    def kernel(self, regime, m):
        return self.out


def _reference(w, bias, x, activation):
    y = torch.nn.functional.linear(x, w, bias)
    return torch.relu(y) if activation == "relu" else y


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """Two workloads (gemv and gemm regime) tuned for 4 trials each; returns (work_dir, results)."""
    d = tmp_path_factory.mktemp("tunedb")
    wls = [Workload.for_layer((16, 1), 64, 48, 6, m, True, "relu") for m in (1, 16)]
    res = tuner.tune_workloads(wls, d, trials=4, progress=False)
    return d, wls, res


def test_workload_key_buckets():
    wl = Workload.for_layer((16, 1), 1536, 384, 3000, 128, True, "gelu")
    assert wl.key() == "bsr_16x1|N1536|K384|d0.10|M128|bias|gelu"
    assert Workload.for_layer((1, 1), 8, 8, 0, 3, False, None).key() == "csr_1x1|N8|K8|d0.05|M1|nobias|none"
    assert space.density_bucket(3697, 36864) == 0.1  # 10.03% of the blocks: the 0.10 bucket
    assert space.m_bucket(24) == 32 and space.m_bucket(7) == 1 and space.m_bucket(8) == 8
    # every m_tile keeps the accumulator on the stack and divides M; the hand tile comes first
    choices = space.m_tile_choices(Workload.for_layer((16, 1), 64, 64, 4, 16, False, None))
    assert choices[0] == x86.default_params((16, 1), "gemm").m_tile and sorted(choices) == [4, 8]  # hand first
    hand = x86.default_params((16, 1), "gemm")
    g = space.grid(Workload.for_layer((16, 1), 64, 64, 4, 16, False, None), hand.m_tile)
    assert g[0] == hand and len(set(g)) == len(g) == 32


@given(st.integers(1, 64), st.integers(1, 64), st.data())
@settings(max_examples=60, deadline=None)
def test_density_bucket_covers_the_layer(nb, kb, data):
    nnzb = data.draw(st.integers(0, nb * kb))
    d = space.density_bucket(nnzb, nb * kb)
    actual = nnzb / (nb * kb)
    assert abs(d - max(actual, space.DENSITY_STEP)) <= space.DENSITY_STEP / 2 + 1e-9
    assert space.DENSITY_STEP <= d <= 1.0
    # densities within a bucket share the key (so another model's layer of the same shape reuses it)
    near = min(nb * kb, int(round((d + space.DENSITY_STEP / 4) * nb * kb)))
    if abs(near / (nb * kb) - d) < space.DENSITY_STEP / 2 - 1e-9:
        assert space.density_bucket(near, nb * kb) == d


@given(st.sampled_from([(16, 1), (1, 1), (1, 8), (4, 4)]), st.sampled_from([1, 16, 128]), st.data())
@settings(max_examples=12, deadline=None)
def test_trace_encodes_its_knobs(block, m, data):
    """Every grid point's trace decodes to its knob values (no build: schedules only)."""
    wl = Workload.for_layer(block, 64, 32, 20, m, True, None)
    mt = data.draw(st.sampled_from(space.m_tile_choices(wl)))
    p = data.draw(st.sampled_from(space.grid(wl, mt)))
    sch = tvm.s_tir.Schedule(space.workload_func(wl, mt), enable_check=False)
    space.schedule_point(sch, wl, p)
    assert space.params_from_trace(sch.trace, mt) == p


def test_tuned_records_build_correct_kernels(tuned_dir):
    d, wls, res = tuned_dir
    assert [r.trials for r in res] == [4, 4]
    assert all(r.choice in ("tuned", "hand") and r.best_ms > 0 and r.hand_ms > 0 for r in res)
    assert all(r.ratio <= 1.0 for r in res)  # never slower than the hand schedule (same measurement)
    db = database.open_json_database(d)
    records = db.get_all_tuning_records()
    assert len(records) == 8
    w = _weight(64, 48, (16, 1), 0.3)
    mat = BlockSparseMatrix.from_dense(w, (16, 1))
    bias = torch.randn(64)
    target = x86.host_target()
    for rec in records[:4] + records[-4:]:
        mt = int(rec.workload.mod["main"].attrs["sparsecc.m_tile"])
        sch = space.schedule_from_trace(rec.trace, (16, 1), bias=True, activation="relu", m_tile=mt, k=48)
        fn = measure.runnable(x86.build(sch.mod, target))["main"]
        for m in (1, 13, 16):  # 13: not a multiple of the register tile
            x = torch.randn(m, 48)
            torch.testing.assert_close(_run_kernel(fn, mt, mat, bias, x, "relu"), _reference(w, bias, x, "relu"),
                                       rtol=1e-5, atol=1e-5)


def test_database_reloads_to_same_schedules(tuned_dir):
    d, wls, res = tuned_dir
    first = database.open_json_database(d)
    again = database.open_json_database(d)  # a fresh load of the same files
    a = sorted(str(r.trace) for r in first.get_all_tuning_records())
    b = sorted(str(r.trace) for r in again.get_all_tuning_records())
    assert a == b and len(a) == 8
    for r in again.get_all_tuning_records():
        mt = int(r.workload.mod["main"].attrs["sparsecc.m_tile"])
        p = space.params_from_trace(r.trace, mt)
        replayed = space.schedule_from_trace(r.trace, (16, 1), bias=True, activation="relu", m_tile=mt, k=48)
        # the trace replays to exactly the script the x86 rule makes from the same knob values
        sch = tvm.s_tir.Schedule(space.generic_template((16, 1), bias=True, activation="relu", m_tile=mt, k=48),
                                 enable_check=False)
        space.apply_params(sch, (16, 1), "gemm", p)
        assert replayed.mod.script() == sch.mod.script()


def test_resume_skips_done_workloads(tuned_dir):
    d, wls, _ = tuned_dir
    lines = (d / "database_tuning_record.json").read_text().count("\n")
    res = tuner.tune_workloads(wls, d, trials=4, progress=False)
    assert all(r.skipped for r in res)
    assert (d / "database_tuning_record.json").read_text().count("\n") == lines
    res = tuner.tune_workloads(wls, d, trials=2, progress=False)  # fewer trials: also done
    assert all(r.skipped for r in res)


def test_interrupted_run_leaves_loadable_db(tmp_path, monkeypatch):
    wls = [Workload.for_layer((8, 1), 32, 32, 4, 1, False, None),
           Workload.for_layer((8, 1), 32, 64, 4, 1, False, None)]
    real = tuner.tune_one
    calls = []

    def crash_on_second(wl, *args, **kwargs):
        calls.append(wl)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(wl, *args, **kwargs)

    monkeypatch.setattr(tuner, "tune_one", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        tuner.tune_workloads(wls, tmp_path, trials=2, progress=False)
    monkeypatch.setattr(tuner, "tune_one", real)
    index = json.loads((tmp_path / database.INDEX_NAME).read_text())
    (entries,) = index["entries"].values()
    assert list(entries) == [wls[0].key()]
    # a record line cut short by a crash is dropped on load; the complete ones stay
    with open(tmp_path / "database_tuning_record.json", "a") as f:
        f.write('[0,[[["SampleCateg')
    db = database.open_json_database(tmp_path)
    assert len(db.get_all_tuning_records()) == 2
    res = tuner.tune_workloads(wls, tmp_path, trials=2, progress=False)
    assert [r.skipped for r in res] == [True, False]
    assert len(database.open_json_database(tmp_path).get_all_tuning_records()) == 4
    # a damaged line in the middle (a flipped byte): skipped with a warning, the other records still load
    path = tmp_path / "database_tuning_record.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10] + "#" + lines[1][11:]
    path.write_text("\n".join(lines) + "\n")
    from sparsecc.errors import CacheWarning

    with pytest.warns(CacheWarning, match=r"skipped 1 damaged entries: database_tuning_record.json line 2"):
        assert len(database.open_json_database(tmp_path).get_all_tuning_records()) == 3


def test_compile_uses_tuning_db_and_other_model_reuses_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TwoLayer()
    x = torch.randn(16, 512)  # big enough that the cost model picks BSR at 90% sparsity (256x128 stayed dense)
    # choose the tuned schedule whenever one was measured, so the test exercises the tuned path
    monkeypatch.setattr(tuner, "KEEP_HAND_MARGIN", -100.0)
    summary = sparsecc.tune(model, (x,), sparsity=0.9, pattern="block", block_shape=(16, 1), trials=3,
                            work_dir=tmp_path, rows=[1, 16], progress=False)
    rows = summary.rows()
    assert len(rows) == 4 and all(r["choice"] == "tuned" for r in rows)
    # the block the cost model picks for weights pruned in 16x1 blocks: 16x1 or a smaller column block that tiles
    # them without fill-in (which one depends on this machine's calibration)
    assert re.search(r"bsr_(16|8|4)x1\|N1024\|K512\|", str(summary)) and "|M16|bias|relu" in str(summary)
    with pytest.raises(TuningError):
        sparsecc.compile(model, (x,), tuning_db=tmp_path / "missing")

    cm = sparsecc.compile(model, (x,), sparsity=0.9, pattern="block", block_shape=(16, 1), tuning_db=tmp_path,
                          measure=False)
    ref = sparsecc.prune(model, 0.9, block_shape=(16, 1))
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)
    report = cm.report()
    assert report.count("tuned(M=1,16)") == 2
    used = [m for m in cm.graph.gm.modules() if isinstance(m, SparseLinear)]
    assert all(m.tuned is not None and m.tuned.kernel("gemm", 16) is not None for m in used)

    # same shapes and pattern, different class, layer names and weights: the records serve it
    torch.manual_seed(1)
    other = SameShapesOtherNames()
    again = sparsecc.tune(other, (x,), sparsity=0.9, pattern="block", block_shape=(16, 1), trials=3,
                          work_dir=tmp_path, rows=[1, 16], progress=False)
    assert all(r["skipped"] for r in again.rows())
    cm2 = sparsecc.compile(other, (x,), sparsity=0.9, pattern="block", block_shape=(16, 1), tuning_db=tmp_path,
                           measure=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert cm2.report().count("tuned(M=1,16)") == 2
    ref2 = sparsecc.prune(other, 0.9, block_shape=(16, 1))
    for m in (1, 5, 16, 37):  # gemv and gemm regimes, M not a multiple of the register tile
        xm = torch.randn(m, 512)
        torch.testing.assert_close(cm2(xm), ref2(xm), rtol=1e-5, atol=1e-5)


def test_tune_rejects_bad_arguments(tmp_path):
    with pytest.raises(TuningError):
        tuner.tune_workloads([Workload.for_layer((16, 1), 64, 48, 6, 1, True)], tmp_path, trials=0)
    with pytest.raises(TuningError):
        sparsecc.tune(TwoLayer(), (torch.randn(2, 512),), target="cuda", work_dir=tmp_path)
    (tmp_path / database.INDEX_NAME).write_text("{not json")
    with pytest.raises(TuningError):
        lookup.TuningDatabase(tmp_path)


def test_time_budget_stops_and_resumes(tmp_path, monkeypatch):
    wls = [Workload.for_layer((8, 1), 32, 32, 4, 16, False, None)]
    assert tuner.tune_workloads(wls, tmp_path, trials=4, time_budget_s=0.0, progress=False) == []
    assert not (tmp_path / database.INDEX_NAME).exists()
    # the deadline passes inside the workload: fewer trials than asked, marked incomplete, resumed later
    import time as real_time

    # one clock for the tuner and GridSearch: the budget runs out after the first candidates are handed out
    class Clock:
        calls = 0
        perf_counter = staticmethod(real_time.perf_counter)

        @classmethod
        def monotonic(cls):
            cls.calls += 1
            return 0.0 if cls.calls <= 4 else 1e9

    monkeypatch.setattr(tuner, "time", Clock)
    monkeypatch.setattr(search, "time", Clock)
    (res,) = tuner.tune_workloads(wls, tmp_path, trials=4, time_budget_s=100.0, progress=False)
    assert not res.complete and 1 <= res.trials < 4
    monkeypatch.setattr(tuner, "time", real_time)
    monkeypatch.setattr(search, "time", real_time)
    (again,) = tuner.tune_workloads(wls, tmp_path, trials=4, progress=False)
    assert not again.skipped and again.complete and again.trials >= 4
