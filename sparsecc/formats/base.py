"""The format registry: one :class:`Format` entry per storage format, one :class:`Candidate` per choice.

Everything the pipeline asks of a format goes through its entry, the way TVM's
``@register_legalize("relax.matmul")`` or hidet's ``register_resolve_rule``
attach everything about one op to one registry key:

* what the entry itself defines (this layer, pure torch and sympy): the
  storage class and its conversion from a dense weight, the candidates it
  offers for a weight under a ``pattern=`` argument, the stored units and the
  symbolic FLOPs and bytes of one call (the cost model's inputs), a random
  weight for calibration, and the report's label;
* what the layers above attach to the same entry (they may import this module,
  never the reverse): the runtime module factory per target kind
  (:meth:`Format.register_module`, from :mod:`sparsecc.runtime`) and the export
  converter per layer kind (:meth:`Format.register_exporter`).

:func:`describe` prints where each piece of a format lives. ``docs/adding-a-format.md``
walks through adding one.

A :class:`Candidate` is a format with its parameters (``Candidate("bsr", (16, 1))``):
its :attr:`~Candidate.key` (``"bsr_16x1"``, ``"nm_2:4"``, ``"dense"``) names it in
cost-model calibrations, estimates and reports, and :meth:`Candidate.parse` reads a key
back. No other module builds or parses these strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy
import torch

from sparsecc.errors import InvalidSparsityError, UnsupportedOpError

__all__ = ["M", "Candidate", "StorageStats", "as_matrix", "from_matrix", "Format", "all_formats", "describe", "format_of", "get_format", "register_format"]

#: Batch/token dim of a linear's input (rows of X); cost expressions are in M.
M = sympy.Symbol("M", positive=True, integer=True)

#: ``pattern=`` arguments of ``compile`` / ``ChooseFormat`` and the N:M pattern each N:M name stands for.
PATTERN_CHOICES = ("auto", "unstructured", "block", "dense", "n:m", "2:4", "1:4")
NM_PATTERN_NAMES = {"n:m": (2, 4), "2:4": (2, 4), "1:4": (1, 4)}


@dataclass(frozen=True, order=True)
class Candidate:
    """A storage format with its parameters: ``Candidate("bsr", (16, 1))``, ``Candidate("nm", (2, 4))``.

    Attributes
    ----------
    format : str
        Name of a registered :class:`Format`.
    params : tuple of int
        The format's parameters: the block shape (rows, cols) for CSR/BSR, ``(n, m)`` for N:M, ``()`` for dense.
    """

    format: str
    params: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(int(p) for p in (self.params or ())))

    @property
    def entry(self) -> "Format":
        """The registered :class:`Format`."""
        return get_format(self.format)

    @property
    def key(self) -> str:
        """``"dense"``, ``"csr_1x1"``, ``"bsr_8x1"``, ``"nm_2:4"``: the name in calibrations and estimates."""
        return self.entry.key(self.params)

    @property
    def slug(self) -> str:
        """``key`` with only letters, digits and ``_`` (file and symbol names): ``"csr"``, ``"bsr_8x1"``, ``"nm_2x4"``."""
        return self.entry.slug(self.params)

    @property
    def label(self) -> str:
        """The report's format column: ``"dense"``, ``"csr"``, ``"bsr 16x1"``, ``"nm 2:4"``."""
        return self.entry.label(self.params)

    @property
    def is_dense(self) -> bool:
        return self.format == "dense"

    @classmethod
    def parse(cls, key: str) -> "Candidate":
        """``"bsr_8x1"`` -> ``Candidate("bsr", (8, 1))`` (the inverse of :attr:`key`).

        Raises
        ------
        InvalidSparsityError
            No registered format reads ``key``.
        """
        for fmt in _REGISTRY.values():
            params = fmt.parse_params(key)
            if params is not None:
                return cls(fmt.name, params)
        raise InvalidSparsityError(f"no registered format has the candidate key {key!r}")

    def kernel_name(self, kind: str, regime: str, bias: bool, activation: Optional[str], residual: bool = False) -> str:
        """Readable kernel name, e.g. ``bsr_16x1_gemm_bias_gelu`` (``kind`` "linear") or ``conv_nhwc_csr_bias_relu``."""
        prefix = "" if kind == "linear" else f"{kind}_"
        return (f"{prefix}{self.slug}" + (f"_{regime}" if regime else "") + ("_bias" if bias else "")
                + ("_res" if residual else "") + (f"_{activation}" if activation else ""))

    def to_storage(self, weight: torch.Tensor):
        """``weight`` (N, K) in this candidate's storage (the dense tensor itself for dense)."""
        return self.entry.to_storage(weight, self.params)

    def __str__(self) -> str:
        return self.key


class Format:
    """One storage format of a weight matrix W: (N, K) (convs: (C_out, kh·kw·C_in)).

    Subclasses set :attr:`name`, :attr:`storage` and :attr:`patterns` and implement the
    methods; instances are registered with :func:`register_format`.

    Attributes
    ----------
    name : str
    storage : type or None
        Storage class (``from_dense(weight, *params)``, ``to_dense()``, ``format``, ``nnz``, ``density``).
    patterns : tuple of str
        The ``pattern=`` arguments that allow this format.
    """

    name: str = ""
    storage: Optional[type] = None
    patterns: tuple = ()

    def __init__(self):
        self.modules: dict = {}     # (target kind, layer kind) -> factory(storage, bias, activation, target, **kw)
        self.exporters: dict = {}   # layer kind -> converter(block_builder, x, module, context)

    # -- what the format defines ---------------------------------------------------------------
    def key(self, params: tuple) -> str:
        return self.name if not params else f"{self.name}_" + "x".join(map(str, params))

    def slug(self, params: tuple) -> str:
        return self.key(params).replace(":", "x")

    def label(self, params: tuple) -> str:
        return self.name if not params else f"{self.name} " + "x".join(map(str, params))

    def parse_params(self, key: str) -> Optional[tuple]:
        """The params of ``key`` if this format wrote it, else None."""
        if key == self.name:
            return ()
        head, sep, tail = key.partition("_")
        if head != self.name or not sep:
            return None
        try:
            return tuple(int(v) for v in tail.replace(":", "x").split("x"))
        except ValueError:
            return None

    def candidates(self, shape: tuple, pattern: str, *, nm: Optional[tuple] = None,
                   column_group: Optional[int] = None) -> list:
        """Candidates this format offers for a weight of ``shape`` (N, K) under ``pattern``.

        ``nm``: the sparsest N:M pattern the weight satisfies (or None); ``column_group``: a
        block's columns must divide it (convs read a block's columns as consecutive input channels).
        """
        return []

    def to_storage(self, weight: torch.Tensor, params: tuple):
        return self.storage.from_dense(weight, *params)

    def stored(self, params: tuple, shape: tuple, nnz: int, fill_ratio: dict) -> int:
        """Stored units of one weight (nonzero blocks; N:M slots), the ``stored`` of the cost expressions."""
        return 0

    def units_of(self, matrix) -> int:
        """Stored units of a storage object of this format (the ``stored`` of :meth:`flops` and :meth:`bytes`)."""
        return 0

    def flops(self, params: tuple, n: int, k: int, stored: int) -> sympy.Expr:
        """Floating-point operations of one call, a sympy expression in :data:`M`."""
        raise NotImplementedError

    def bytes(self, params: tuple, n: int, k: int, stored: int) -> sympy.Expr:
        """Bytes moved by one call (weights once, X and Y once), a sympy expression in :data:`M`."""
        raise NotImplementedError

    def conv_bytes(self, params: tuple, n: int, k: int, stored: int, taps: int) -> sympy.Expr:
        """Bytes of one call as a conv ``(C_out = N, kh·kw·C_in = K)`` with ``taps = kh·kw / (s_h·s_w)`` (so that
        the input has ``M·K / taps`` elements), :data:`M` the output pixels. Default :meth:`bytes` (the implicit-im2col kernels are priced as their GEMM); a
        kernel that reads the input image once per call, not its im2col matrix, overrides it."""
        return self.bytes(params, n, k, stored)

    def weight_bytes(self, params: tuple, n: int, k: int, stored: int) -> int:
        """Bytes of the stored weight (values and indices): :meth:`bytes` without the activations (M = 0)."""
        return int(self.bytes(params, n, k, stored).subs(M, 0))

    def calibration_weight(self, params: tuple, n: int, k: int, density: float, seed: int = 0) -> torch.Tensor:
        """A random dense W: (N, K) this format stores, at ``density`` where the format has a free density."""
        raise NotImplementedError

    def calibration_candidates(self) -> list:
        """The candidates the cost model calibrates (every one :meth:`candidates` can offer)."""
        return []

    # -- what the layers above attach ---------------------------------------------------------
    def register_module(self, target_kind: str, layer_kind: str = "linear"):
        """Decorator: ``factory(storage, bias, activation, target, **kw) -> torch.nn.Module`` for a target kind."""
        def deco(factory: Callable):
            self.modules[(target_kind, layer_kind)] = factory
            return factory
        return deco

    def register_exporter(self, layer_kind: str = "linear"):
        """Decorator: the export converter of this format's runtime modules of ``layer_kind``."""
        def deco(fn: Callable):
            self.exporters[layer_kind] = fn
            return fn
        return deco

    def module_factory(self, target_kind: str, layer_kind: str = "linear") -> Callable:
        """The registered runtime module factory.

        Raises
        ------
        UnsupportedOpError
            No runtime module of this format for that target and layer kind.
        """
        try:
            return self.modules[(target_kind, layer_kind)]
        except KeyError:
            raise UnsupportedOpError(f"format {self.name!r} has no {layer_kind} kernel module for target "
                                     f"{target_kind!r}") from None

    def exporter(self, layer_kind: str = "linear") -> Callable:
        """The registered export converter.

        Raises
        ------
        UnsupportedOpError
            No export path for this format and layer kind.
        """
        try:
            return self.exporters[layer_kind]
        except KeyError:
            raise UnsupportedOpError(f"{layer_kind} layers in format {self.name!r} have no export path") from None

    def __repr__(self) -> str:
        return f"<Format {self.name!r}>"


class StorageStats:
    """``density`` and ``nbytes`` of a storage class from its fields: mixed into every storage dataclass.

    Subclasses name the field holding the stored values (``value_field``) and every stored array
    (``array_fields``); ``shape`` is (N, K).
    """

    value_field = "data"
    array_fields = ("data", "indices", "indptr")

    @property
    def density(self) -> float:
        """True nonzeros / (N * K)."""
        total = self.shape[0] * self.shape[1]
        return float((getattr(self, self.value_field) != 0).sum()) / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in self.array_fields))


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """View a weight as (C_out, K): a conv's (C_out, C_in, kh, kw) becomes (C_out, kh·kw·C_in).

    The layout pruning, the format conversion and the conv kernels share (the K index runs over
    (dh, dw, c_in), so a block of consecutive columns is consecutive input channels).
    """
    if w.dim() == 4:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.reshape(w.shape[0], -1)


def from_matrix(mat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`as_matrix` for a tensor of ``shape``."""
    if len(shape) == 4:
        c_out, c_in, kh, kw = shape
        return mat.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return mat.reshape(shape)


_REGISTRY: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry (its :attr:`Format.name` must be new).

    Raises
    ------
    InvalidSparsityError
        A format of that name is already registered.
    """
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] is not fmt:
        raise InvalidSparsityError(f"format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called ``name``.

    Raises
    ------
    InvalidSparsityError
        Unknown format (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidSparsityError(f"unknown format {name!r}; registered: {sorted(_REGISTRY)}") from None


def all_formats() -> list:
    """Registered formats in registration order (dense first)."""
    return list(_REGISTRY.values())


def format_of(matrix) -> Format:
    """The format of a storage object (its ``format`` attribute names it)."""
    return get_format(getattr(matrix, "format", "dense") if not isinstance(matrix, torch.Tensor) else "dense")


def describe(name: str) -> str:
    """Where each piece of format ``name`` lives (storage, module factories, export converters)."""
    fmt = get_format(name)

    def where(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"

    lines = [f"format {fmt.name!r} ({where(type(fmt))})",
             f"  storage: {where(fmt.storage) if fmt.storage else 'torch.Tensor'}",
             f"  patterns: {', '.join(fmt.patterns) or '-'}",
             f"  calibrated candidates: {', '.join(c.key for c in fmt.calibration_candidates()) or '-'}"]
    for (tk, lk), f in sorted(fmt.modules.items()):
        lines.append(f"  module[{tk}, {lk}]: {where(f)}")
    for lk, f in sorted(fmt.exporters.items()):
        lines.append(f"  export[{lk}]: {where(f)}")
    return "\n".join(lines)
