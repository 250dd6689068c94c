"""The aarch64 cross toolchain, emulator and TVM runtime, fetched on first use (no system install, no root).

Everything lives under ``<cache_root>/toolchains/aarch64-<version>/``:

* ``root/``: Debian bookworm packages unpacked with ``dpkg-deb -x`` (see
  :data:`DEBIAN_PACKAGES`): the cross gcc/g++ 12 and binutils
  (``root/usr/bin/aarch64-linux-gnu-*``), the aarch64 glibc and libstdc++
  (``root/usr/aarch64-linux-gnu``, the sysroot qemu is given with ``-L``) and
  ``qemu-aarch64-static`` (user-mode emulation, statically linked, so it needs
  no host libraries).
* ``tvm/``: ``libtvm_runtime.so`` and ``libtvm_ffi.so`` taken from the aarch64
  wheels of apache-tvm / apache-tvm-ffi (:data:`WHEELS`, the versions installed
  on the host), plus the tvm-ffi C++ headers of the host wheel (header-only,
  architecture-independent) for the harness.

The whole folder is built in a temporary sibling and renamed into place, so an
interrupted fetch never leaves a half-made toolchain; concurrent processes may
both fetch, one rename wins. About 210 MB on disk after dropping the other
qemu targets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsecc.errors import ToolchainError
from sparsecc.fetch import download_wheels, fetch_debian_packages

__all__ = ["DEBIAN_PACKAGES", "TOOLCHAIN_VERSION", "WHEELS", "Toolchain", "aarch64_toolchain", "toolchain_dir"]

#: Bump when the package list or the layout changes (the cache folder is keyed by it).
TOOLCHAIN_VERSION = 1

#: Debian (bookworm) packages of the cross compiler and emulator. No dependency resolution is done: the
#: host libraries these need (libgmp10, libmpfr6, libmpc3, libisl23, libzstd1, libjansson4) come with any
#: host gcc. The sanitizer runtimes that ``libgcc-12-dev-arm64-cross`` depends on are left out.
DEBIAN_PACKAGES = (
    "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "cpp-aarch64-linux-gnu",
    "gcc-12-aarch64-linux-gnu", "g++-12-aarch64-linux-gnu", "cpp-12-aarch64-linux-gnu",
    "gcc-12-aarch64-linux-gnu-base", "gcc-12-cross-base", "binutils-aarch64-linux-gnu",
    "libgcc-12-dev-arm64-cross", "libstdc++-12-dev-arm64-cross", "libc6-dev-arm64-cross", "libc6-arm64-cross",
    "linux-libc-dev-arm64-cross", "libgcc-s1-arm64-cross", "libgomp1-arm64-cross", "libatomic1-arm64-cross",
    "libstdc++6-arm64-cross", "qemu-user-static",
)

#: Wheel platform tag of the aarch64 TVM runtime (both wheels exist for manylinux_2_28_aarch64).
WHEEL_PLATFORM = "manylinux_2_28_aarch64"


def _installed_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def wheels() -> tuple[str, str]:
    """Pins of the aarch64 wheels: the apache-tvm and apache-tvm-ffi versions installed on the host."""
    return (f"apache-tvm=={_installed_version('apache-tvm')}", f"apache-tvm-ffi=={_installed_version('apache-tvm-ffi')}")


WHEELS = wheels


@dataclass(frozen=True)
class Toolchain:
    """Paths of a fetched aarch64 toolchain.

    Attributes
    ----------
    root : Path
        Unpacked Debian packages (``usr/bin``, ``usr/aarch64-linux-gnu``, ...).
    tvm_lib : Path
        Folder with the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so``.
    tvm_include : Path
        tvm-ffi headers (``tvm/ffi/...``, ``dlpack/dlpack.h``).
    """

    root: Path
    tvm_lib: Path
    tvm_include: Path

    @property
    def gcc(self) -> Path:
        return self.root / "usr/bin/aarch64-linux-gnu-gcc"

    @property
    def gxx(self) -> Path:
        return self.root / "usr/bin/aarch64-linux-gnu-g++"

    @property
    def objdump(self) -> Path:
        return self.root / "usr/bin/aarch64-linux-gnu-objdump"

    @property
    def qemu(self) -> Path:
        return self.root / "usr/bin/qemu-aarch64-static"

    @property
    def sysroot(self) -> Path:
        """The aarch64 glibc/libstdc++ folder qemu resolves the dynamic loader in (``-L``)."""
        return self.root / "usr/aarch64-linux-gnu"

    def env(self) -> dict:
        """Environment for the cross tools: the unpacked binutils need their own libbfd/libopcodes."""
        env = dict(os.environ)
        lib = str(self.root / "usr/lib/x86_64-linux-gnu")
        env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        return env

    def compile(self, args: list, what: str, cxx: bool = False, timeout: float = 600) -> None:
        """Run the cross gcc/g++ with ``--sysroot`` and ``args``.

        Raises
        ------
        ToolchainError
            The compiler failed; the message names ``what`` and gives its stderr.
        """
        cmd = [str(self.gxx if cxx else self.gcc), f"--sysroot={self.root}", *map(str, args)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if r.returncode != 0:
            raise ToolchainError(f"aarch64 cross compile of {what} failed (exit {r.returncode}): "
                                 f"{r.stderr.strip()[-2000:]}")

    def fcompile(self):
        """An ``export_library`` compile function linking TVM's objects into an aarch64 shared library."""
        def fcompile(output, objects, options=None):
            objs = [objects] if isinstance(objects, str) else list(objects)
            self.compile(["-shared", "-fPIC", "-o", output, *objs, *(options or [])], f"shared library {output}")

        fcompile.output_format = "so"
        return fcompile


def toolchain_dir() -> Path:
    """``<cache_root>/toolchains/aarch64-v<TOOLCHAIN_VERSION>-tvm<version>``."""
    from sparsecc.cache import cache_root

    return cache_root() / "toolchains" / f"aarch64-v{TOOLCHAIN_VERSION}-tvm{_installed_version('apache-tvm')}"


_LOCK = threading.Lock()
_TOOLCHAIN: Toolchain | None = None


def _toolchain_at(d: Path) -> Toolchain:
    return Toolchain(root=d / "root", tvm_lib=d / "tvm/lib", tvm_include=d / "tvm/include")


def _complete(tc: Toolchain) -> bool:
    return all(p.exists() for p in (tc.gcc, tc.gxx, tc.qemu, tc.sysroot / "lib/libc.so.6",
                                    tc.tvm_lib / "libtvm_runtime.so", tc.tvm_lib / "libtvm_ffi.so",
                                    tc.tvm_include / "tvm/ffi/function.h"))


def _extract_wheel_members(whl: Path, wanted: dict, out: Path) -> None:
    """Copy the wheel members named in ``wanted`` (member -> file name) into ``out``."""
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        for member, fname in wanted.items():
            if member not in names:
                raise ToolchainError(f"wheel {whl.name} has no {member}")
            with z.open(member) as src, open(out / fname, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        tc = _toolchain_at(tmp)
        fetch_debian_packages(DEBIAN_PACKAGES, tc.root, ToolchainError)
        for q in (tc.root / "usr/bin").glob("qemu-*"):  # keep aarch64 only (the package holds ~35 targets)
            if q.name != "qemu-aarch64-static":
                q.unlink()
        shutil.rmtree(tc.root / "usr/share/doc", ignore_errors=True)
        shutil.rmtree(tc.root / "usr/share/man", ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="sparsecc-whl-") as wdir:
            whls = download_wheels(WHEELS(), Path(wdir), platform=WHEEL_PLATFORM, python_version="3.11")
            tc.tvm_lib.mkdir(parents=True)
            tvm_whl = [w for w in whls if w.name.startswith("apache_tvm-")]
            ffi_whl = [w for w in whls if w.name.startswith("apache_tvm_ffi-")]
            if not tvm_whl or not ffi_whl:
                raise ToolchainError(f"pip download returned {[w.name for w in whls]}, expected both TVM wheels")
            _extract_wheel_members(tvm_whl[0], {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so"}, tc.tvm_lib)
            _extract_wheel_members(ffi_whl[0], {"tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}, tc.tvm_lib)
        import tvm_ffi

        shutil.copytree(Path(tvm_ffi.__file__).parent / "include", tc.tvm_include)
        if not _complete(tc):
            raise ToolchainError(f"the fetched aarch64 toolchain in {tmp} is incomplete")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _complete(_toolchain_at(dest)):  # another process won the rename with a complete one?
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def aarch64_toolchain() -> Toolchain:
    """The aarch64 toolchain, fetched into :func:`toolchain_dir` on first use (~120 MB download, ~20 s).

    Raises
    ------
    ToolchainError
        ``apt-get download`` or ``pip download`` failed (no network, no package index), or the fetched
        files are incomplete. The message names the failing package.
    """
    global _TOOLCHAIN
    with _LOCK:
        if _TOOLCHAIN is not None:
            return _TOOLCHAIN
        d = toolchain_dir()
        tc = _toolchain_at(d)
        if not _complete(tc):
            if d.exists():
                shutil.rmtree(d)  # an incomplete folder from an older layout
            _build(d)
        _TOOLCHAIN = tc
        return tc
