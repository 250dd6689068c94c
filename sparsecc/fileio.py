"""Atomic file writes for every cache sparsecc keeps (kernels, calibrations, datasets, weights, tables), and
content hashes for the entries that are loaded into the process (shared libraries): a truncated or damaged
``.so`` would crash ``dlopen`` or the first call (a bus error), so it is checked before it is opened."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from sparsecc.errors import CacheWarning

__all__ = ["CacheWarning", "atomic_path", "file_digest", "verified", "verified_entry", "write_verified"]



@contextmanager
def atomic_path(path: Union[str, Path], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path``; on success it replaces ``path`` atomically, on error it is deleted.

    An interrupted or failed write therefore never leaves a half-written ``path``, and
    concurrent processes see either the old file or the new one.

    >>> with atomic_path(cache / "table.json") as tmp:
    ...     tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_verified(path: Union[str, Path], write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Write ``path`` atomically with ``write(tmp)`` and record its content hash beside it (``<path>.sha256``).

    The hash goes in first: a reader that finds the new hash with the old file (or the reverse) sees a
    mismatch and rebuilds; it never opens a file that does not match its hash.
    """
    path = Path(path)
    with atomic_path(path, suffix=suffix) as tmp:
        write(tmp)
        digest = file_digest(tmp)
        with atomic_path(_sidecar(path)) as side:
            side.write_text(digest + "\n")
    return path


def verified(path: Union[str, Path]) -> tuple:
    """``(ok, why)``: whether ``path`` exists and matches the content hash recorded by :func:`write_verified`."""
    path = Path(path)
    try:
        want = _sidecar(path).read_text().strip()
    except FileNotFoundError:
        return False, "no content hash beside it"
    except OSError as e:
        return False, f"its content hash is unreadable ({e})"
    try:
        got = file_digest(path)
    except OSError as e:
        return False, f"it is unreadable ({e})"
    return (True, "") if got == want else (False, "its bytes do not match its content hash (truncated or damaged)")


def verified_entry(path: Union[str, Path], write: Callable[[Path], None], what: str = "cache entry",
                   suffix: str = ".tmp") -> Path:
    """``path``, written by :func:`write_verified` when missing, and rewritten (with a :class:`CacheWarning`)
    when it exists but fails :func:`verified`.

    Raises
    ------
    OSError
        The entry is missing or damaged and the cache folder cannot be written (a read-only cache): the caller
        keeps an in-memory build and never opens the damaged file.
    """
    path = Path(path)
    if path.exists():
        ok, why = verified(path)
        if ok:
            return path
        warnings.warn(f"{what} {path}: {why}; rebuilding it", CacheWarning, stacklevel=3)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return write_verified(path, write, suffix=suffix)
