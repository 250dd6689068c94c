"""Run the parallel loops of TVM kernels on torch's OpenMP threads.

A TVM kernel's ``T.parallel`` loop calls ``TVMBackendParallelLaunch`` through the
function pointer ``__TVMBackendParallelLaunch`` of its shared library, which TVM
points at its own thread pool when the library is loaded. Next to torch that pool
fights torch's OpenMP workers: after every torch op (layer norm, attention, ...)
libgomp's workers spin for a while (``GOMP_SPINCOUNT``, milliseconds), so the TVM
worker of the next sparse kernel waits for a core and the kernel runs at about
single-core speed (measured in MiniLM: a 0.55 ms kernel took 0.7-0.85 ms right
after a layer norm; a layer norm interleaved with TVM kernels took ms instead of
0.34 ms on a loaded machine).

:func:`patch_module` repoints that function pointer to a 15-line launcher,
compiled once with the system C compiler against the process's libgomp (the one
torch loaded): ``#pragma omp parallel`` hands each OpenMP thread one TVM task.
The kernels then share torch's thread pool (and its already-spinning workers),
the same thing TVM's own ``USE_OPENMP=gnu`` build does, and they follow
``torch.set_num_threads``.

Default since it was measured on a quiet machine (2-core Zen 4, 2 threads, medians of
interleaved runs in one process each, ``SPARSECC_PARALLEL=tvm`` vs default):
``python examples/minilm.py --runs 10 --threads 2`` (MiniLM, 90% in 16x1 blocks) went
from 2.41x / 2.82x to 3.17x / 4.38x of torch dense at batch 1 / 8, and
``python benchmarks/conv.py --threads 2 --runs 20`` (ResNet-18-like at 80%, batch 1,
224x224) from 1.71x to 2.82x. ``SPARSECC_PARALLEL=tvm`` (read when a kernel is loaded)
keeps TVM's own pool (with ``TVM_THREAD_POOL_SPIN_COUNT=0``), which holds up better on a
machine loaded by other processes: there libgomp's barriers stall for whole scheduler
time slices when one of its threads is preempted, which hit the kernels as hard as
torch's own ops (MiniLM batch 8 went 522 ms -> 1000 ms, while torch dense took 1070 ms).
No C compiler: TVM's pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["enabled", "launcher_address", "patch_module"]

_SOURCE = r"""
#include <omp.h>
typedef struct { void* sync_handle; int num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

int sparsecc_omp_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : omp_get_max_threads();
  if (n <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return flambda(0, &env, cdata);
  }
  int err = 0;
#pragma omp parallel num_threads(n) reduction(| : err)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    err |= flambda(omp_get_thread_num(), &env, cdata);
  }
  return err;
}
"""

_LOCK = threading.Lock()
_ADDR: int | None = None
_FAILED = False
_LIB = None  # kept alive for the life of the process


def _build(path: Path) -> None:
    """Compile the launcher into ``path`` (a temporary file of :func:`sparsecc.fileio.write_verified`)."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise OSError("no C compiler")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "launch.c"
        src.write_text(_SOURCE)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-fopenmp", str(src), "-o", str(path)],
                       check=True, capture_output=True, timeout=60)


def launcher_address() -> int | None:
    """Address of the OpenMP launcher (built on first use), or None when it cannot be had."""
    global _ADDR, _FAILED, _LIB
    if _ADDR is not None or _FAILED:
        return _ADDR
    with _LOCK:
        if _ADDR is not None or _FAILED:
            return _ADDR
        try:
            import torch  # noqa: F401 - torch's libgomp must be the one loaded (same soname)

            from sparsecc.cache import cache_root
            from sparsecc.fileio import verified_entry

            digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
            path = cache_root() / "runtime" / f"omp_launch-{digest}.so"
            path = verified_entry(path, _build, "runtime helper library", suffix=".so")  # never a damaged one
            _LIB = ctypes.CDLL(str(path))
            _ADDR = ctypes.cast(_LIB.sparsecc_omp_parallel_launch, ctypes.c_void_p).value
        except (OSError, subprocess.SubprocessError, AttributeError):
            _FAILED = True
            return None
        return _ADDR


def enabled() -> bool:
    """Whether kernels run their parallel loops on torch's OpenMP pool (default; ``SPARSECC_PARALLEL=tvm``: TVM's pool)."""
    return os.environ.get("SPARSECC_PARALLEL", "omp").lower() != "tvm"


def patch_module(so_path: str) -> bool:
    """Point the parallel launch of the loaded kernel library ``so_path`` at torch's OpenMP pool.

    Call after ``tvm.runtime.load_module(so_path)`` (which sets the pointer to TVM's pool).
    Returns False (TVM's pool stays) when the launcher or the symbol is missing.
    """
    addr = launcher_address()
    if addr is None:
        return False
    try:
        lib = ctypes.CDLL(so_path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY) if hasattr(os, "RTLD_NOLOAD") \
            else ctypes.CDLL(so_path)
        slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
    except (OSError, ValueError):
        return False
    slot.value = addr
    return True
