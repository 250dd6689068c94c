"""Runtime: the torch-facing kernel modules, the compiled module, export and load.

Importing this package registers every kernel module and export converter on its format's
registry entry (:mod:`sparsecc.formats`).
"""

from sparsecc.runtime import conv, cuda_kernels, kernels, nm, xcsr  # noqa: F401 - registration
from sparsecc.runtime.modules import finish, make_conv, make_linear

__all__ = ["finish", "make_conv", "make_linear"]
