"""A self-contained HTML report of a compiled module: layer table, latency chart, weight heat maps, curves, graph.

:func:`html_report` writes one HTML file with no external resource: charts are matplotlib SVGs inlined in the
page, weight heat maps are PNG ``data:`` URIs, and the rewritten graph is an SVG drawn by Graphviz's ``dot``
(when the binary is missing, the page says so in place of the picture).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import ArtifactError, InvalidArgumentError
from .ir.annotations import ROUTING_META_KEY, get_annotation

__all__ = ["html_report", "weight_density_map"]

#: most cells per side of a weight heat map (a bigger weight is shown by the density of its tiles)
MAX_CELLS = 128
#: graphs with more nodes than this are not drawn (``dot`` would take minutes and the picture be unreadable)
MAX_GRAPH_NODES = 1500

SPARSE_FILL, PRUNED_FILL, ROUTED_FILL, IO_FILL = "#f28e2b", "#ffe0b3", "#c9a3e6", "#e3e3e3"
SPARSE_BAR, DENSE_BAR = "#f28e2b", "#4e79a7"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px;
       color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.meta { color: #666; margin-top: 0; }
table.layers { border-collapse: collapse; font-size: 0.9em; }
table.layers th, table.layers td { padding: 3px 10px; border-bottom: 1px solid #e5e5e5; white-space: nowrap; }
table.layers th { background: #f4f4f4; text-align: left; position: sticky; top: 0; }
table.layers td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.layers tr.sparse td { background: #fff3e6; }
ul.summary { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; padding-left: 1.2em; }
.note { color: #666; font-style: italic; }
.figure svg { max-width: 100%; height: auto; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 12px; }
.heatmaps figure { margin: 0; border: 1px solid #e5e5e5; padding: 6px; }
.heatmaps figcaption { font-size: 0.8em; color: #444; text-align: center; }
.graph { overflow: auto; max-height: 900px; max-width: 100%; width: fit-content; border: 1px solid #e5e5e5;
         padding: 4px; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 1px solid #999;
               border-radius: 4px; font-size: 0.85em; }
"""


# ------------------------------------------------------------------------------------------------ layer data
def _layer_nodes(cm) -> list:
    """``(node, annotation)`` of every annotated layer, in graph order (the rows of ``cm.report()``)."""
    return [(n, a) for n, a in ((n, get_annotation(n)) for n in cm.graph.graph.nodes) if a is not None]


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _row(a) -> list:
    """The ``cm.report()`` cells of one layer annotation."""
    cand = a.candidate
    est = a.est_ms.get(cand.key) if cand is not None else None
    kernel = (a.kernel or "") + (f"+{a.epilogue}" if a.epilogue and a.epilogue not in (a.kernel or "") else "")
    return [a.name, "x".join(map(str, a.weight_shape)), a.pattern or "",
            "x".join(map(str, a.block_shape)) if a.block_shape else "", _fmt(a.density),
            cand.label if cand is not None else "", kernel, _fmt(est), _fmt(a.measured_ms), _fmt(a.dense_ms)]


_HEAD = ("layer", "weight (N, K)", "pattern", "block", "density", "format", "kernel", "est ms", "meas ms",
         "dense ms")
_NUMERIC = {"density", "est ms", "meas ms", "dense ms"}


def _summary_lines(cm, n_layers: int) -> list:
    """The lines ``cm.report()`` prints below its table (routing, structured pruning, totals)."""
    lines = cm.report().split("\n")[2 + n_layers:]
    return [ln for ln in lines if ln.strip()]


def _is_sparse(a) -> bool:
    return a.format not in (None, "dense")


def _layer_weight(cm, node) -> Optional[torch.Tensor]:
    """The dense weight of an annotated layer node, with its zeros: from the sparse module's stored format, or the
    graph's weight attribute for a layer left dense. None when it cannot be found."""
    gm = cm.graph.gm
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if hasattr(mod, "dense_weight"):
            return mod.dense_weight().detach()
        w = getattr(mod, "weight", None)
        return w.detach() if isinstance(w, torch.Tensor) else None
    if node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
        obj = gm
        for part in node.args[1].target.split("."):
            obj = getattr(obj, part, None)
        return obj.detach() if isinstance(obj, torch.Tensor) else None
    return None


def weight_density_map(weight: torch.Tensor, max_cells: int = MAX_CELLS) -> tuple:
    """Fraction of nonzeros of ``weight`` in tiles, at most ``max_cells`` tiles per side.

    Parameters
    ----------
    weight : torch.Tensor
        ``(N, K)``, or a conv weight ``(C_out, C_in, kh, kw)``, shown in the ``(C_out, kh·kw·C_in)`` layout it is
        pruned and stored in.
    max_cells : int
        Most tiles per side.

    Returns
    -------
    (density, tile)
        ``density``: float32 tensor ``(ceil(N / tile_rows), ceil(K / tile_cols))`` with values in [0, 1] (edge
        tiles count only the weights they cover); ``tile``: ``(tile_rows, tile_cols)``.

    Raises
    ------
    InvalidArgumentError
        ``weight`` is not 2-D or 4-D, or ``max_cells`` < 1.
    """
    if not isinstance(max_cells, int) or max_cells < 1:
        raise InvalidArgumentError(f"weight_density_map: max_cells must be an int ≥ 1, got {max_cells!r}")
    if weight.dim() == 4:
        weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if weight.dim() != 2:
        raise InvalidArgumentError(f"weight_density_map: weight must be (N, K) or (C_out, C_in, kh, kw), "
                                   f"got shape {tuple(weight.shape)}")
    n, k = weight.shape
    tr, tc = max(1, math.ceil(n / max_cells)), max(1, math.ceil(k / max_cells))
    rows, cols = math.ceil(n / tr), math.ceil(k / tc)
    nz = torch.zeros(rows * tr, cols * tc)
    cover = torch.zeros(rows * tr, cols * tc)
    nz[:n, :k] = (weight != 0).float()
    cover[:n, :k] = 1.0
    count = nz.view(rows, tr, cols, tc).sum((1, 3))
    area = cover.view(rows, tr, cols, tc).sum((1, 3))
    return count / area, (tr, tc)


# ------------------------------------------------------------------------------------------------ rendering
def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def _svg(fig) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog), text kept as text."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    return _strip_prolog(buf.getvalue())


def _strip_prolog(svg: str) -> str:
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def _png_uri(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _annotate_points(ax, points: list) -> None:
    """Label ``(x, y, text)`` points; labels of points that (nearly) coincide are stacked instead of overprinted."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx = (max(xs) - min(xs)) or 1.0
    dy = (max(ys) - min(ys)) or 1.0
    placed: list = []
    for x, y, text in points:
        near = sum(1 for px, py in placed if abs(px - x) < 0.03 * dx and abs(py - y) < 0.03 * dy)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * near), fontsize=7)
        placed.append((x, y))


def _latency_chart(layers: list) -> str:
    """Horizontal bars per layer: compiled ms (measured, or the estimate where not measured) and dense ms."""
    rows = []
    for a in layers:
        cand = a.candidate
        comp, comp_est = a.measured_ms, False
        if comp is None and cand is not None and cand.key in a.est_ms:
            comp, comp_est = a.est_ms[cand.key], True
        dense, dense_est = a.dense_ms, False
        if dense is None and "dense" in a.est_ms:
            dense, dense_est = a.est_ms["dense"], True
        rows.append((a.name, comp, comp_est, dense, dense_est, _is_sparse(a)))
    if not any(r[1] is not None or r[3] is not None for r in rows):
        return '<p class="note">No layer has a measured or estimated latency.</p>'
    fig = _figure(8.5, 1.1 + 0.42 * len(rows))
    ax = fig.add_subplot()
    h = 0.38
    for i, (name, comp, comp_est, dense, dense_est, sparse) in enumerate(rows):
        y = len(rows) - 1 - i
        if comp is not None:
            ax.barh(y + h / 2, comp, h, color=SPARSE_BAR if sparse else "#bab0ac", hatch="//" if comp_est else None,
                    edgecolor="white" if comp_est else None)
            ax.text(comp, y + h / 2, f" {comp:.3f}", va="center", fontsize=7)
        if dense is not None:
            ax.barh(y - h / 2, dense, h, color=DENSE_BAR, hatch="//" if dense_est else None,
                    edgecolor="white" if dense_est else None)
            ax.text(dense, y - h / 2, f" {dense:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("latency per call (ms)")
    ax.margins(x=0.15)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=SPARSE_BAR, label="compiled, sparse kernel"),
                       Patch(color="#bab0ac", label="compiled, dense"),
                       Patch(color=DENSE_BAR, label="torch dense"),
                       Patch(facecolor="#999", hatch="//", edgecolor="white", label="cost-model estimate")],
              fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _heatmap(name: str, weight: torch.Tensor, a) -> str:
    dens, (tr, tc) = weight_density_map(weight)
    n = weight.shape[0]
    k = weight.numel() // n
    fig = _figure(3.4, 3.0)
    ax = fig.add_subplot()
    im = ax.imshow(dens.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto",
                   extent=(0, k, n, 0))
    ax.set_xlabel("K (kh·kw·C_in)" if weight.dim() == 4 else "K (input)", fontsize=8)
    ax.set_ylabel("N (output)", fontsize=8)
    ax.tick_params(labelsize=7)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("density" if (tr, tc) == (1, 1) else f"density of {tr}x{tc} tiles", fontsize=7)
    uri = _png_uri(fig)
    nnz = int((weight != 0).sum())
    cap = (f"{name}: {'x'.join(map(str, a.weight_shape))}, density {nnz / max(1, weight.numel()):.3f}"
           f" ({nnz} nnz), {a.candidate.label if a.candidate else 'no format'}")
    return (f'<figure data-layer="{html.escape(name)}"><img alt="nonzero pattern of {html.escape(name)}" '
            f'src="{uri}"><figcaption>{html.escape(cap)}</figcaption></figure>')


def _heatmaps(cm, nodes: list) -> str:
    parts, missing = [], []
    for node, a in nodes:
        if not (_is_sparse(a) or (a.density is not None and a.density < 1.0)):
            continue
        w = _layer_weight(cm, node)
        if w is None:
            missing.append(a.name)
            continue
        parts.append(_heatmap(a.name, w, a))
    if not parts and not missing:
        return '<p class="note">No layer has a pruned or sparse weight.</p>'
    out = '<div class="heatmaps">' + "".join(parts) + "</div>"
    if missing:
        out += f'<p class="note">Weight not readable for: {html.escape(", ".join(missing))}.</p>'
    return out


def _sparsify_curve(sp) -> str:
    """Metric against predicted latency: the dense model, every budget-search round, the returned model; and
    the fine-tuning loss per step when recorded."""
    out = []
    rounds = list(getattr(sp, "rounds", None) or [])
    layers = list(getattr(sp, "layers", None) or [])
    md, ms = getattr(sp, "metric_dense", None), getattr(sp, "metric_sparse", None)
    dense_ms = sum(c.est_dense_ms for c in layers) if layers else None
    sparse_ms = sum(c.est_ms for c in layers) if layers else None
    pts = [(r["pred_ms"], md - r["drop"], r) for r in rounds
           if md is not None and r.get("pred_ms") is not None and r.get("drop") is not None]
    if md is not None and (pts or ms is not None) and dense_ms is not None and math.isfinite(dense_ms):
        fig = _figure(6.0, 3.6)
        ax = fig.add_subplot()
        if pts:
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#bbb", lw=1, zorder=1)
            for x, y, r in pts:
                ok = r.get("passed")
                ax.scatter([x], [y], color="#59a14f" if ok else ("#e15759" if ok is False else "#76b7b2"), s=28,
                           zorder=2)
            _annotate_points(ax, [(x, y, f"round {r.get('round', '')}" + (f" {r['pattern']}" if r.get("pattern")
                                                                           else "")) for x, y, r in pts])
        ax.scatter([dense_ms], [md], marker="s", color=DENSE_BAR, s=40, zorder=3, label="dense")
        if ms is not None and sparse_ms is not None and math.isfinite(sparse_ms):
            ax.scatter([sparse_ms], [ms], marker="*", color=SPARSE_BAR, s=120, zorder=3, label="returned model")
        ax.set_xlabel("predicted latency of the prunable layers (ms)")
        ax.set_ylabel("metric (eval_fn)")
        ax.margins(0.12)
        ax.legend(fontsize=7, loc="best")
        ax.spines[["top", "right"]].set_visible(False)
        out.append(_svg(fig))
    else:
        out.append('<p class="note">No accuracy/latency points recorded (sparsify ran without eval_fn, or '
                   'its layers have no latency estimate).</p>')
    hist = [h for h in (getattr(sp, "history", None) or []) if "step" in h and "loss" in h]
    if hist:
        fig = _figure(6.0, 2.8)
        ax = fig.add_subplot()
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], color=DENSE_BAR, lw=1)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("loss", color=DENSE_BAR)
        if all("density" in h for h in hist):
            ax2 = ax.twinx()
            ax2.plot([h["step"] for h in hist], [h["density"] for h in hist], color=SPARSE_BAR, lw=1)
            ax2.set_ylabel("density", color=SPARSE_BAR)
        out.append(_svg(fig))
    return "".join(out)


def _levels_chart(rows: list) -> str:
    """Cosine to the ungated output against latency, one point per routing level."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    xs, ys = [r["ms"] for r in rows], [r["cosine"] for r in rows]
    ax.plot(xs, ys, color="#bbb", lw=1, zorder=1)
    ax.scatter(xs, ys, color="#b07aa1", s=30, zorder=2)
    _annotate_points(ax, [(r["ms"], r["cosine"], f"level {r['level']}" + (
        "" if r.get("realized_density") is None else f", density {r['realized_density']:.2f}")) for r in rows])
    ax.margins(0.15)
    ung = rows[0].get("ungated_ms") if rows else None
    if ung is not None:
        ax.axvline(ung, color=DENSE_BAR, ls="--", lw=1, label=f"ungated {ung:.3f} ms")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("cosine to the ungated output")
    ax.spines[["top", "right"]].set_visible(False)
    table = "".join(
        f"<tr><td class=num>{r['level']}</td><td class=num>{_fmt(r.get('density'), 2)}</td>"
        f"<td class=num>{_fmt(r.get('realized_density'), 3)}</td><td class=num>{_fmt(r.get('ms'))}</td>"
        f"<td class=num>{_fmt(r.get('cosine'), 5)}</td><td class=num>{_fmt(r.get('max_abs_diff'), 4)}</td></tr>"
        for r in rows)
    return (_svg(fig) + '<table class="layers" id="levels-table"><tr><th>level</th><th>density</th>'
            "<th>realized density</th><th>ms</th><th>cosine</th><th>max abs diff</th></tr>" + table + "</table>")


def _op_label(node, gm) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        name = str(node.target)
        if name.startswith("aten."):  # aten.add.Tensor -> add (the overload is noise here)
            return name.split(".")[1]
        return getattr(node.target, "__name__", None) or name
    return node.op


def _is_shape_node(node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("aten.sym_size")


def graph_dot(cm):
    """The rewritten graph as a ``graphviz.Digraph`` (weights and guards left out), sparse layers coloured.

    Raises
    ------
    ImportError
        The ``graphviz`` Python package is not installed.
    """
    import graphviz

    gm = cm.graph.gm
    routed = {n.meta[ROUTING_META_KEY].get("name") for n in cm.graph.graph.nodes if ROUTING_META_KEY in n.meta}
    dot = graphviz.Digraph("sparsecc", graph_attr={"rankdir": "TB", "fontname": "Helvetica", "bgcolor": "white"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "10", "fillcolor": "white", "color": "#888888"},
                           edge_attr={"color": "#888888", "arrowsize": "0.6"})
    kept = set()
    for n in cm.graph.graph.nodes:
        if n.op == "get_attr" or (n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "GuardsFn"):
            continue
        kept.add(n.name)
        a = get_annotation(n)
        op = _op_label(n, gm)
        label, fill = n.name if op == n.name else f"{n.name}\n{op}", "white"
        if n.op in ("placeholder", "output"):
            fill = IO_FILL
        if a is not None:
            label = f"{a.name}\n{op} · {a.candidate.label if a.candidate else 'dense'}" + (
                "" if a.density is None else f"\ndensity {a.density:.2f}")
            fill = SPARSE_FILL if _is_sparse(a) else (PRUNED_FILL if (a.density or 1.0) < 1.0 else "white")
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if getattr(mod, "format", None) == "gated" or (a is not None and a.name in routed and _is_sparse(a)):
            fill = ROUTED_FILL
            label = f"{a.name if a is not None else n.name}\n{op} · {getattr(a, 'kernel', None) or 'gated'}" + (
                "" if a is None or a.density is None else f"\ndensity {a.density:.2f}")
        if _is_shape_node(n):  # a dynamic size read by views: drawn faint so the data flow stands out
            dot.node(n.name, label, fontsize="8", fontcolor="#777777", color="#cccccc", tooltip=label)
        else:
            dot.node(n.name, label, fillcolor=fill, tooltip=label.replace("\n", " | "))
    for n in cm.graph.graph.nodes:
        if n.name in kept:
            for src in n.all_input_nodes:
                if src.name in kept:
                    faint = {"color": "#cccccc", "style": "dashed"} if _is_shape_node(src) else {}
                    dot.edge(src.name, n.name, **faint)
    return dot, len(kept)


def _graph_svg(cm) -> str:
    try:
        import graphviz
    except ImportError:
        return ('<p class="note" id="graph-missing">Graph not drawn: the graphviz Python package is not installed '
                '(pip install graphviz).</p>')
    dot, n = graph_dot(cm)
    if n > MAX_GRAPH_NODES:
        return f'<p class="note" id="graph-missing">Graph not drawn: {n} nodes (more than {MAX_GRAPH_NODES}).</p>'
    try:
        svg = dot.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        return ('<p class="note" id="graph-missing">Graph not drawn: Graphviz\'s <code>dot</code> binary was not '
                'found on PATH (Debian: apt-get install graphviz).</p>')
    except graphviz.CalledProcessError as e:
        return f'<p class="note" id="graph-missing">Graph not drawn: dot failed ({html.escape(str(e))}).</p>'
    legend = ('<p class="legend">' + "".join(
        f'<span style="background:{c}">{html.escape(t)}</span>'
        for c, t in ((SPARSE_FILL, "sparse kernel"), (PRUNED_FILL, "pruned, runs dense"),
                     (ROUTED_FILL, "activation-routed"), (IO_FILL, "input / output"))) + "</p>")
    return legend + '<div class="graph" id="graph-svg">' + _strip_prolog(svg) + "</div>"


# ------------------------------------------------------------------------------------------------ the page
def _table(nodes: list) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEAD)
    body = []
    for _, a in nodes:
        cells = "".join(f'<td class="{"num" if h in _NUMERIC else "txt"}">{html.escape(c)}</td>'
                        for h, c in zip(_HEAD, _row(a)))
        body.append(f'<tr class="{"sparse" if _is_sparse(a) else "dense"}" data-layer="{html.escape(a.name)}">'
                    f"{cells}</tr>")
    return (f'<table class="layers" id="layer-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def html_report(cm, path: Union[str, os.PathLike], *, title: Optional[str] = None, sparsify_result=None,
                levels: Optional[list] = None) -> Path:
    """Write a self-contained HTML report of a compiled module to ``path``.

    The page holds the per-layer table of ``cm.report()`` (one row per layer) and its summary lines, a bar chart
    of the latency per layer (compiled against torch dense, in ms), a heat map of the nonzero pattern of every
    pruned or sparse weight (read back from the sparse module's stored format; at most 128x128 cells, each the
    density of its tile), the accuracy/latency curve of ``sparsify_result`` when given, the routing levels'
    cosine against latency for an activation-routed module, and the rewritten graph drawn by Graphviz with the
    sparse layers coloured. Nothing is loaded from outside the file.

    Parameters
    ----------
    cm : CompiledModule
        What :func:`sparsecc.compile` returned.
    path : str or os.PathLike
        The HTML file to write (replaced if it exists); its folder must exist.
    title : str, optional
        Page title (default: ``"sparsecc report"`` and the target).
    sparsify_result : SparsifyResult, optional
        What :func:`sparsecc.sparsify` returned for the model: its budget-search rounds (metric against
        predicted ms), the dense and returned model's points, and the fine-tuning loss per step are drawn.
    levels : list of dict, optional
        ``cm.levels()`` rows, for a routed module; by default measured here with ``cm.levels()``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InvalidArgumentError
        ``cm`` is not a compiled module.
    ArtifactError
        ``path`` is a folder, its folder does not exist, or it cannot be written.
    """
    if not (hasattr(cm, "layers") and hasattr(cm, "graph") and hasattr(getattr(cm, "graph", None), "gm")
            and hasattr(cm, "report")):
        raise InvalidArgumentError(f"html_report: cm must be a CompiledModule (sparsecc.compile's result), got "
                                   f"{type(cm).__name__}")
    if sparsify_result is not None and not hasattr(sparsify_result, "layers"):
        raise InvalidArgumentError(f"html_report: sparsify_result must be a SparsifyResult (sparsecc.sparsify's "
                                   f"result), got {type(sparsify_result).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"html_report: path {str(path)!r} is a folder; give the HTML file to write")
    if not path.parent.is_dir():
        raise ArtifactError(f"html_report: the folder of path {str(path)!r} does not exist")

    nodes = _layer_nodes(cm)
    layers = [a for _, a in nodes]
    target = cm.target.describe() if hasattr(getattr(cm, "target", None), "describe") else ""
    title = title if title is not None else "sparsecc report" + (f": {target}" if target else "")
    n_sparse = sum(1 for a in layers if _is_sparse(a))
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(layers)} layers, {n_sparse} on sparse kernels; target {html.escape(target)}; '
        f"written {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}</p>",
        '<h2 id="layers">Layers</h2>', _table(nodes),
        '<ul class="summary" id="summary">'
        + "".join(f"<li>{html.escape(ln.strip())}</li>" for ln in _summary_lines(cm, len(layers))) + "</ul>",
        '<h2 id="latency">Latency per layer</h2><div class="figure" id="latency-chart">'
        + _latency_chart(layers) + "</div>",
        '<h2 id="weights">Weight nonzero patterns</h2>' + _heatmaps(cm, nodes),
    ]
    if sparsify_result is not None:
        sections.append('<h2 id="accuracy">Accuracy and latency (sparsify)</h2><div class="figure" '
                        'id="sparsify-chart">' + _sparsify_curve(sparsify_result) + "</div>")
    gated = cm.gated_layers() if hasattr(cm, "gated_layers") else []
    if gated:
        from .errors import RoutingError

        try:
            rows = levels if levels is not None else cm.levels()
            body = _levels_chart(rows)
        except RoutingError as e:
            body = f'<p class="note">Routing levels not measured: {html.escape(str(e))}.</p>'
        sections.append('<h2 id="levels">Routing levels</h2><div class="figure" id="levels-chart">' + body + "</div>")
    sections.append('<h2 id="graph">Rewritten graph</h2>' + _graph_svg(cm))

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{_CSS}</style></head>'
            "<body>" + "\n".join(sections) + "</body></html>\n")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(page)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ArtifactError(f"html_report: cannot write {str(path)!r}: {e}") from e
    return path
