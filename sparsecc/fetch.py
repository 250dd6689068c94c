"""Fetch Debian packages and registry wheels without a system install (no root needed).

Used by :mod:`sparsecc.datasets` (Fashion-MNIST, fortunes) and by the aarch64
toolchain of :mod:`sparsecc.targets.toolchain` (cross gcc, qemu-user-static,
the aarch64 TVM runtime libraries).

* :func:`fetch_debian_packages` -- ``apt-get download`` the ``.deb`` files into a
  temporary folder and unpack their data archives into a destination folder
  (``dpkg-deb -x``, or a pure-Python reader of the ``ar`` + ``tar`` container).
* :func:`download_wheels` -- ``pip download --only-binary=:all: --platform ...``
  of exact pinned versions (the registry's ordinary client).

Errors are raised as the ``error`` class the caller passes (a
:class:`~sparsecc.errors.SparseccError` subclass naming the package).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from sparsecc.errors import SparseccError, ToolchainError

__all__ = ["download_wheels", "extract_deb", "fetch_debian_packages"]


def extract_deb(deb: Path, dest: Path, error: type[SparseccError] = ToolchainError) -> None:
    """Unpack the data archive of a ``.deb`` into ``dest`` (``dpkg-deb -x``, or a pure-Python fallback).

    Raises
    ------
    error
        ``dpkg-deb`` failed, or the file is not a Debian package (message names the file).
    """
    deb, dest = Path(deb), Path(dest)
    if shutil.which("dpkg-deb"):
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise error(f"dpkg-deb -x {deb.name} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        return
    # A .deb is an ar archive holding debian-binary, control.tar.* and data.tar.*.
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise error(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode("ascii", "replace").strip().rstrip("/")
        size = int(raw[pos + 48:pos + 58].decode("ascii").strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    tar.extractall(dest, filter="data")
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise error(f"cannot unpack {name} of {deb} without dpkg-deb: {e}") from e
            return
        pos += 60 + size + (size & 1)
    raise error(f"{deb} has no data.tar member")


def fetch_debian_packages(packages: Iterable[str], dest: Path, error: type[SparseccError] = ToolchainError,
                          timeout: float = 900) -> list[str]:
    """``apt-get download <packages...>`` into a temporary folder and unpack every one into ``dest``.

    Parameters
    ----------
    packages : iterable of str
        Debian package names (exact; no dependency resolution is done).
    dest : Path
        Folder the packages' files are unpacked into (``dest/usr/...``).
    error : SparseccError subclass
        Raised on failure, naming the package(s).
    timeout : float
        Seconds allowed for the download.

    Returns
    -------
    list of str
        The ``.deb`` file names unpacked (they carry the package versions).
    """
    packages = list(packages)
    if shutil.which("apt-get") is None:
        raise error(f"cannot fetch the Debian package(s) {packages}: apt-get is not available on this machine")
    with tempfile.TemporaryDirectory(prefix="sparsecc-deb-") as tmp:
        try:
            r = subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=False, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise error(f"apt-get download {' '.join(packages)} timed out after {e.timeout:.0f} s") from e
        debs = sorted(Path(tmp).glob("*.deb"))
        missing = [p for p in packages if not any(d.name.startswith(p.replace(":", "%3a") + "_") for d in debs)]
        if r.returncode != 0 or missing:
            raise error(
                f"apt-get download {' '.join(missing or packages)} failed (exit {r.returncode}); is the package "
                f"index up to date ('apt-get update') and the network reachable? stderr: {r.stderr.strip()[-500:]}")
        for d in debs:
            extract_deb(d, dest, error)
        return [d.name for d in debs]


def download_wheels(requirements: Iterable[str], dest: Path, *, platform: str, python_version: str,
                    error: type[SparseccError] = ToolchainError, timeout: float = 900) -> list[Path]:
    """``pip download --only-binary=:all: --no-deps`` pinned wheels for a foreign platform into ``dest``.

    Parameters
    ----------
    requirements : iterable of str
        Exact pins, e.g. ``"apache-tvm==0.27.0.post1"``.
    platform : str
        A wheel platform tag, e.g. ``"manylinux_2_28_aarch64"``.
    python_version : str
        e.g. ``"3.11"``.

    Returns
    -------
    list of Path
        The downloaded ``.whl`` files.
    """
    requirements = list(requirements)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--platform", platform,
           "--python-version", python_version, "--dest", str(dest), "--quiet", *requirements]
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise error(f"pip download {' '.join(requirements)} timed out after {e.timeout:.0f} s") from e
    if r.returncode != 0:
        raise error(f"pip download {' '.join(requirements)} for {platform} failed (exit {r.returncode}): "
                    f"{(r.stderr or r.stdout).strip()[-800:]}")
    return sorted(dest.glob("*.whl"))
