"""Per-target schedule rules and builds (one module per target)."""

from sparsecc.targets.x86 import build, host_target, num_threads, regime_for, schedule_linear

__all__ = ["build", "host_target", "num_threads", "regime_for", "schedule_linear"]
