"""TensorIR kernel templates (one per sparse format); schedules live in ``sparsecc.targets``."""

from sparsecc.codegen.linear import (
    ACTIVATIONS,
    BLOCK_NAMES,
    bsr_linear,
    csr_linear,
    data_layout_for,
    linear_template,
)

__all__ = ["ACTIVATIONS", "BLOCK_NAMES", "bsr_linear", "csr_linear", "data_layout_for", "linear_template"]
