"""Runtime: the torch-facing kernel modules, the compiled module, export, and the torch-free loader.

``sparsecc.runtime.load`` (:mod:`sparsecc.runtime.deploy`) runs an exported artifact with the TVM runtime and
numpy only: importing this package imports neither torch nor TVM.

The kernel modules and export converters are registered on their format's registry entry
(:mod:`sparsecc.formats`) by :func:`register_kernels`, which runs when :mod:`sparsecc.runtime.modules` (the
module factories) or :mod:`sparsecc.runtime.export` is imported, or when ``finish`` / ``make_conv`` /
``make_linear`` is first read from this package.
"""

import importlib as _importlib
import sys as _sys
import types as _types

__all__ = ["finish", "load", "make_conv", "make_linear", "register_kernels"]

_REGISTERED = False


def register_kernels() -> None:
    """Import the kernel modules so that every format's runtime modules and export converters are registered
    (idempotent; imports torch and TVM)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from sparsecc.runtime import conv, cuda_kernels, dense, kernels, nm, xcsr  # noqa: F401 - registration


def load(path, threads=None):
    """Load a host artifact folder written by ``cm.export(path)``: :func:`sparsecc.runtime.deploy.load`
    (torch-free)."""
    from sparsecc.runtime.deploy import load as _load

    return _load(path, threads=threads)


class _RuntimePackage(_types.ModuleType):
    """Runs :func:`register_kernels` once the module factories (``sparsecc.runtime.modules``) are bound here,
    so that ``from sparsecc.runtime.modules import make_linear`` finds the registered modules."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "modules" and isinstance(value, _types.ModuleType):
            register_kernels()


_sys.modules[__name__].__class__ = _RuntimePackage


def __getattr__(name):
    if name in ("finish", "make_conv", "make_linear"):
        modules = _importlib.import_module("sparsecc.runtime.modules")
        register_kernels()
        return getattr(modules, name)
    if not name.startswith("_"):
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
