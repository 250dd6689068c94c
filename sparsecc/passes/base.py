"""Pass infrastructure: one pass = one class; a manager runs them in order; instruments watch them.

Modelled on ``torch.fx.passes.infra`` (``PassResult``; ``requires`` / ``ensures``; a
manager that names the failing pass and the passes run before it) and TVM's
``PassContext`` with ``PassInstrument`` s (``PrintAfterAll``, ``DumpIR``,
``PassTimingInstrument`` in ``python/tvm/ir/instrument.py``): printing, dumping and
timing are instruments held by the context, not code inside the manager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import PassError, SparseccError
from ..ir.graph import SparseGraph

__all__ = ["DumpGraph", "Pass", "PassContext", "PassInstrument", "PassManager", "PassResult", "PassTiming",
           "PrintAfter"]


@dataclass
class PassResult:
    """What a pass returns: the (possibly rewritten) graph and whether it changed."""

    graph: SparseGraph
    modified: bool
    info: dict = field(default_factory=dict)


class PassInstrument:
    """Watches the passes of one compilation: ``before_pass`` / ``after_pass`` hooks, both no-ops by default."""

    def before_pass(self, index: int, p: "Pass", graph: SparseGraph, ctx: "PassContext") -> None:
        pass

    def after_pass(self, index: int, p: "Pass", result: PassResult, seconds: float, ctx: "PassContext") -> None:
        pass


class PassTiming(PassInstrument):
    """Records ``(pass name, modified, seconds)`` of every pass in ``ctx.history`` (always installed)."""

    def after_pass(self, index, p, result, seconds, ctx):
        ctx.history.append((p.name, result.modified, seconds))


class PrintAfter(PassInstrument):
    """Prints the layer table after the named passes (``"all"``: every pass)."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)

    def after_pass(self, index, p, result, seconds, ctx):
        if "all" in self.names or p.name in self.names:
            print(f"# after {p.name}\n{result.graph.table(only_layers=True)}")


class DumpGraph(PassInstrument):
    """Writes the graph table after every pass to ``<folder>/NN_<pass>.txt``."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def after_pass(self, index, p, result, seconds, ctx):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{index:02d}_{p.name}.txt").write_text(str(result.graph))


@dataclass
class PassContext:
    """What the passes of one compilation share.

    Attributes
    ----------
    target : sparsecc.targets.Target
        The compile target; may be None for passes that do not need one.
    options : dict
        Free-form per-compilation options.
    instruments : list of PassInstrument
        Run around every pass (a :class:`PassTiming` is always first).
    dump_dir : Path, optional
        Shorthand for a :class:`DumpGraph` instrument.
    print_after : sequence of str
        Shorthand for a :class:`PrintAfter` instrument.
    tuning_db : sparsecc.tune.lookup.TuningDatabase, optional
        Tuned schedules the lowering uses where it has them.
    history : list
        ``(pass name, modified, seconds)`` of every pass run so far.
    """

    target: Any = None
    options: dict = field(default_factory=dict)
    instruments: list = field(default_factory=list)
    dump_dir: Optional[Path] = None
    print_after: Sequence[str] = ()
    tuning_db: Any = None
    cost: Any = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.instruments = [PassTiming()] + list(self.instruments)
        if self.print_after:
            self.instruments.append(PrintAfter(self.print_after))
        if self.dump_dir is not None:
            self.instruments.append(DumpGraph(self.dump_dir))

    @property
    def cost_model(self):
        """The target's cost model (:func:`sparsecc.tune.cost_model.cost_model_for`), built on first use."""
        if self.cost is None:
            from ..tune.cost_model import cost_model_for

            self.cost = cost_model_for(self.target)
        return self.cost

    def ran(self, name: str) -> bool:
        return any(h[0] == name for h in self.history)


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` and ``requires`` (names of passes that must have run
    before), implement :meth:`run`, and may implement :meth:`ensures` (a check of what
    holds after the pass, run by the manager; torch.fx's ``PassBase.ensures``).
    Analysis passes only write ``node.meta["sparsecc"]``; rewrite passes change the
    graph or its weights.
    """

    name: str = "pass"
    requires: tuple = ()

    def run(self, graph: SparseGraph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, graph: SparseGraph) -> None:
        """Raise :class:`PassError` if what the pass promises does not hold (default: nothing promised)."""

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
            for inst in ctx.instruments:
                inst.before_pass(i, p, graph, ctx)
            t0 = time.perf_counter()
            try:
                result = p(graph, ctx)
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
            p.ensures(graph)
            seconds = time.perf_counter() - t0
            for inst in ctx.instruments:
                inst.after_pass(i, p, result, seconds, ctx)
        return graph
