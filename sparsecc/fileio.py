"""Atomic file writes for every cache sparsecc keeps (kernels, calibrations, datasets, weights, tables)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


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
