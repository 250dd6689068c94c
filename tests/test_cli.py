"""The ``sparsecc`` command line on a small MLP (``tests.cli_models:mlp``) and a small ``.pt2``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsecc.cli import _expand_batches, app, load_model, parse_block_shape
from sparsecc.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]
MLP = "tests.cli_models:mlp"
runner = CliRunner()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sparsecc.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "build"
    res = runner.invoke(app, ["compile", MLP, "--sparsity", "0.75", "--pattern", "unstructured", "--no-measure",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    return out, json.loads(res.stdout)


def test_compile_json_and_artifact(compiled):
    out, data = compiled
    assert [r["name"] for r in data["layers"]] == ["fc1", "fc2"]
    assert [r["weight_shape"] for r in data["layers"]] == [[128, 64], [32, 128]]
    for r in data["layers"]:
        assert r["density"] == pytest.approx(0.25, abs=1e-3)
    assert data["artifact"] == str(out.resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [4, 64]
    assert [a["name"] for a in manifest["layers"]] == ["fc1", "fc2"]


def test_inspect_artifact_prints_inputs(compiled):
    out, _ = compiled
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "inputs" in res.stdout and "4x64" in res.stdout and "float32" in res.stdout
    assert "fc1" in res.stdout and "0.250" in res.stdout
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    mf = json.loads(res.stdout)
    assert mf["inputs"][0]["shape"] == [4, 64] and mf["outputs"][0]["shape"] == [4, 32]
    assert mf["target"]["name"] == "x86"


def test_pt2_model_compiles(tmp_path):
    from tests.cli_models import mlp

    model, args = mlp()
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0  # density 0.5, compiled as it is (no --sparsity)
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, args), str(path))
    m, ex, kind = load_model(str(path))
    assert kind == "pt2" and ex[0].shape == (4, 64)
    torch.testing.assert_close(m(*ex), model(*args))
    res = runner.invoke(app, ["inspect", str(path), "--no-measure", "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    layers = json.loads(res.stdout)["layers"]
    assert len(layers) == 2
    assert layers[0]["density"] == pytest.approx(0.5) and layers[1]["density"] == pytest.approx(1.0)


def test_bench_prints_ratio_table():
    res = _cli("bench", MLP, "--sparsity", "0.8", "--no-measure", "--batch", "1", "8", "--runs", "3")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if "x" in ln and ("│" in ln or "|" in ln)]
    rows = [ln for ln in lines if ln.strip("│| ").split()[0] in ("1", "8")]
    assert len(rows) == 2, res.stdout
    for ln in rows:
        cells = [c.strip() for c in ln.replace("│", "|").split("|") if c.strip()]
        dense, sparse, ratio = float(cells[1]), float(cells[3]), float(cells[4].rstrip("x"))
        assert ratio == pytest.approx(dense / sparse, rel=0.02, abs=0.01)


def test_bad_model_path_exits_1_naming_the_file(tmp_path):
    missing = tmp_path / "nope.pt2"
    res = _cli("compile", str(missing), "--json", timeout=300)
    assert res.returncode == 1
    assert str(missing) in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_unknown_option_exits_2():
    res = _cli("compile", MLP, "--no-such-option", timeout=300)
    assert res.returncode == 2
    assert "no-such-option" in res.stderr


def test_helpers():
    assert parse_block_shape("16x1") == (16, 1)
    with pytest.raises(InvalidArgumentError, match="--block-shape"):
        parse_block_shape("16")
    assert _expand_batches(["bench", "m", "--batch", "1", "8", "--runs", "2"]) == \
        ["bench", "m", "--batch", "1", "--batch", "8", "--runs", "2"]
    with pytest.raises(InvalidArgumentError, match="no_such_mod"):
        load_model("no_such_mod:fn")


def test_sparsify_saves_pruned_pt2(tmp_path):
    out = tmp_path / "pruned.pt2"
    res = runner.invoke(app, ["sparsify", MLP, "--sparsity", "0.5", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    data = json.loads(res.stdout)
    assert [r["name"] for r in data["layers"]] == ["fc1", "fc2"]
    assert data["density"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads(out.with_suffix(".json").read_text())["density"] == data["density"]
    ep = torch.export.load(str(out))
    w = dict(ep.named_parameters())["fc1.weight"]
    assert float((w != 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_pt2_with_sparsity_is_pruned(tmp_path):
    from tests.cli_models import mlp

    model, args = mlp()
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, args), str(path))
    before = model.fc1.weight.detach().clone()
    res = runner.invoke(app, ["inspect", str(path), "--sparsity", "0.75", "--no-measure", "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    layers = json.loads(res.stdout)["layers"]
    assert [r["density"] for r in layers] == [pytest.approx(0.25, abs=1e-3)] * 2
    assert torch.equal(torch.export.load(str(path)).module().get_parameter("fc1.weight"), before)
