"""Torch-free deployment: an exported artifact runs in a process where ``import torch`` fails.

The parent compiles and exports a small sparse MLP and a small CNN, saves numpy inputs and ``cm(x)`` outputs;
a child process with torch blocked (a ``sys.meta_path`` finder installed before sparsecc is imported) loads the
artifact with ``sparsecc.runtime.load`` and compares. Each export builds one Relax module (a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sparsecc

ROOT = Path(__file__).resolve().parents[2]

_BLOCK = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this process ({name})")

    sys.meta_path.insert(0, _NoTorch())
""")

_CHILD = _BLOCK + textwrap.dedent("""
    import json
    import numpy as np
    import sparsecc.runtime

    art, data = sys.argv[1], sys.argv[2]
    mod = sparsecc.runtime.load(art)
    with np.load(data) as f:
        x, ref = f["x"], f["ref"]
    y = mod(x)
    bad = None
    try:
        mod(np.zeros((x.shape[0] + 1,) + x.shape[1:], dtype=x.dtype))
    except sparsecc.InputShapeError as e:
        bad = str(e)
    import tvm
    print(json.dumps({"diff": float(np.abs(y - ref).max()), "type": type(y).__name__,
                      "same_load": type(sparsecc.load(art)).__name__, "torch": "torch" in sys.modules,
                      "bad_shape": bad, "threads": tvm.runtime.num_threads()}))
""")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 16)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    if request.param == "mlp":
        model, x = _mlp(), torch.randn(4, 64)
        cm = sparsecc.compile(model, x, sparsity=0.8, pattern="block", block_shape=(8, 1), measure=False)
    else:
        model, x = _cnn(), torch.randn(2, 3, 16, 16)
        cm = sparsecc.compile(model, x, sparsity=0.8, pattern="unstructured", measure=False)
    tmp = tmp_path_factory.mktemp(request.param)
    cm.export(tmp / "artifact")  # no example_inputs=: the compile's are used
    x2 = torch.randn_like(x)
    with torch.no_grad():
        ref = cm(x2)
    np.savez(tmp / "data.npz", x=x2.numpy(), ref=ref.numpy())
    return cm, x2, ref, tmp


def test_child_without_torch_loads_and_matches(exported):
    cm, x, ref, tmp = exported
    env = {k: v for k, v in _env().items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "artifact"), str(tmp / "data.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["type"] == "ndarray" and out["same_load"] == "ExportedModule"
    # TVM alone would take half the CPUs on x86 (it assumes hyper-threads); the loader takes them all
    assert out["threads"] == len(os.sched_getaffinity(0))
    assert out["diff"] <= 1e-4
    assert "dim 0 was dynamic in the compiled module but is fixed in this artifact" in out["bad_shape"]
    manifest = json.loads((tmp / "artifact" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == list(x.shape) and manifest["inputs"][0]["fixed_dims"] == [0]
    assert manifest["output_tree"] == {"leaf": 0}


def test_torch_in_torch_out(exported):
    cm, x, ref, tmp = exported
    mod = sparsecc.runtime.load(tmp / "artifact")
    y = mod(x)
    assert isinstance(y, torch.Tensor)
    assert float((y - ref).abs().max()) <= 1e-4
    yn = mod(x.numpy())
    assert isinstance(yn, np.ndarray) and float(np.abs(yn - ref.numpy()).max()) <= 1e-4


def test_entry_point_without_torch(exported):
    cm, x, ref, tmp = exported
    np.savez(tmp / "in.npz", x.numpy())
    runner = _BLOCK + "from sparsecc.runtime.deploy import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", runner, str(tmp / "artifact"), "--inputs", str(tmp / "in.npz"),
                        "--out", str(tmp / "out.npz")], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp / "out.npz") as f:
        assert f.files == ["out0"]
        assert float(np.abs(f["out0"] - ref.numpy()).max()) <= 1e-4
    r = subprocess.run([sys.executable, "-c", runner, str(tmp / "missing"), "--inputs", str(tmp / "in.npz"),
                        "--out", str(tmp / "out2.npz")], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "ArtifactError" in r.stderr and "manifest.json is missing" in r.stderr


def test_use_threads_sets_the_pool_size_before_it_starts():
    code = ("import sparsecc.runtime.deploy as d, tvm, sys\n"
            "n = d.use_threads(int(sys.argv[1]))\n"
            "print(n, tvm.runtime.num_threads())\n")
    r = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1"]
    from sparsecc.errors import InvalidArgumentError
    from sparsecc.runtime.deploy import use_threads

    with pytest.raises(InvalidArgumentError, match="threads must be >= 1"):
        use_threads(0)


def test_output_tree_round_trip():
    from sparsecc.runtime.deploy import tree_flatten, tree_unflatten

    a, b, c = np.zeros(1), np.ones(2), np.full(3, 2.0)
    obj = {"logits": a, "extra": (b, [c, None])}
    leaves, tree = tree_flatten(obj)
    assert [x.shape for x in leaves] == [(1,), (2,), (3,)]
    assert json.loads(json.dumps(tree)) == tree
    back = tree_unflatten(leaves, tree)
    assert list(back) == ["logits", "extra"] and isinstance(back["extra"], tuple)
    assert back["extra"][1][1] is None and float(back["extra"][1][0][2]) == 2.0
