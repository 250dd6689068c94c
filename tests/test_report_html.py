"""sparsecc.report.html_report: the page's content, opened in headless Chromium (Selenium) and checked in the DOM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.errors import ArtifactError, InvalidArgumentError
from sparsecc.report import SPARSE_FILL, html_report, weight_density_map
from sparsecc.sparsify.api import LayerChoice, SparsifyResult

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 64)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64 * 8 * 8, 16)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


class RoutedMLP(nn.Module):
    """64 → 256 → relu → 64 → 10: one feed-forward block that activation routing gates."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.fixture(scope="module")
def mlp_cm():
    torch.manual_seed(0)
    return sparsecc.compile(MLP().eval(), (torch.randn(32, 256),), sparsity=0.8, pattern="block",
                            block_shape=(16, 1))


@pytest.fixture(scope="module")
def cnn_cm():
    torch.manual_seed(1)
    return sparsecc.compile(CNN().eval(), (torch.randn(4, 16, 8, 8),), sparsity=0.8, pattern="block",
                            block_shape=(16, 1))


# ------------------------------------------------------------------------------------------------ the browser
def _chromium_ready() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER) and shutil.which("dot") is not None


def _install_chromium() -> str:
    """Install Debian's chromium, chromedriver and Graphviz (the page's graph) when missing (root only); '' when
    ready, else why not."""
    if _chromium_ready():
        return ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return f"{CHROMIUM} / {CHROMEDRIVER} / dot missing and apt-get cannot run here (not root or no apt-get)"
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver", "graphviz"], check=True,
                       capture_output=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as e:
        return f"apt-get install chromium chromium-driver graphviz failed: {e}"
    return "" if _chromium_ready() else "chromium installed but its binaries are not where Debian puts them"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    why = _install_chromium()
    if why:
        pytest.skip(f"headless Chromium unavailable: {why}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # with the driver path below, selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


_RENDERED = """
const imgs = Array.from(document.images);
await Promise.all(imgs.map(i => i.decode().catch(() => null)));
return Array.from(document.querySelectorAll('svg:not(svg svg), img')).map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName.toLowerCase(), section: (e.closest('[id]') || {}).id || '', width: r.width,
          height: r.height, natural: e.tagName === 'IMG' ? [e.naturalWidth, e.naturalHeight] : null};
});
"""


def _open(driver, path):
    driver.get(path.resolve().as_uri())
    rendered = driver.execute_script("return (async () => {" + _RENDERED + "})()")
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#layer-table tbody tr')).map("
        "tr => Array.from(tr.cells).map(c => c.textContent))")
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    return rendered, rows, resources, errors


def _check_page(driver, cm, path):
    """The checks every report passes in the browser; returns what was rendered."""
    rendered, rows, resources, errors = _open(driver, path)
    assert errors == []
    assert resources == []  # nothing fetched: the page is self-contained
    # one row per layer, in cm.layers' order, with its name and density (the text report's 3 decimals)
    assert [r[0] for r in rows] == [a.name for a in cm.layers]
    assert [float(r[4]) for r in rows] == [round(a.density, 3) for a in cm.layers]
    assert all(len(r) == 10 for r in rows)
    for e in rendered:
        assert e["width"] > 0 and e["height"] > 0, e
        if e["tag"] == "img":
            assert e["natural"][0] > 0 and e["natural"][1] > 0, e
    return rendered


def _sparse_graph_nodes(page: str) -> int:
    """Graphviz nodes filled with the sparse-kernel colour in the page's graph SVG."""
    graph = page[page.index('<div class="graph" id="graph-svg">'):]
    fills = [re.search(r'fill="([^"]+)"', chunk).group(1) for chunk in graph.split('class="node">')[1:]]
    return fills.count(SPARSE_FILL)


def test_mlp_report_in_chromium(mlp_cm, browser, tmp_path):
    cm = mlp_cm
    path = html_report(cm, tmp_path / "mlp.html", title="MLP <80% sparse>")
    page = path.read_text()
    assert "<title>MLP &lt;80% sparse&gt;</title>" in page and "<80%" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    rendered = _check_page(browser, cm, path)
    assert all(abs(a.density - 0.2) < 0.01 for a in cm.layers)  # 0.8 sparsity in 16x1 blocks
    sections = [e["section"] for e in rendered]
    assert sections.count("latency-chart") == 1
    assert sum(e["tag"] == "img" for e in rendered) == 3  # a heat map per pruned weight
    assert sections.count("graph-svg") == 1
    n_sparse = sum(a.format != "dense" for a in cm.layers)
    assert _sparse_graph_nodes(page) == n_sparse
    assert page.count('<tr class="sparse"') == n_sparse
    summary = browser.execute_script("return Array.from(document.querySelectorAll('#summary li'))"
                                     ".map(li => li.textContent)")
    assert summary[-1].startswith(f"{n_sparse}/3 linears on sparse kernels")


def test_cnn_report_in_chromium(cnn_cm, browser, tmp_path):
    cm = cnn_cm
    path = html_report(cm, tmp_path / "cnn.html")
    rendered = _check_page(browser, cm, path)
    assert [a.name for a in cm.layers] == ["conv1", "conv2", "head"]
    assert [a.kind for a in cm.layers] == ["conv2d", "conv2d", "linear"]
    captions = browser.execute_script("return Array.from(document.querySelectorAll('.heatmaps figure'))"
                                      ".map(f => [f.dataset.layer, f.querySelector('figcaption').textContent])")
    assert [c[0] for c in captions] == ["conv1", "conv2", "head"]
    # the caption's density is counted on the weight read back from the stored (sparse or dense) format
    for (name, cap), a in zip(captions, cm.layers):
        assert float(re.search(r"density ([0-9.]+)", cap).group(1)) == pytest.approx(a.density, abs=1e-3)
    assert sum(e["tag"] == "img" for e in rendered) == 3
    page = path.read_text()
    assert _sparse_graph_nodes(page) == sum(a.format != "dense" for a in cm.layers)


def test_sparsify_curve_and_routing_levels_in_chromium(browser, tmp_path):
    torch.manual_seed(2)
    cal = [torch.randn(16, 64) for _ in range(4)]
    cm = sparsecc.compile(RoutedMLP().eval(), cal[0], activation_density=[1.0, 0.5, 0.25], calibration=cal,
                          measure=False)
    assert len(cm.gated_layers()) == 1
    layers = [LayerChoice("up", "linear", (256, 64), 16, "bsr 16x1", 0.3, {}, 0.010, 0.006),
              LayerChoice("down", "linear", (64, 256), 16, "dense", 1.0, {}, 0.010, 0.010)]
    rounds = [{"round": 0, "scale": 1.0, "plan": (), "drop": 0.08, "pred_ms": 0.012},
              {"round": 1, "scale": 0.5, "plan": (), "drop": 0.004, "pred_ms": 0.016},
              {"round": 2, "scale": 0.75, "plan": (), "drop": 0.01, "pred_ms": 0.014}]
    history = [{"step": t, "loss": 2.0 / (1 + t), "density": max(0.3, 1 - t / 10)} for t in range(20)]
    sp = SparsifyResult(model=None, layers=layers, metric_dense=0.95, metric_sparse=0.946, method="magnitude",
                        schedule="gradual", target="x86", history=history, rounds=rounds)
    path = html_report(cm, tmp_path / "routed.html", sparsify_result=sp)
    rendered = _check_page(browser, cm, path)
    sections = [e["section"] for e in rendered]
    assert sections.count("sparsify-chart") == 2  # metric against latency, loss per step
    assert sections.count("levels-chart") == 1
    levels = browser.execute_script("return Array.from(document.querySelectorAll('#levels-table tr'))"
                                    ".slice(1).map(tr => Array.from(tr.cells).map(c => c.textContent))")
    want = cm.levels()
    assert [int(r[0]) for r in levels] == [0, 1, 2]
    assert [float(r[4]) for r in levels] == [round(r["cosine"], 5) for r in want]
    assert float(levels[0][4]) == pytest.approx(1.0, abs=1e-5)  # level 0 (density 1.0) is the ungated model
    page = path.read_text()
    assert page.count("<svg") == sum(e["tag"] == "svg" for e in rendered) == 5  # latency, 2 sparsify, levels, graph


# ------------------------------------------------------------------------------------------------ no browser
def test_weight_density_map_counts_tiles():
    w = torch.zeros(256, 300)
    w[:16, :] = 1.0  # the first 16 rows dense
    w[100, 7] = 2.0
    dens, tile = weight_density_map(w)
    assert tile == (2, 3) and tuple(dens.shape) == (128, 100)
    assert torch.all(dens[:8] == 1.0) and float(dens[50, 2]) == pytest.approx(1 / 6)
    assert float(dens.sum()) == pytest.approx(8 * 100 + 1 / 6)  # 8 full rows of 100 tiles, one 1/6 tile
    small, tile = weight_density_map(torch.eye(5))
    assert tile == (1, 1) and torch.equal(small, torch.eye(5))
    # an edge tile counts only the weights it covers: 129 rows in tiles of 2 leave one row in the last tile
    edge, tile = weight_density_map(torch.ones(129, 4))
    assert tile == (2, 1) and tuple(edge.shape) == (65, 4) and torch.all(edge == 1.0)
    conv = torch.zeros(4, 3, 2, 2)
    conv[1, 2, 0, 1] = 1.0  # (C_out, kh·kw·C_in) layout: column (0 * 2 + 1) * 3 + 2 = 5
    cmap, _ = weight_density_map(conv)
    assert tuple(cmap.shape) == (4, 12) and float(cmap[1, 5]) == 1.0 and float(cmap.sum()) == 1.0
    with pytest.raises(InvalidArgumentError, match="weight must be"):
        weight_density_map(torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="max_cells"):
        weight_density_map(torch.zeros(3, 3), max_cells=0)


def test_page_without_dot_says_so(mlp_cm, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no dot on PATH
    path = html_report(mlp_cm, tmp_path / "nodot.html")
    page = path.read_text()
    assert 'id="graph-missing"' in page and "dot</code> binary was not found" in page
    assert page.count('<tr class=') == 3 and page.count("<svg") == 1  # the table and latency chart still there


def test_errors_name_the_argument(mlp_cm, tmp_path):
    with pytest.raises(ArtifactError, match="is a folder"):
        html_report(mlp_cm, tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        html_report(mlp_cm, tmp_path / "no" / "such" / "r.html")
    with pytest.raises(InvalidArgumentError, match="CompiledModule"):
        html_report(nn.Linear(2, 2), tmp_path / "r.html")
    with pytest.raises(InvalidArgumentError, match="sparsify_result"):
        html_report(mlp_cm, tmp_path / "r.html", sparsify_result=object())
    assert list(tmp_path.iterdir()) == []  # nothing half-written
