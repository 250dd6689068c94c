"""Timing on a remote device through TVM's RPC tracker: an aarch64 server under qemu-aarch64 on localhost.

The times are emulated; what is checked is the plumbing: the tracker hands out the device, libraries are
uploaded, run and timed there, the cost model and the tuning records come from those runs, reload, and reach
``compile(target="arm", tuning_db=...)`` and its exported artifact; unreachable trackers and unknown keys give
clear errors or a fallback.
"""

from __future__ import annotations

import json
import socket
import warnings

import numpy as np
import pytest
import torch

import sparsecc
from sparsecc.errors import RemoteFallbackWarning, RPCError, ToolchainError, TuningError
from sparsecc.tune.remote import RPCDevice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def device():
    """A TVM RPC tracker on localhost with one aarch64 (qemu) server registered under key "arm"."""
    from tvm.rpc.tracker import Tracker

    from sparsecc.targets.qemu_rpc import QemuRPCServer

    try:
        from sparsecc.targets.toolchain import aarch64_toolchain

        aarch64_toolchain()
    except ToolchainError as e:  # no package mirror: the only reason to skip
        pytest.skip(f"aarch64 toolchain cannot be fetched here: {e}")
    tracker = Tracker("127.0.0.1", port=_free_port(), port_end=65000, silent=True)
    server = QemuRPCServer(f"127.0.0.1:{tracker.port}", "arm", port=_free_port(), port_end=65000).start()
    try:
        yield RPCDevice(f"127.0.0.1:{tracker.port}", "arm"), server
    finally:
        server.stop()
        tracker.terminate()


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()


def test_rpc_device_parse():
    d = RPCDevice.parse("10.1.2.3:9190/rk3399")
    assert (d.tracker, d.key, d.address) == ("10.1.2.3:9190", "rk3399", ("10.1.2.3", 9190))
    assert RPCDevice.parse({"tracker": "h:1", "key": "k"}) == RPCDevice("h:1", "k")
    assert RPCDevice.parse(d) is d
    for bad in ("localhost:9190", "localhost/arm", "h:port/arm", "h:9190/", 9190, {"host": "h"}):
        with pytest.raises(RPCError, match="rpc="):
            RPCDevice.parse(bad)


def test_unreachable_tracker_falls_back_or_refuses(tmp_path):
    rpc = f"127.0.0.1:{_free_port()}/arm"  # nothing listens there
    with pytest.raises(RPCError, match="cannot be reached"):
        RPCDevice.parse(rpc).session()
    model, x = _mlp(), torch.randn(4, 128)
    with pytest.warns(RemoteFallbackWarning, match="static roofline"):
        cm = sparsecc.compile(model, x, target="arm", sparsity=0.8, pattern="block", block_shape=(16, 1), rpc=rpc)
    ref = sparsecc.prune(model, 0.8, block_shape=(16, 1))(x)
    assert torch.allclose(cm(x), ref, atol=1e-4)
    with pytest.raises(RPCError, match="cannot be reached"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RemoteFallbackWarning)
            sparsecc.tune(model, x, target="arm", sparsity=0.8, rpc=rpc, trials=2, work_dir=tmp_path, progress=False)
    with pytest.raises(TuningError, match="rpc="):
        sparsecc.tune(model, x, target="arm", sparsity=0.8, trials=2, work_dir=tmp_path, progress=False)
    with pytest.raises(sparsecc.errors.TargetError, match="rpc="):
        sparsecc.compile(model, x, target="x86", rpc=rpc)


def test_unknown_key(device):
    dev, _ = device
    with pytest.raises(RPCError, match="no RPC server is registered under key 'gpu'.*'arm'"):
        RPCDevice(dev.tracker, "gpu").session()


def test_remote_kernel_runs_and_times(device):
    """A BSR kernel cross-built for aarch64, uploaded, run and timed on the emulated device."""
    from sparsecc.formats import BlockSparseMatrix
    from sparsecc.targets import arm

    dev, server = device
    torch.manual_seed(1)
    w = torch.randn(64, 32) * (torch.rand(64 // 16, 1, 32).repeat_interleave(16, 1).reshape(64, 32) < 0.4)
    mat = BlockSparseMatrix.from_dense(w, (16, 1))
    x, b = torch.randn(8, 32), torch.randn(64)
    lib = arm.build_linear_kernel((16, 1), "gemm", bias=True, k=32)
    before = server.sessions
    with dev.session() as sess:
        args = [x.numpy(), mat.data.numpy(), mat.indices.numpy(), mat.indptr.numpy(), b.reshape(4, 16).numpy(),
                np.zeros((8, 4, 16), np.float32)]
        y = sess.run(lib, args)[-1].reshape(8, 64)
        times = sess.time_ms(lib, args, repeat=3)
    np.testing.assert_allclose(y, (x @ w.T + b).numpy(), rtol=1e-4, atol=1e-4)
    assert len(times) == 3 and all(t > 0 for t in times)
    import time

    for _ in range(50):  # the server counts a session once the client has closed it
        if server.sessions > before:
            break
        time.sleep(0.1)
    assert server.sessions > before


def test_compile_and_tune_over_rpc(device, tmp_path, monkeypatch):
    """The cost model from device timings; tuning records written, reloaded, and used by the ARM export."""
    from sparsecc.runtime.export import run_artifact_under_qemu
    from sparsecc.tune import tuner
    from sparsecc.tune.database import open_json_database, read_index
    from sparsecc.tune.lookup import TuningDatabase

    dev, _ = device
    model, x = _mlp(), torch.randn(4, 128)
    kw = dict(target="arm", sparsity=0.8, pattern="block", block_shape=(16, 1))
    cm = sparsecc.compile(model, x, rpc=dev, **kw)
    from sparsecc.tune.cost_model import cost_model_for

    cost = cost_model_for(cm.target)
    assert "over TVM RPC" in cost.source and dev.tracker in cost.source
    assert {"dense", "bsr_16x1", "csr_1x1"} <= set(cost.kernels) and "xcsr" not in cost.kernels
    ref = sparsecc.prune(model, 0.8, block_shape=(16, 1))(x)
    assert torch.allclose(cm(x), ref, atol=1e-4)

    # any tuned candidate replaces the hand schedule, so the tuned path is exercised whatever the emulator times
    monkeypatch.setattr(tuner, "KEEP_HAND_MARGIN", -10.0)
    work = tmp_path / "tuning"
    summary = sparsecc.tune(model, x, rpc=f"{dev.tracker}/{dev.key}", trials=4, work_dir=work, progress=False, **kw)
    assert len(summary.results) == 2
    assert all(r.trials >= 2 and r.best_ms > 0 and r.choice == "tuned" for r in summary.results)
    index = read_index(work)
    (tkey,) = index["entries"]
    assert "aarch64" in tkey and len(index["entries"][tkey]) == 2
    db = open_json_database(work)
    records = db.get_all_tuning_records()
    assert len(records) >= 4 and all("aarch64" in str(r.target) for r in records)
    assert all(r.run_secs and float(r.run_secs[0]) > 0 for r in records)

    reloaded = TuningDatabase(work)  # a fresh reader, as another process would open it
    # the same rpc: formats from the same (cached) device cost model, so the tuned workloads are the layers'
    cm2 = sparsecc.compile(model, x, tuning_db=work, rpc=dev, **kw)
    art = tmp_path / "art"
    cm2.export(art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert len(manifest["tuned_kernels"]) == 2 and all(k.endswith("_tuned") for k in manifest["tuned_kernels"])
    assert reloaded.entries(cm2.target.deploy_tvm_target())
    y = run_artifact_under_qemu(art, x)
    y = y[0] if isinstance(y, tuple) else y
    assert torch.allclose(torch.as_tensor(y), cm2(x), atol=1e-4)
    assert torch.allclose(cm2(x), ref, atol=1e-4)
