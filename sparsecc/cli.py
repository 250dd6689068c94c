"""The ``sparsecc`` command line: compile, sparsify, tune, inspect and bench a model from a shell.

MODEL is one of

* a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``): its ``.module()`` is compiled; the
  example inputs are the ones the program stores, else made from its input specs (dynamic dims filled with
  ``--batch`` for the leading dim and ``--seq`` for the others);
* a Hugging Face model folder (it holds ``config.json``): ``transformers.AutoModel`` and ``AutoTokenizer`` from
  the folder, called as ``model(input_ids, attention_mask)`` returning the last hidden state; the example inputs
  are a tokenised batch of ``--batch`` sentences padded to ``--seq`` tokens;
* ``module:callable`` (``pkg.mod:fn`` or ``path/to/file.py:fn``): called without arguments, it returns
  ``(model, example_inputs)``.

Every command takes ``--json``: one JSON object on stdout and nothing else there (progress and logs go to
stderr). Exit codes: 0 ok, 2 usage errors, 1 a :class:`~sparsecc.errors.SparseccError` (its message on stderr).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparsecc.errors import InvalidArgumentError, SparseccError

__all__ = ["app", "main", "load_model", "parse_block_shape"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sparsecc: compile sparse PyTorch models to TVM kernels.")
err = Console(stderr=True, soft_wrap=True)

# ---------------------------------------------------------------------------------------------- model loading


def parse_block_shape(text: Optional[str]) -> Optional[tuple]:
    """``"16x1"`` -> ``(16, 1)``; None stays None.

    Raises
    ------
    InvalidArgumentError
        ``text`` is not two positive integers joined by ``x``.
    """
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidArgumentError(f"--block-shape {text!r}: expected ROWSxCOLS with positive integers, e.g. 16x1")
    return shape


class _HFEncoder:
    """Wrap a Hugging Face encoder as ``forward(input_ids, attention_mask) -> last_hidden_state``."""

    @staticmethod
    def make(model):
        import torch

        class HFEncoder(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
                return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state

        return HFEncoder(model).eval()


def _fill_dims(shape, batch: int, seq: int) -> list:
    dims = []
    for i, d in enumerate(shape):
        try:
            dims.append(int(d))
        except (TypeError, ValueError):
            dims.append(batch if i == 0 else seq)
    return dims


def _inputs_from_specs(ep, batch: int, seq: int) -> tuple:
    import torch

    user = set(ep.graph_signature.user_inputs)
    args = []
    gen = torch.Generator().manual_seed(0)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InvalidArgumentError(f"input {node.name!r} of the saved program is not a tensor; save the "
                                       f"program with its example inputs (torch.export keeps them)")
        shape = _fill_dims(val.shape, batch, seq)
        if val.dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen).to(val.dtype))
        elif val.dtype == torch.bool:
            args.append(torch.ones(shape, dtype=torch.bool))
        else:  # token ids and masks: ones are valid for both
            args.append(torch.ones(shape, dtype=val.dtype))
    return tuple(args)


def _load_callable(spec: str):
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise InvalidArgumentError(f"MODEL {spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except FileNotFoundError as e:
            raise InvalidArgumentError(f"MODEL {spec!r}: cannot read {path}: {e}") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise InvalidArgumentError(f"MODEL {spec!r}: cannot import module {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise InvalidArgumentError(f"MODEL {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 2):
        raise InvalidArgumentError(f"MODEL {spec!r}: {fn_name}() must return (model, example_inputs), "
                                   f"got {type(out).__name__}")
    return out


def load_model(spec: str, *, batch: Optional[int] = None, seq: int = 128) -> tuple:
    """Load MODEL for the command line: ``(model, example_inputs, kind)``.

    Parameters
    ----------
    spec : str
        A ``.pt2`` file, a Hugging Face model folder, or ``module:callable``.
    batch : int, optional
        Batch size of the example inputs: the stored example's (a ``.pt2`` that stores one, or the callable's)
        rebatched to it when given; the made inputs' (``.pt2`` input specs, Hugging Face folder) else 1.
    seq : int
        Sequence length of made inputs (dynamic non-batch dims of a ``.pt2``; the Hugging Face tokens).

    Returns
    -------
    (torch.nn.Module, tuple of Tensor, str)
        The model in eval mode, its positional example inputs, and the kind: ``"pt2"``, ``"hf"`` or
        ``"callable"``.

    Raises
    ------
    InvalidArgumentError
        The file or folder does not exist, cannot be loaded, or the callable does not return
        ``(model, example_inputs)``; the message names MODEL.
    """
    import torch

    path = Path(spec)
    made_batch = batch or 1
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(f"MODEL {spec}: folder without config.json (not a Hugging Face model "
                                       f"folder; an export artifact is read by `sparsecc inspect`)")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise InvalidArgumentError(f"MODEL {spec}: a Hugging Face folder needs transformers: {e}") from None
        try:
            inner = AutoModel.from_pretrained(str(path)).eval()
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"MODEL {spec}: cannot load the Hugging Face model: {e}") from None
        enc = tok(["sparsecc compiles sparse neural networks."] * made_batch, padding="max_length", truncation=True,
                  max_length=seq, return_tensors="pt")
        return _HFEncoder.make(inner), (enc["input_ids"], enc["attention_mask"]), "hf"
    if path.suffix == ".pt2" or path.is_file():
        if not path.is_file():
            raise InvalidArgumentError(f"MODEL {spec}: no such file")
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # torch raises many kinds for a file that is not a saved program
            raise InvalidArgumentError(f"MODEL {spec}: not a torch.export program saved with "
                                       f"torch.export.save: {e}") from None
        stored = getattr(ep, "example_inputs", None)
        if stored is not None and not stored[1]:
            args = tuple(stored[0])
            if batch is not None:
                args = _with_batch(args, batch)
        else:
            args = _inputs_from_specs(ep, made_batch, seq)
        from sparsecc.ir.modules import modules_from_program

        module = modules_from_program(ep)  # its linears and convs as nn.Linear / nn.Conv2d, so they can be pruned
        # The graph was traced in the mode it was exported in; the unlifted module only carries the flag
        # (its eval() is not implemented), and compile would warn about training mode for nothing.
        for sub in module.modules():
            sub.training = False
        return module, args, "pt2"
    if ":" in spec:
        model, ex = _load_callable(spec)
        if isinstance(ex, torch.Tensor):
            ex = (ex,)
        if isinstance(ex, dict):
            raise InvalidArgumentError(f"MODEL {spec!r}: return positional example inputs (a tensor or a "
                                       f"tuple), not a dict")
        ex = tuple(ex)
        return model.eval(), _with_batch(ex, batch) if batch is not None else ex, "callable"
    raise InvalidArgumentError(f"MODEL {spec}: no such file or folder (expected a .pt2 file, a Hugging Face "
                               f"model folder, or module:callable)")


def _with_batch(args: tuple, batch: int) -> tuple:
    """The example inputs at another batch size: the first row of every tensor repeated ``batch`` times."""
    import torch

    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            out.append(a[:1].expand(batch, *a.shape[1:]).contiguous())
        else:
            out.append(a)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _cli(json_out: bool):
    """Run a command: stdout goes to stderr while it works when ``--json`` (so stdout holds the JSON alone);
    a SparseccError prints its message and exits 1."""
    saved_fd = None
    saved_stdout = sys.stdout
    if json_out:
        sys.stdout.flush()
        saved_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    try:
        yield
    except SparseccError as e:
        err.print(f"[bold red]error[/]: {type(e).__name__}: {e}", markup=True, highlight=False)
        raise typer.Exit(1)
    finally:
        if json_out:
            sys.stderr.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
            sys.stdout = saved_stdout


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


def _progress():
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                    transient=False)


def _sparsity_arg(sparsity: Optional[float]) -> Optional[float]:
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise InvalidArgumentError(f"--sparsity {sparsity}: must be in [0, 1)")
    return sparsity


def _layer_rows(cm) -> list:
    return [{"name": a.name, "kind": a.kind, "weight_shape": list(a.weight_shape), "pattern": a.pattern,
             "density": a.density, "nnz": a.nnz, "format": a.format,
             "block": list(a.format_params) if a.format_params else None, "kernel": a.kernel,
             "measured_ms": a.measured_ms, "dense_ms": a.dense_ms} for a in cm.layers]


def _torch_reference(model, sparsity, pattern: str, block_shape):
    """The model pruned as ``compile(sparsity=...)`` prunes it (the torch reference of ``bench``), on a copy."""
    from sparsecc.api import prune

    sparsity = _sparsity_arg(sparsity)
    if sparsity is None:
        return model
    block = parse_block_shape(block_shape)
    return prune(model, sparsity, block_shape=block if (block and pattern == "block") else (1, 1),
                 pattern=pattern if ":" in pattern else None)


def _load_and_compile(prog, model, batch, seq, target, sparsity, pattern, block_shape, channel_sparsity, measure,
                      tuning_db=None, rpc=None):
    """Load MODEL and compile it under a progress task; returns (task, compiled module)."""
    t = prog.add_task(f"loading {model}", total=None)
    m, args, _ = load_model(model, batch=batch, seq=seq)
    prog.update(t, description=f"compiling for {target}")
    cm = _compile(m, args, target=target, sparsity=sparsity, pattern=pattern, block_shape=block_shape,
                  channel_sparsity=channel_sparsity, tuning_db=tuning_db, measure=measure, rpc=rpc)
    return t, cm


def _compile(model, args, *, target, sparsity, pattern, block_shape, channel_sparsity, tuning_db=None,
             measure=True, rpc=None):
    from sparsecc.api import compile as compile_model

    kw: dict = dict(target=target, sparsity=_sparsity_arg(sparsity), pattern=pattern,
                    block_shape=parse_block_shape(block_shape), measure=measure)
    if channel_sparsity is not None:
        kw["channel_sparsity"] = channel_sparsity
    if tuning_db is not None:
        kw["tuning_db"] = tuning_db
    if rpc is not None:
        kw["rpc"] = rpc
    return compile_model(model, args, **kw)


def _write_html(cm, path: Path) -> Path:
    try:
        from sparsecc.report import html_report
    except ImportError as e:
        raise InvalidArgumentError(f"--report-html {path}: the HTML report is not available in this "
                                   f"installation ({e})") from None
    return html_report(cm, path)


# common options
_MODEL = typer.Argument(..., help=".pt2 file, Hugging Face model folder, or module:callable")
_TARGET = typer.Option("x86", "--target", help="x86, arm, arm:<core>, graviton3 or cuda")
_SPARSITY = typer.Option(None, "--sparsity", help="prune every linear to this sparsity in [0, 1)")
_PATTERN = typer.Option("auto", "--pattern", help="auto, unstructured, block, dense, 2:4, 1:4")
_BLOCK = typer.Option(None, "--block-shape", help="block of pattern=block, e.g. 16x1")
_CHANNEL = typer.Option(None, "--channel-sparsity", help="fraction of channels/heads/neurons to remove first")
_BATCH1 = typer.Option(None, "--batch", help="batch size of the example inputs (default: the stored example's, "
                                              "else 1)")
_SEQ = typer.Option(128, "--seq", help="sequence length of made example inputs")
_JSON = typer.Option(False, "--json", help="print one JSON object on stdout")
_RPC = typer.Option(None, "--rpc", help="ARM: time kernels on the device behind a TVM RPC tracker, host:port/key")
_MEASURE = typer.Option(True, "--measure/--no-measure", help="time the kernels against torch dense to choose "
                                                              "formats (--no-measure: cost model alone)")


# ---------------------------------------------------------------------------------------------- commands


@app.command()
def compile(model: str = _MODEL, target: str = _TARGET, sparsity: Optional[float] = _SPARSITY,
            pattern: str = _PATTERN, block_shape: Optional[str] = _BLOCK,
            channel_sparsity: Optional[float] = _CHANNEL,
            out: Optional[Path] = typer.Option(None, "-o", "--out", help="artifact folder written by cm.export"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty artifact folder"),
            report_html: Optional[Path] = typer.Option(None, "--report-html", help="write the HTML report"),
            tuning_db: Optional[Path] = typer.Option(None, "--tuning-db", help="folder written by sparsecc tune"),
            rpc: Optional[str] = _RPC,
            batch: Optional[int] = _BATCH1, seq: int = _SEQ, measure: bool = _MEASURE, json_out: bool = _JSON) -> None:
    """Compile MODEL, print its per-layer report and write the deployment artifact."""
    with _cli(json_out):
        with _progress() as prog:
            t, cm = _load_and_compile(prog, model, batch, seq, target, sparsity, pattern, block_shape,
                                      channel_sparsity, measure, tuning_db, rpc)
            if out is not None:
                prog.update(t, description=f"exporting to {out}")
                art = cm.export(out, overwrite=overwrite)
            if report_html is not None:
                prog.update(t, description=f"writing {report_html}")
                _write_html(cm, report_html)
            prog.update(t, description="done")
        result = {"model": model, "target": target, "layers": _layer_rows(cm), "weight_bytes": cm.weight_bytes,
                  "artifact": str(art) if out is not None else None,
                  "report_html": str(report_html) if report_html is not None else None}
        report = cm.report()
    if json_out:
        _emit(result)
    else:
        print(report)
        if out is not None:
            print(f"artifact: {art}")
        if report_html is not None:
            print(f"HTML report: {report_html}")


def _weight_densities(model) -> list:
    import torch

    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = mod.weight.detach()
            nnz = int(torch.count_nonzero(w))
            rows.append({"name": name, "weight_shape": list(w.shape), "nnz": nnz, "density": nnz / w.numel()})
    return rows


@app.command()
def sparsify(model: str = _MODEL, target: str = _TARGET,
             sparsity: float = typer.Option(..., "--sparsity", help="target sparsity in [0, 1)"),
             pattern: str = typer.Option("unstructured", "--pattern",
                                         help="unstructured, block, 16x1, 2:4, channel, auto"),
             block_shape: Optional[str] = _BLOCK,
             method: str = typer.Option("magnitude", "--method", help="magnitude, impact, movement, activation"),
             data: Optional[str] = typer.Option(None, "--data",
                                                help="module:callable returning (batches, loss_fn) for the "
                                                     "scores and fine-tuning"),
             finetune_steps: int = typer.Option(0, "--finetune-steps", help="fine-tuning steps (needs --data)"),
             out: Path = typer.Option(..., "-o", "--out", help="pruned program, torch.export .pt2"),
             batch: Optional[int] = _BATCH1, seq: int = _SEQ, json_out: bool = _JSON) -> None:
    """Prune MODEL with sparsecc.sparsify and save the pruned model as a torch.export .pt2 plus a JSON summary."""
    import torch

    # the functions by their modules: the names sparsecc.sparsify and sparsecc.tune are also subpackages
    from sparsecc.sparsify.api import sparsify as sparsify_model

    with _cli(json_out):
        _sparsity_arg(sparsity)
        if out.suffix != ".pt2":
            raise InvalidArgumentError(f"-o {out}: the pruned program is written as a .pt2 file")
        with _progress() as prog:
            t = prog.add_task(f"loading {model}", total=None)
            m, args, kind = load_model(model, batch=batch, seq=seq)
            if kind == "pt2":
                raise InvalidArgumentError(f"MODEL {model}: sparsify fine-tunes, and a torch.export program is "
                                           f"a graph traced for inference (dropout gone, batch-norm statistics "
                                           f"fixed); pass module:callable or a Hugging Face folder, or prune the "
                                           f"program by magnitude with `sparsecc compile {model} --sparsity S`")
            kw: dict = dict(target=target, sparsity=sparsity, pattern=pattern, method=method,
                            block_shape=parse_block_shape(block_shape), progress=False)
            if data is not None:
                batches, loss_fn = _load_callable(data)
                kw.update(data=batches, loss_fn=loss_fn, finetune_steps=finetune_steps)
            elif finetune_steps or method != "magnitude":
                raise InvalidArgumentError(f"--method {method} / --finetune-steps {finetune_steps} need --data")
            if finetune_steps == 0:
                kw["schedule"] = "oneshot"
            prog.update(t, description="pruning")
            sp = sparsify_model(m, args, **kw)
            prog.update(t, description=f"saving {out}")
            ep = torch.export.export(sp.model.eval(), args)
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(ep, str(out))
            layers = _weight_densities(sp.model)
            total = sum(r["nnz"] for r in layers)
            numel = sum(int(torch.tensor(r["weight_shape"]).prod()) for r in layers)
            summary = {"model": model, "out": str(out), "sparsity": sparsity, "pattern": pattern,
                       "method": method, "density": total / max(numel, 1), "layers": layers}
            summary_path = out.with_suffix(".json")
            summary_path.write_text(json.dumps(summary, indent=1))
            summary["summary"] = str(summary_path)
            prog.update(t, description="done")
    if json_out:
        _emit(summary)
    else:
        table = Table(title=f"pruned {model}")
        for c in ("layer", "weight shape", "density"):
            table.add_column(c)
        for r in layers:
            table.add_row(r["name"], "x".join(map(str, r["weight_shape"])), f"{r['density']:.3f}")
        Console().print(table)
        print(f"density {summary['density']:.3f}; wrote {out} and {summary_path}")


@app.command()
def tune(model: str = _MODEL, target: str = _TARGET, sparsity: Optional[float] = _SPARSITY,
         pattern: str = _PATTERN, block_shape: Optional[str] = _BLOCK,
         work_dir: Path = typer.Option(..., "--work-dir", help="tuning database folder (created if missing)"),
         trials: int = typer.Option(64, "--trials", help="candidates measured per workload"),
         time_budget_s: Optional[float] = typer.Option(None, "--time-budget", help="stop after about N seconds"),
         rpc: Optional[str] = _RPC,
         batch: Optional[int] = _BATCH1, seq: int = _SEQ, json_out: bool = _JSON) -> None:
    """Autotune the sparse kernels of MODEL into --work-dir (pass it to compile with --tuning-db)."""
    from sparsecc.api import tune as tune_model

    with _cli(json_out):
        m, args, _ = load_model(model, batch=batch, seq=seq)
        summary = tune_model(m, args, target=target, sparsity=_sparsity_arg(sparsity), pattern=pattern,
                                block_shape=parse_block_shape(block_shape), trials=trials, work_dir=work_dir,
                                time_budget_s=time_budget_s, progress=True, rpc=rpc)
    if json_out:
        _emit({"work_dir": summary.work_dir, "workloads": summary.rows()})
    else:
        print(summary)


@app.command()
def inspect(model: str = typer.Argument(..., help="MODEL, or an artifact folder written by compile -o"),
            target: str = _TARGET, sparsity: Optional[float] = _SPARSITY, pattern: str = _PATTERN,
            block_shape: Optional[str] = _BLOCK, channel_sparsity: Optional[float] = _CHANNEL,
            html: Optional[Path] = typer.Option(None, "--html", help="write the HTML report (for a MODEL)"),
            batch: Optional[int] = _BATCH1, seq: int = _SEQ, measure: bool = _MEASURE, json_out: bool = _JSON) -> None:
    """Print an artifact's manifest, or compile MODEL and print its per-layer table."""
    path = Path(model)
    if path.is_dir() and (path / "manifest.json").is_file():
        from sparsecc.runtime.export import read_manifest

        with _cli(json_out):
            if html is not None:
                raise InvalidArgumentError(f"--html {html}: an artifact folder has no HTML report; pass the model")
            mf = read_manifest(path)
        if json_out:
            _emit(mf)
            return
        con = Console()
        tgt = mf.get("target", {})
        con.print(f"artifact {path}: target {tgt.get('name')} ({tgt.get('arch')}), format version "
                  f"{mf.get('format_version')}, {mf.get('num_params')} parameter arrays", highlight=False)
        for title, specs in (("inputs", mf.get("inputs", [])), ("outputs", mf.get("outputs", []))):
            table = Table(title=title)
            for c in ("#", "shape", "dtype", "fixed dims"):
                table.add_column(c)
            for i, s in enumerate(specs):
                fixed = s.get("fixed_dims")
                table.add_row(str(i), "x".join(map(str, s.get("shape", []))), str(s.get("dtype")),
                              "" if fixed is None else ",".join(map(str, fixed)))
            con.print(table)
        table = Table(title="layers")
        for c in ("layer", "format", "block", "density"):
            table.add_column(c)
        for a in mf.get("layers", []):
            d = a.get("density")
            table.add_row(a["name"], str(a.get("format")), "x".join(map(str, a["block"])) if a.get("block") else "",
                          "" if d is None else f"{d:.3f}")
        con.print(table)
        return
    with _cli(json_out):
        with _progress() as prog:
            t, cm = _load_and_compile(prog, model, batch, seq, target, sparsity, pattern, block_shape,
                                      channel_sparsity, measure)
            if html is not None:
                prog.update(t, description=f"writing {html}")
                _write_html(cm, html)
            prog.update(t, description="done")
        rows = _layer_rows(cm)
        report = cm.report()
    if json_out:
        _emit({"model": model, "target": target, "layers": rows,
               "html": str(html) if html is not None else None})
    else:
        print(report)
        if html is not None:
            print(f"HTML report: {html}")


@app.command()
def bench(model: str = _MODEL, target: str = typer.Option("x86", "--target", help="host target (x86)"),
          sparsity: Optional[float] = _SPARSITY, pattern: str = _PATTERN, block_shape: Optional[str] = _BLOCK,
          batch: List[int] = typer.Option([1], "--batch", help="batch sizes, e.g. --batch 1 --batch 8 or 1 8"),
          seq: int = _SEQ, runs: int = typer.Option(10, "--runs", help="interleaved rounds per batch size"),
          measure: bool = _MEASURE, json_out: bool = _JSON) -> None:
    """Median latency (ms) of torch dense, torch pruned and sparsecc per batch size, interleaved in one run."""
    from sparsecc.runtime.timing import interleaved_ms

    with _cli(json_out):
        if runs < 1:
            raise InvalidArgumentError(f"--runs {runs}: must be >= 1")
        if any(b < 1 for b in batch):
            raise InvalidArgumentError(f"--batch {batch}: batch sizes must be >= 1")
        rows = []
        with _progress() as prog:
            t = prog.add_task(f"loading {model}", total=None)
            m, args, _ = load_model(model, seq=seq)
            prog.update(t, description="pruning (the torch reference)")
            pruned = _torch_reference(m, sparsity, pattern, block_shape)
            prog.update(t, description=f"compiling for {target}")
            cm = _compile(m, args, target=target, sparsity=sparsity, pattern=pattern,
                          block_shape=block_shape, channel_sparsity=None, measure=measure)
            for b in batch:
                prog.update(t, description=f"timing batch {b} ({runs} rounds)")
                xb = _with_batch(args, b)
                ms = interleaved_ms({"dense": m, "pruned": pruned, "sparsecc": cm}, *xb, runs=runs)
                rows.append({"batch": b, "dense_ms": ms["dense"], "pruned_ms": ms["pruned"],
                             "sparsecc_ms": ms["sparsecc"], "dense_over_sparsecc": ms["dense"] / ms["sparsecc"],
                             "pruned_over_sparsecc": ms["pruned"] / ms["sparsecc"]})
            prog.update(t, description="done")
    if json_out:
        _emit({"model": model, "target": target, "sparsity": sparsity, "pattern": pattern, "runs": runs,
               "results": rows})
        return
    table = Table(title=f"{model}: median latency (ms), {runs} interleaved runs")
    for c in ("batch", "torch dense", "torch pruned", "sparsecc", "dense/sparsecc", "pruned/sparsecc"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['dense_ms']:.3f}", f"{r['pruned_ms']:.3f}", f"{r['sparsecc_ms']:.3f}",
                      f"{r['dense_over_sparsecc']:.2f}x", f"{r['pruned_over_sparsecc']:.2f}x")
    Console(width=120).print(table)


def _expand_batches(argv: list) -> list:
    """``--batch 1 8`` -> ``--batch 1 --batch 8`` (click options take one value each)."""
    out: list = []
    i = 0
    while i < len(argv):
        a = argv[i]
        out.append(a)
        if a == "--batch":
            j = i + 1
            vals = []
            while j < len(argv) and argv[j].isdigit():
                vals.append(argv[j])
                j += 1
            if vals:
                out.append(vals[0])
                for v in vals[1:]:
                    out += ["--batch", v]
                i = j
                continue
        i += 1
    return out


def main(argv: Optional[list] = None) -> None:
    """Console entry point ``sparsecc``."""
    args = _expand_batches(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="sparsecc")


if __name__ == "__main__":
    main()
