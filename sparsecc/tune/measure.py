"""Building and timing tuning candidates in this process, the way the runtime calls kernels.

MetaSchedule's own builders and runners start worker processes; each would
spend seconds importing TVM on a 2-core machine, and the runner must see a
valid sparse structure (:func:`~sparsecc.tune.space.make_args`). So
candidates are built (:class:`InProcessBuilder`) and run
(:class:`InProcessRunner`) here, and every time is taken as
:class:`~sparsecc.runtime.kernels.SparseLinear` calls the kernel
(:class:`Measurement`, :func:`compare`).

MetaSchedule: Shao et al., "Tensor Program Optimization with Probabilistic
Programs" (NeurIPS 2022).
"""

from __future__ import annotations

import itertools
import time

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

from sparsecc.errors import KernelBuildError
from sparsecc.targets import x86
from sparsecc.tune import space
from sparsecc.tune.database import target_key
from sparsecc.tune.space import Workload

__all__ = [
    "InProcessBuilder",
    "InProcessRunner",
    "Measurement",
    "RemoteBench",
    "compare",
    "drop_artifacts",
    "pool_wakeup_ms",
    "runnable",
]

_ARTIFACTS: dict = {}  # token -> runtime module built by InProcessBuilder, popped by InProcessRunner
_TOKENS = itertools.count()
_WAKEUP: dict = {}  # target key -> pool_wakeup_ms


def runnable(lib):
    """The runtime module of a ``tvm.compile`` result (an ``Executable`` in TVM 0.27).

    Parameters
    ----------
    lib : tvm.runtime.Executable or tvm.runtime.Module
        As returned by :func:`sparsecc.targets.x86.build`.

    Returns
    -------
    tvm.runtime.Module
        Its packed function ``main`` takes the kernel's arguments and output.
    """
    return lib.jit() if hasattr(lib, "jit") else lib


# -- MetaSchedule builder and runner --------------------------------------------------

@derived_object
class InProcessBuilder(PyBuilder):
    """Builds candidates in this process with :func:`sparsecc.targets.x86.build`; the artifact is a
    token for :class:`InProcessRunner` (no shared library written)."""

    def build(self, build_inputs):
        results = []
        for bi in build_inputs:
            try:
                lib = x86.build(bi.mod, bi.target)
            except KernelBuildError as e:
                results.append(BuilderResult(None, str(e)))
                continue
            token = f"sparsecc-inprocess://{next(_TOKENS)}"
            _ARTIFACTS[token] = runnable(lib)
            results.append(BuilderResult(token, None))
        return results


def drop_artifacts() -> None:
    """Free the candidates :class:`InProcessBuilder` built that no :class:`InProcessRunner` ran."""
    _ARTIFACTS.clear()


@derived_object
class _DoneFuture(PyRunnerFuture):
    """A runner future that is already done (the candidate was timed synchronously)."""

    def __init__(self, result) -> None:
        super().__init__()
        self._result = result

    def done(self) -> bool:
        return True

    def result(self):
        return self._result


@derived_object
class InProcessRunner(PyRunner):
    """Times each built candidate as the runtime calls it (see :class:`Measurement`).

    Parameters
    ----------
    meas : Measurement
        Arguments of a valid sparse instance of the workload and the burst length.
    repeat : int
        Bursts per candidate; the fastest is reported (on a shared machine noise only adds time).
    on_result : callable(), optional
        Called once per measured candidate (progress bars).
    """

    def __init__(self, meas, repeat: int = 5, on_result=None) -> None:
        super().__init__()
        self.meas = meas
        self.repeat = int(repeat)
        self.on_result = on_result

    def run(self, runner_inputs):
        def seconds(ri):
            lib = _ARTIFACTS.pop(str(ri.artifact_path), None)
            if lib is None:
                raise LookupError(f"no built artifact {ri.artifact_path}")
            fn = lib["main"]
            self.meas.burst_ms(fn)  # warm-up
            return min(self.meas.burst_ms(fn) for _ in range(self.repeat)) / 1e3

        return _timed(runner_inputs, seconds, self.on_result)


def _timed(runner_inputs, seconds, on_result) -> list:
    """Done futures of ``seconds(runner_input)`` for each input; a candidate that raises is a failed trial."""
    out = []
    for ri in runner_inputs:
        try:
            res = RunnerResult([seconds(ri)], None)
        except Exception as e:  # noqa: BLE001 - a failing candidate is a failed trial
            res = RunnerResult(None, f"run failed: {e}")
        if on_result is not None:
            on_result()
        out.append(_DoneFuture(res))
    return out


# -- a remote device (TVM RPC) ---------------------------------------------------------

class RemoteBench:
    """Builds candidates of one workload for a remote device and times them there (TVM RPC).

    Each candidate is cross-built (:func:`sparsecc.targets.arm.export_library`) into a temporary folder,
    uploaded once and timed with ``time_evaluator`` on arguments of a valid sparse instance
    (:func:`~sparsecc.tune.space.make_args`) copied to the device once; a sample is the minimum of
    ``repeat`` runs of at least ``min_repeat_ms``.

    Parameters
    ----------
    wl : Workload
    target : tvm.target.Target
        The device's target (aarch64).
    session : sparsecc.tune.remote.RemoteSession
    seed : int
    repeat : int
    """

    def __init__(self, wl: Workload, target, session, seed: int = 0, repeat: int = 5, min_repeat_ms: int = 5):
        import tempfile

        self.target, self.session = target, session
        self.args = session.tensors(space.make_args(wl, seed))
        self.repeat, self.min_repeat_ms = int(repeat), int(min_repeat_ms)
        self._dir = tempfile.TemporaryDirectory(prefix="sparsecc-remote-")

    def build(self, mod) -> str:
        """Path of the cross-built shared library of ``mod`` (a scheduled TensorIR module)."""
        from pathlib import Path

        from sparsecc.targets import arm

        path = Path(self._dir.name) / f"cand{next(_TOKENS)}.so"
        arm.export_library(x86.build(mod, self.target), path)
        return str(path)

    def time_ms(self, path: str) -> float:
        """Minimum over ``repeat`` runs of the kernel at ``path`` on the device (ms)."""
        return min(self.session.time_ms(path, self.args, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms))

    def compare(self, paths: dict, rounds: int = 3) -> dict:
        """``{name: ms}``: the minimum over ``rounds`` interleaved samples of every kernel (rotating order)."""
        names, times = list(paths), {k: [] for k in paths}
        for r in range(int(rounds)):
            for k in names[r % len(names):] + names[:r % len(names)]:
                times[k].append(self.time_ms(paths[k]))
        return {k: min(v) for k, v in times.items()}

    def close(self) -> None:
        """Free the device tensors and the built libraries."""
        self.args = []
        self._dir.cleanup()


@derived_object
class RemoteBuilder(PyBuilder):
    """Cross-builds candidates for :class:`RemoteBench`'s device; the artifact is the library's path."""

    def __init__(self, bench: RemoteBench) -> None:
        super().__init__()
        self.bench = bench

    def build(self, build_inputs):
        results = []
        for bi in build_inputs:
            try:
                results.append(BuilderResult(self.bench.build(bi.mod), None))
            except Exception as e:  # noqa: BLE001 - a candidate that does not build is a failed trial
                results.append(BuilderResult(None, str(e)))
        return results


@derived_object
class RemoteRunner(PyRunner):
    """Times each cross-built candidate on :class:`RemoteBench`'s device."""

    def __init__(self, bench: RemoteBench, on_result=None) -> None:
        super().__init__()
        self.bench = bench
        self.on_result = on_result

    def run(self, runner_inputs):
        return _timed(runner_inputs, lambda ri: self.bench.time_ms(str(ri.artifact_path)) / 1e3, self.on_result)


# -- timing ---------------------------------------------------------------------------

class Measurement:
    """Times kernels of one workload the way :class:`~sparsecc.runtime.kernels.SparseLinear` calls them.

    Arguments are 64-byte aligned torch tensors of a valid sparse instance
    (:func:`sparsecc.tune.space.make_args`), and every call gets a freshly
    allocated output, as at run time. Both matter: ``time_evaluator`` reuses
    one output buffer, and there a serial schedule of the MiniLM FFN-up layer
    at M = 128 looked 3% faster than the parallel hand schedule, while through
    the runtime, where the first touch of a new output page faults (once per
    thread, so a serial kernel takes all the faults), it was 10% slower.
    A sample is a burst of ``n`` calls (the same ``n`` for every candidate:
    the first call of a burst pays the thread-pool wake-up).

    Parameters
    ----------
    wl : Workload
    seed : int
    sample_ms : float
        Target burst length, set from one call of the hand schedule.
    """

    def __init__(self, wl: Workload, seed: int = 0, sample_ms: float = 5.0):
        import torch

        from sparsecc.runtime.kernels import aligned

        self.torch = torch
        arrays = space.make_args(wl, seed)
        self.ins = [aligned(torch.from_numpy(a)) for a in arrays[:-1]]
        self.y_shape = tuple(arrays[-1].shape)
        self.sample_ms = float(sample_ms)
        self.n = 1

    def calibrate(self, fn) -> None:
        """Burst length ``n`` from a few calls of ``fn`` (the hand schedule)."""
        for _ in range(2):
            self.call(fn)
        t0 = time.perf_counter()
        for _ in range(3):
            self.call(fn)
        per_call = (time.perf_counter() - t0) * 1e3 / 3
        self.n = max(1, min(1000, int(self.sample_ms / max(per_call, 1e-3))))

    def call(self, fn) -> None:
        """Call ``fn`` once on the arguments and a freshly allocated output ``Y: (M, N // br, br)``."""
        from sparsecc.runtime.kernels import aligned_empty

        y = self.torch.empty(self.y_shape, dtype=self.torch.float32)
        if y.data_ptr() % 64:
            y = aligned_empty(self.y_shape)
        fn(*self.ins, y)

    def burst_ms(self, fn) -> float:
        """ms per call over one burst of ``n`` calls."""
        t0 = time.perf_counter()
        for _ in range(self.n):
            self.call(fn)
        return (time.perf_counter() - t0) * 1e3 / self.n


def compare(fns: dict, meas: Measurement, rounds: int = 21) -> dict:
    """Time of each kernel in ms, measured in interleaved rounds of :meth:`Measurement.burst_ms`.

    The order rotates from round to round (on this machine the first kernel after a pause ran
    slower: TVM's workers sleep at once, ``TVM_THREAD_POOL_SPIN_COUNT=0``).

    Parameters
    ----------
    fns : dict name -> packed function ``main`` of a built kernel
    meas : Measurement
    rounds : int

    Returns
    -------
    dict name -> ms
        The 10th percentile over rounds (with other jobs on the cores, a kernel that waits for a
        descheduled pool thread takes several times longer: the medians of one kernel timed
        twice differed by up to 2.9x here; the 10th percentiles by at most 1.05x).
    """
    for f in fns.values():  # warm-up
        meas.burst_ms(f)
    times: dict = {k: [] for k in fns}
    names = list(fns)
    for r in range(int(rounds)):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate: no kernel always runs first
            times[k].append(meas.burst_ms(fns[k]))
    return {k: sorted(v)[len(v) // 10] for k, v in times.items()}


def pool_wakeup_ms(target) -> float:
    """Extra ms a parallel kernel pays for TVM's thread pool, measured once per process and target.

    The hand schedule of a tiny workload (16x1 blocks, W: (64, 16), M = 1) built parallel and
    serial, timed as in :func:`compare` over 41 rounds; the difference of their 10th percentiles
    (the fast end approximates a machine whose other cores are free).

    Parameters
    ----------
    target : tvm.target.Target

    Returns
    -------
    float
        Wake-up cost in ms, at least 0.
    """
    key = target_key(target)
    if key not in _WAKEUP:
        wl = Workload((16, 1), 64, 16, 0.25, 1, False, None)
        hand = x86.default_params((16, 1), "gemv")
        fns = {}
        for par in (True, False):
            sch = tvm.s_tir.Schedule(space.workload_func(wl, hand.m_tile), enable_check=False)
            space.apply_params(sch, wl.block, wl.regime, x86.ScheduleParams(hand.m_tile, parallel=par))
            fns[par] = runnable(x86.build(sch.mod, target))["main"]
        meas = Measurement(wl, 0, sample_ms=2.0)
        meas.calibrate(fns[True])
        t = compare(fns, meas, rounds=41)
        _WAKEUP[key] = max(0.0, float(t[True] - t[False]))
    return _WAKEUP[key]
