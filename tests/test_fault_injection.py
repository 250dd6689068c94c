"""Damaged caches: each case runs in a fresh process on its own cache folder and must end cleanly.

A truncated shared library used to kill the process with a bus error at ``dlopen`` (or at the first call)
until the file was deleted by hand. Now every library in the cache carries a content hash and is checked
before it is opened; a bad entry is rebuilt with a :class:`~sparsecc.fileio.CacheWarning`, and a read-only
cache keeps working (the kernel is built in memory). The cases: truncate, flip a byte, delete the hash,
read-only folder with a damaged entry, damaged runtime helper, damaged calibration, two processes at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# one sparse layer, checked against torch; prints what happened as JSON
SCRIPT = r"""
import json, sys, warnings
import torch, torch.nn.functional as F
warnings.simplefilter("always")
from sparsecc.fileio import CacheWarning
from sparsecc.formats import RowSparseMatrix
from sparsecc.runtime.xcsr import XCSRLinear
if "readonly" in sys.argv:  # a read-only cache folder, also for root (who ignores permissions)
    import contextlib, pathlib
    import sparsecc.fileio as fio
    def refuse(*a, **k):
        raise PermissionError(13, "Read-only file system")
    fio.atomic_path = contextlib.contextmanager(lambda *a, **k: refuse())
    pathlib.Path.unlink = refuse
torch.manual_seed(0)
w = torch.randn(32, 48) * (torch.rand(32, 48) < 0.3)
b, x = torch.randn(32), torch.randn(20, 48)
with warnings.catch_warnings(record=True) as caught:
    y = XCSRLinear(RowSparseMatrix.from_dense(w), b, "relu")(x)
    if "calibrate" in sys.argv:  # also measure a calibration (a tiny one: two candidates)
        from sparsecc.formats import Candidate
        from sparsecc.targets import resolve_target
        from sparsecc.tune.calibrate import calibrate
        calibrate(resolve_target("x86"), candidates=[Candidate("dense"), Candidate.parse("xcsr")])
ok = bool(torch.allclose(y, torch.relu(F.linear(x, w, b)), atol=1e-4))
print(json.dumps({"ok": ok, "warnings": [str(c.message) for c in caught if issubclass(c.category, CacheWarning)]}))
"""


def _run(cache: Path, *extra: str) -> dict:
    env = dict(os.environ, SPARSECC_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT, *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode} (a crash is a negative code):\n{r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _kernel(cache: Path) -> Path:
    (so,) = [p for p in (cache / "kernels" / "host").glob("xcsr_gemm_relu*.so")]
    return so


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache folder with the layer's kernel, helper and calibration built once (copied per case)."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    out = _run(cache, "calibrate")
    assert out["ok"] and not out["warnings"]
    return cache


@pytest.fixture
def cache(warm, tmp_path):
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(warm, dst)
    return dst


def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete its hash"])
def test_damaged_kernel_library_is_rebuilt(cache, damage):
    so = _kernel(cache)
    if damage == "truncate":
        _truncate(so)
    elif damage == "flip a byte":
        _flip(so)
    else:
        so.with_name(so.name + ".sha256").unlink()
    out = _run(cache)
    assert out["ok"]
    assert any("kernel library" in w and "rebuilding" in w for w in out["warnings"]), out
    assert not _run(cache)["warnings"]  # healed: the next process loads it silently


def test_read_only_cache_with_a_damaged_kernel_builds_in_memory(cache):
    so = _kernel(cache)
    _truncate(so)
    damaged = so.read_bytes()
    out = _run(cache, "readonly", "calibrate")
    assert out["ok"] and any("rebuilding" in w for w in out["warnings"]), out
    assert so.read_bytes() == damaged  # left alone, and never opened
    # a read-only cache without the calibration: measured, used, not written
    for f in (cache / "calibration").glob("*"):
        f.unlink()
    out = _run(cache, "readonly", "calibrate")
    assert out["ok"] and any("calibration" in w and "not written" in w for w in out["warnings"]), out


def test_damaged_runtime_helper_is_rebuilt(cache):
    (helper,) = (cache / "runtime").glob("omp_launch-*.so")
    _truncate(helper)
    out = _run(cache)
    assert out["ok"] and any("runtime helper library" in w for w in out["warnings"]), out


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_damaged_calibration_is_measured_again(cache, damage):
    (cal,) = (cache / "calibration").glob("*.json")
    (_truncate if damage == "truncate" else _flip)(cal)
    out = _run(cache, "calibrate")
    assert out["ok"] and any("calibration" in w and "measuring again" in w for w in out["warnings"]), out
    assert not _run(cache, "calibrate")["warnings"]


def test_two_processes_on_one_cold_cache(tmp_path):
    env = dict(os.environ, SPARSECC_CACHE_DIR=str(tmp_path / "cold"), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        res = json.loads(out.strip().splitlines()[-1])
        assert res["ok"] and not res["warnings"], res


ARTIFACT_SCRIPT = r"""
import json, sys
import torch
import sparsecc
from sparsecc.errors import ArtifactError
path, action = sys.argv[1], sys.argv[2]
if action == "export":
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)).eval()
    sparsecc.compile(m, (torch.randn(4, 64),), sparsity=0.8, pattern="block", block_shape=(8, 1),
                     measure=False).export(path)
    print(json.dumps({"outcome": "exported"}))
else:
    try:
        y = sparsecc.load(path)(torch.randn(4, 64))
        print(json.dumps({"outcome": "loaded", "finite": bool(torch.isfinite(y).all())}))
    except ArtifactError as e:
        print(json.dumps({"outcome": "ArtifactError", "message": str(e)}))
"""


def _artifact(path: Path, action: str, cache: Path) -> dict:
    env = dict(os.environ, SPARSECC_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", ARTIFACT_SCRIPT, str(path), action], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode} (a crash is a negative code):\n{r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_damaged_artifacts_are_refused_without_a_crash(warm, tmp_path):
    import shutil

    good = tmp_path / "good"
    assert _artifact(good, "export", warm)["outcome"] == "exported"
    assert _artifact(good, "load", warm)["outcome"] == "loaded"

    def unlist(p):
        m = json.loads((p / "manifest.json").read_text())
        m["files"].pop("model.so")
        (p / "manifest.json").write_text(json.dumps(m))

    cases = {"truncated model.so": (lambda p: _truncate(p / "model.so"), "model.so is corrupt"),
             "a flipped byte in params.bin": (lambda p: _flip(p / "params.bin"), "params.bin is corrupt"),
             "model.so deleted": (lambda p: (p / "model.so").unlink(), "model.so is missing"),
             "model.so unlisted and truncated": (lambda p: (unlist(p), _truncate(p / "model.so")),
                                                 "does not list model.so")}
    for name, (damage, message) in cases.items():
        bad = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, bad)
        damage(bad)
        out = _artifact(bad, "load", warm)
        assert out["outcome"] == "ArtifactError" and message in out["message"], (name, out)
