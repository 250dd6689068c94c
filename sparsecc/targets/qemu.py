"""Run aarch64 TVM artifacts under ``qemu-aarch64`` user-mode emulation.

:func:`run_under_qemu` writes the input tensors to a file, runs the harness
(``arm_harness.cc``, cross-compiled with the fetched g++ on first use and cached
next to the toolchain) under ``qemu-aarch64-static -L <aarch64 sysroot>``, and
reads the results back. The harness links the aarch64 ``libtvm_runtime.so`` /
``libtvm_ffi.so`` of the registry wheels, so it loads the same artifact a user
copies to a board.

Timings measured under qemu are emulation times (TCG translates every NEON
instruction into host code): useful to compare kernels with each other under
the same emulator, never as a prediction of a real core's latency.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sparsecc.errors import ToolchainError
from sparsecc.fileio import atomic_path
from sparsecc.targets.toolchain import Toolchain, aarch64_toolchain

__all__ = ["RPC_SESSION_SRC", "build_harness", "read_tensors", "run_under_qemu", "write_tensors"]

_MAGIC = b"SPCCTEN1"
# DLDataTypeCode: 0 int, 1 uint, 2 float.
_DTYPES = {np.dtype("float32"): (2, 32), np.dtype("float64"): (2, 64), np.dtype("int32"): (0, 32),
           np.dtype("int64"): (0, 64), np.dtype("int16"): (0, 16), np.dtype("int8"): (0, 8),
           np.dtype("uint8"): (1, 8), np.dtype("uint16"): (1, 16), np.dtype("uint32"): (1, 32),
           np.dtype("bool"): (1, 1)}
_CODES = {v: k for k, v in _DTYPES.items()}
_HARNESS_SRC = Path(__file__).with_name("arm_harness.cc")
#: One TVM RPC session (``rpc.ServerLoop`` on a connected socket), served by :mod:`sparsecc.targets.qemu_rpc`.
RPC_SESSION_SRC = Path(__file__).with_name("arm_rpc_session.cc")


def _as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().cpu().numpy()
    a = np.asarray(t)
    return a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray would turn 0-d into 1-d


def write_tensors(path, tensors) -> None:
    """Write numpy arrays / torch tensors in the harness's format (see ``arm_harness.cc``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack("<I", len(tensors)))
        for t in tensors:
            a = _as_numpy(t)
            if a.dtype not in _DTYPES:
                raise ToolchainError(f"dtype {a.dtype} cannot be passed to the aarch64 harness")
            code, bits = _DTYPES[a.dtype]
            f.write(struct.pack("<BBHI", code, bits, 1, a.ndim))
            f.write(struct.pack(f"<{a.ndim}q", *a.shape))
            f.write(struct.pack("<Q", a.nbytes))
            f.write(a.tobytes())


def read_tensors(path) -> list:
    """Read a tensor file of the harness's format into numpy arrays.

    Raises
    ------
    ToolchainError
        Bad magic, truncated file or an unknown dtype (the message names the file).
    """
    raw = Path(path).read_bytes()
    if raw[:8] != _MAGIC:
        raise ToolchainError(f"{path} is not a sparsecc tensor file (bad magic)")
    (count,), pos, out = struct.unpack_from("<I", raw, 8), 12, []
    try:
        for _ in range(count):
            code, bits, lanes, ndim = struct.unpack_from("<BBHI", raw, pos)
            pos += 8
            shape = struct.unpack_from(f"<{ndim}q", raw, pos)
            pos += 8 * ndim
            (nbytes,) = struct.unpack_from("<Q", raw, pos)
            pos += 8
            dt = _CODES.get((code, bits))
            if dt is None or lanes != 1:
                raise ToolchainError(f"{path}: unsupported dtype code={code} bits={bits} lanes={lanes}")
            if pos + nbytes > len(raw):
                raise ToolchainError(f"{path} is truncated")
            out.append(np.frombuffer(raw, dtype=dt, count=int(np.prod(shape, dtype=np.int64)), offset=pos)
                       .reshape(shape).copy())
            pos += nbytes
    except struct.error as e:
        raise ToolchainError(f"{path} is truncated: {e}") from e
    return out


def build_harness(tc: Toolchain | None = None, source: Path = _HARNESS_SRC) -> Path:
    """An aarch64 executable linked with the TVM runtime, cross-compiled on first use (~10 s), cached by source hash.

    Parameters
    ----------
    tc : Toolchain, optional
    source : Path
        ``arm_harness.cc`` (default: runs a library on tensor files) or :data:`RPC_SESSION_SRC`.
    """
    tc = tc or aarch64_toolchain()
    source = Path(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    exe = tc.root.parent / f"{'harness' if source == _HARNESS_SRC else source.stem}-{digest}"
    if exe.exists():
        return exe
    with atomic_path(exe, suffix=".bin") as tmp:
        tc.compile(["-std=c++17", "-O2", str(source), "-o", str(tmp), f"-I{tc.tvm_include}",
                    f"-L{tc.tvm_lib}", f"-Wl,-rpath,{tc.tvm_lib}", "-Wl,--no-as-needed", "-ltvm_runtime",
                    "-ltvm_ffi", "-Wl,--as-needed", "-ldl", "-lpthread"], f"the aarch64 program {source.name}",
                   cxx=True)
        tmp.chmod(0o755)
    return exe


def run_under_qemu(lib, inputs, *, function: str = "main", mode: str = "call", repeat: int = 1,
                   extra_inputs: tuple = (), timeout: float = 600, threads: int | None = None):
    """Run ``function`` of the aarch64 library ``lib`` under qemu-aarch64 on ``inputs``.

    Parameters
    ----------
    lib : path
        An aarch64 shared library exported by TVM (a kernel, or a Relax VM executable for ``mode="vm"``).
    inputs : sequence of numpy arrays / torch tensors
        Arguments in order. For ``mode="call"`` (destination-passing kernels) include the output buffers.
    function : str
        Function name (``"main"``).
    mode : {"call", "vm"}
        ``"call"``: returns every argument after the call (outputs written in place);
        ``"vm"``: load as a Relax VM executable and return the result tensors (a tuple flattened).
    repeat : int
        Runs of the call; with ``repeat > 1`` the median time (ms, under emulation) is returned.
    extra_inputs : sequence of paths
        Tensor files appended to the arguments (e.g. an exported ``params.bin``).
    threads : int, optional
        ``TVM_NUM_THREADS`` inside the emulated process (default: TVM's choice).

    Returns
    -------
    outputs : list of numpy.ndarray
    time_ms : float or None
        Median emulated wall time of one call when ``repeat > 1``.

    Raises
    ------
    ToolchainError
        The toolchain could not be fetched, or the harness failed (message with its stderr).
    """
    tc = aarch64_toolchain()
    exe = build_harness(tc)
    with tempfile.TemporaryDirectory(prefix="sparsecc-qemu-") as tmp:
        inp, out = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_tensors(inp, list(inputs))
        cmd = [str(tc.qemu), "-L", str(tc.sysroot)]
        if threads is not None:
            cmd += ["-E", f"TVM_NUM_THREADS={int(threads)}"]
        cmd += [str(exe), mode, str(Path(lib).resolve()), function, str(out), str(int(repeat)), str(inp),
                *map(str, extra_inputs)]
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ToolchainError(f"qemu-aarch64 run of {lib} timed out after {e.timeout:.0f} s") from e
        if r.returncode != 0:
            raise ToolchainError(f"qemu-aarch64 run of {lib} ({mode} {function}) failed (exit {r.returncode}): "
                                 f"{(r.stderr or r.stdout).strip()[-2000:]}")
        outs = read_tensors(out)
    t = None
    for line in r.stdout.splitlines():
        if line.startswith("time_ms "):
            t = float(line.split()[1])
    return outs, t
