"""Compile targets: ``CompileTarget`` (cost model, kernel factory) and per-target schedule rules and builds."""

from sparsecc.targets.base import CompileTarget, resolve_target
from sparsecc.targets.x86 import build, host_target, num_threads, regime_for, schedule_linear

__all__ = ["CompileTarget", "resolve_target", "build", "host_target", "num_threads", "regime_for",
           "schedule_linear"]
