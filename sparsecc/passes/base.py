"""Pass infrastructure: one pass = one class; a manager runs them in order.

Modelled on ``torch.fx.passes.infra`` (``PassResult``, a manager that names the
failing pass and the passes run before it) and TVM's ``PassContext`` (options
and instruments such as dumping the IR after a pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import PassError, SparseccError
from ..ir.graph import SparseGraph


@dataclass
class PassResult:
    """What a pass returns: the (possibly rewritten) graph and whether it changed."""

    graph: SparseGraph
    modified: bool
    info: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """Options shared by the passes of one compilation.

    Attributes
    ----------
    target : object
        Target description with a cost model (``sparsecc.targets``); may be None
        for passes that do not need one.
    m : int
        Example number of rows of X seen by the linears (batch x tokens), used
        by cost estimates.
    options : dict
        Free-form per-compilation options.
    dump_dir : Path, optional
        If set, the graph table is written to ``dump_dir/NN_<pass>.txt`` after each pass.
    print_after : sequence of str
        Pass names after which the graph table is printed (``"all"`` for every pass).
    history : list
        ``(pass name, modified, seconds)`` of every pass run so far.
    """

    target: Any = None
    m: int = 1
    options: dict = field(default_factory=dict)
    dump_dir: Optional[Path] = None
    print_after: Sequence[str] = ()
    history: list = field(default_factory=list)

    def ran(self, name: str) -> bool:
        return any(h[0] == name for h in self.history)


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` and ``requires`` (names of passes that must have run
    before) and implement :meth:`run`. Analysis passes only write
    ``node.meta["sparsecc"]``; rewrite passes change the graph or its weights.
    """

    name: str = "pass"
    requires: tuple = ()

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph: SparseGraph, ctx: PassContext) -> PassResult:
        missing = [r for r in self.requires if not ctx.ran(r)]
        if missing:
            raise PassError(f"pass {self.name!r} requires {missing} to run first")
        return self.run(graph, ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PassManager:
    """Run passes in order; on failure name the pass and the passes run before it."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, graph: SparseGraph, ctx: PassContext) -> SparseGraph:
        for i, p in enumerate(self.passes):
            t0 = time.perf_counter()
            try:
                result = p(graph, ctx)
            except PassError:
                raise
            except SparseccError:
                raise
            except Exception as err:  # noqa: BLE001 - wrap with pass context
                before = [h[0] for h in ctx.history]
                raise PassError(
                    f"pass {p.name!r} failed (passes run before: {before or 'none'}): "
                    f"{type(err).__name__}: {err}") from err
            graph = result.graph
            if result.modified:
                graph.gm.graph.lint()
                graph.gm.recompile()
            ctx.history.append((p.name, result.modified, time.perf_counter() - t0))
            if "all" in ctx.print_after or p.name in ctx.print_after:
                print(f"# after {p.name}\n{graph.table(only_layers=True)}")
            if ctx.dump_dir is not None:
                d = Path(ctx.dump_dir)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:02d}_{p.name}.txt").write_text(str(graph))
        return graph
