"""Where sparsecc keeps what it builds, and the one kernel cache.

``$SPARSECC_CACHE_DIR`` (default ``~/.cache/sparsecc``) holds, one folder each:
``kernels/<target>/`` (built kernel libraries), ``calibration/`` (cost models),
``datasets/``, ``models/``, ``toolchains/`` and ``bench/``. Every file is written
atomically (:func:`sparsecc.fileio.atomic_path`).

:data:`KERNELS` is the single in-process kernel cache: one lock, one memo of
built kernels (keyed by what determines the code), one on-disk layout
``kernels/<target>/<name>-<digest>.so``. Every kernel family (linear, N:M,
conv, CUDA, tuned schedules, cross-built aarch64 libraries) goes through it.
It holds files and objects only; building is the caller's (targets and runtime).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

from sparsecc.fileio import verified_entry

__all__ = ["KERNELS", "KernelCache", "cache_root"]


def cache_root() -> Path:
    """``$SPARSECC_CACHE_DIR`` or ``~/.cache/sparsecc``: every cache lives below it."""
    env = os.environ.get("SPARSECC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsecc"


class KernelCache:
    """Built kernels, once per process (memo) and once per machine (shared libraries on disk)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._memo: dict = {}
        self._alive: list = []  # loaded modules: a function must not outlive its module

    def folder(self, target_dir: str = "host") -> Path:
        """``<cache_root>/kernels/<target_dir>``."""
        return cache_root() / "kernels" / target_dir

    @staticmethod
    def digest(*parts: str) -> str:
        """24 hex digits of SHA-256 over ``parts`` (kernel source, target, TVM version)."""
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def get(self, key, make: Callable[[], object]):
        """The memoized value of ``key``, made by ``make()`` once (under the cache's lock)."""
        value = self._memo.get(key)
        if value is not None:
            return value
        with self._lock:
            value = self._memo.get(key)
            if value is None:
                value = make()
                self._memo[key] = value
            return value

    def library(self, name: str, digest: str, write: Callable[[Path], None], target_dir: str = "host") -> Path:
        """Path of ``<name>-<digest>.so``, written by ``write(tmp_path)`` (atomically, with its content hash) when
        it is missing, and rebuilt with a :class:`~sparsecc.fileio.CacheWarning` when it does not match its hash.

        Raises
        ------
        OSError
            The entry is missing or damaged and the cache folder is not writable (callers keep the in-memory
            build; the damaged file is never opened).
        """
        path = self.folder(target_dir) / f"{name}-{digest}.so"
        with self._lock:  # concurrent processes never see half a file; a damaged one is rebuilt, never loaded
            return verified_entry(path, write, "kernel library", suffix=".so")

    def keep(self, module) -> None:
        """Keep a loaded library alive for the life of the process."""
        self._alive.append(module)

    def clear(self) -> None:
        """Forget the in-process kernels (the disk cache stays)."""
        with self._lock:
            self._memo.clear()


KERNELS = KernelCache()
