"""Cost models and calibration (autotuning arrives with issue #4)."""

from .cost_model import M, CostModel, KernelCalibration, bytes_expr, candidate_key, flops_expr

__all__ = ["M", "CostModel", "KernelCalibration", "bytes_expr", "candidate_key", "flops_expr"]
