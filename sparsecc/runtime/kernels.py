"""Compiled sparse linear kernels: in-process + on-disk cache, and the torch-facing module.

``get_linear_kernel(block, regime, bias, activation)`` returns a TVM packed
function built once per process (and once per machine: the shared library is
kept under ``$SPARSECC_CACHE_DIR`` or ``~/.cache/sparsecc/kernels``, keyed by a
hash of the scheduled TVMScript, the target and the TVM version).

:class:`SparseLinear` holds the converted weight and calls the kernel on torch
tensors directly (DLPack, zero copy).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

# TVM's pool workers spin after each parallel kernel and steal the cores from torch's
# OpenMP threads (measured: torch dense 4 ms -> 24 ms when alternating). Sleep at once.
# Read when TVM's thread pool starts (first parallel kernel), so set it before any runs.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import torch

from sparsecc.errors import InputDtypeError, InputShapeError, UnsupportedOpError
from sparsecc.fileio import atomic_path
from sparsecc.formats import BlockSparseMatrix
from sparsecc.runtime import omp_launch

__all__ = ["SparseLinear", "cache_dir", "clear_memory_cache", "get_linear_kernel", "kernel_name", "load_or_build"]

_ALIGN = 64
_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
# Kept alive for the life of the process: a function must not outlive its module.
_MODULES: list[object] = []


def cache_root() -> Path:
    """``$SPARSECC_CACHE_DIR`` or ``~/.cache/sparsecc``: kernels and calibrations live below it."""
    env = os.environ.get("SPARSECC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsecc"


def cache_dir() -> Path:
    """Folder of the built kernels (``<cache_root>/kernels``)."""
    return cache_root() / "kernels"


def clear_memory_cache() -> None:
    """Forget the in-process kernels (the disk cache stays)."""
    with _LOCK:
        _CACHE.clear()


def kernel_name(block: tuple[int, int], regime: str, bias: bool, activation: str | None) -> str:
    br, bc = block
    fmt = "csr" if (br, bc) == (1, 1) else f"bsr_{br}x{bc}"
    return f"{fmt}_{regime}" + ("_bias" if bias else "") + (f"_{activation}" if activation else "")


def _target_key(target) -> str:
    return str(dict(target.export())) if hasattr(target, "export") else str(target)


def get_linear_kernel(fmt_block: tuple[int, int], regime: str, bias: bool, activation: str | None = None,
                      target=None, params=None, k: int | None = None):
    """A compiled ``Y = act(X W^T + b)`` kernel for ``fmt_block`` ((1, 1) = CSR) and ``regime``.

    Arguments of the returned function: ``X (M, K)``, ``data (nnzb, br, bc)``,
    ``indices``, ``indptr``, [``bias (N // br, br)``], ``Y (M, N // br, br)``, all
    64-byte aligned and contiguous (the generated code does not check alignment).
    ``M`` must be a multiple of the schedule's ``m_tile`` (see :func:`m_tile_for`).
    ``k`` builds for a static K (one build per distinct K; faster addressing).
    """

    from sparsecc.targets import x86

    block = (int(fmt_block[0]), int(fmt_block[1]))
    check_activation(activation)
    target = target or x86.host_target()
    key = (block, regime, bool(bias), activation, _target_key(target), params, k)
    fn = _CACHE.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _CACHE.get(key)
        if fn is not None:
            return fn
        sch = x86.schedule_linear(block, regime, bias=bool(bias), activation=activation, target=target,
                                  params=params, k=k)
        fn = load_or_build(sch, kernel_name(block, regime, bool(bias), activation), target)
        _CACHE[key] = fn
        return fn


def load_or_build(sch, name: str, target, build=None):
    """Packed function ``main`` of scheduled module ``sch``, from the disk cache or built now.

    The shared library is kept under :func:`cache_dir` as ``<name>-<digest>.so``,
    the digest hashing the scheduled TVMScript, the target and the TVM version,
    so a kernel is built once per machine. Every kernel family (linear, N:M,
    conv, tuned schedules) goes through here.

    Parameters
    ----------
    sch : tvm.s_tir.Schedule or tvm.IRModule
        The scheduled kernel (a module whose function is ``main``).
    name : str
        Readable prefix of the cache file, e.g. ``"bsr_16x1_gemm_bias"``.
    target : tvm.target.Target
    build : callable (mod, target) -> module, optional
        Builder; default ``sparsecc.targets.x86.build``.

    Raises
    ------
    KernelBuildError
        The TVM build failed.
    """
    import tvm

    from sparsecc.targets import x86

    mod_ir = sch.mod if hasattr(sch, "mod") else sch
    text = mod_ir.script()
    digest = hashlib.sha256("\n".join([text, _target_key(target), tvm.__version__]).encode()).hexdigest()[:24]
    path = cache_dir() / f"{name}-{digest}.so"
    mod = lib_in_memory = None
    if path.exists():
        try:
            mod = tvm.runtime.load_module(str(path))
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            mod = None
    if mod is None:
        lib = (build or x86.build)(mod_ir, target)
        try:
            with atomic_path(path, suffix=".so") as tmp:  # concurrent processes never see half a file
                lib.export_library(str(tmp))
            mod = tvm.runtime.load_module(str(path))
        except OSError:
            mod = lib_in_memory = lib  # read-only cache directory: keep the in-memory build
    if mod is not lib_in_memory and omp_launch.enabled():
        omp_launch.patch_module(str(path))  # parallel loops on torch's OpenMP threads
    _MODULES.append(mod)
    return mod["main"]


def m_tile_for(block: tuple[int, int], regime: str) -> int:
    """Rows of X one kernel instance handles; the kernel needs M to be a multiple of it."""
    from sparsecc.targets import x86

    return x86.default_params(tuple(block), regime).m_tile


def check_activation(activation) -> None:
    """Raise :class:`UnsupportedOpError` unless ``activation`` is an epilogue the linear kernels fuse (None, relu, gelu)."""
    if activation not in (None, "relu", "gelu"):
        raise UnsupportedOpError(f"activation {activation!r} is not supported; expected None, 'relu' or 'gelu'")


def rows_of(x, k: int) -> tuple:
    """Check a linear's input x: (..., K) float32 on the CPU; return (leading shape, x as (M, K)).

    The leading dims (batch, sequence, ...) share the weight, so they are folded into
    the M rows of one kernel call.

    Raises
    ------
    InputDtypeError
        Not a float32 CPU tensor.
    InputShapeError
        Last dim is not ``k``.
    """
    if not isinstance(x, torch.Tensor):
        raise InputDtypeError(f"expected a float32 tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise InputDtypeError(f"expected input dtype torch.float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise InputShapeError(f"expected input of shape (..., {k}), got {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise InputDtypeError(f"expected a CPU tensor, got device {x.device}")
    return tuple(x.shape[:-1]), x.reshape(-1, k)


def _aligned_empty(shape, dtype=torch.float32) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    esize = torch.empty((), dtype=dtype).element_size()
    pad = _ALIGN // esize
    raw = torch.empty(numel + pad, dtype=dtype)
    off = (-raw.data_ptr() % _ALIGN) // esize
    return raw[off:off + numel].view(*shape)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 64-byte aligned, else an aligned contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % _ALIGN == 0:
        return t
    out = _aligned_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


class SparseLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` with ``W`` block-sparse, run by a TVM kernel.

    The weight is converted and aligned once here; ``forward`` only reshapes ``x``
    (copying it only when it is not contiguous or not 64-byte aligned).
    """

    def __init__(self, matrix: BlockSparseMatrix, bias: torch.Tensor | None = None,
                 activation: str | None = None, target=None, eager: bool = False, tuned=None):
        super().__init__()
        # tuned: sparsecc.tune.autotune.TunedKernels of this layer (kernel(regime, m) -> (fn, m_tile)
        # or None for the hand schedule), from compile(..., tuning_db=...)
        self.tuned = tuned
        check_activation(activation)
        n, k = matrix.shape
        br, bc = matrix.block
        self.shape = (n, k)
        self.block = (br, bc)
        self.format = matrix.format
        self.density = matrix.density
        self.activation = activation
        self.target = target
        data, indices = matrix.data.detach().to(torch.float32), matrix.indices.to(torch.int32)
        if data.shape[0] == 0:  # nnzb == 0: TVM refuses empty tensors' strides; indptr keeps it unread
            data, indices = torch.zeros(1, br, bc), torch.zeros(1, dtype=torch.int32)
        self.register_buffer("data", _aligned(data.contiguous()))
        self.register_buffer("indices", _aligned(indices.contiguous()))
        self.register_buffer("indptr", _aligned(matrix.indptr.to(torch.int32).contiguous()))
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise InputShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            self.register_buffer("bias", _aligned(bias.detach().to(torch.float32).reshape(n // br, br)))
        else:
            self.bias = None
        self._kernels: dict[str, object] = {}
        self._m_tile = {r: m_tile_for(self.block, r) for r in ("gemv", "gemm")}
        if eager:
            for regime in ("gemv", "gemm"):
                self._kernel(regime)

    def _kernel(self, regime: str):
        fn = self._kernels.get(regime)
        if fn is None:
            fn = get_linear_kernel(self.block, regime, self.bias is not None, self.activation, self.target,
                                   k=self.shape[1])
            self._kernels[regime] = fn
        return fn

    @property
    def kernel_name(self) -> str:
        name = kernel_name(self.block, "gemm", self.bias is not None, self.activation)
        return name + (f" {self.tuned.tag}" if self.tuned is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        lead, x2 = rows_of(x, k)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(lead + (n,))
        regime = "gemm" if m >= 8 else "gemv"
        tuned = self.tuned.kernel(regime, m) if self.tuned is not None else None
        fn, mt = tuned if tuned is not None else (None, self._m_tile[regime])
        mp = -(-m // mt) * mt  # rows padded to a multiple of the kernel's M tile
        if mp != m:
            xp = _aligned_empty((mp, k))
            xp[:m].copy_(x2)
            xp[m:].zero_()
            x2 = xp
        else:
            x2 = _aligned(x2)
        y = torch.empty(mp, n, dtype=torch.float32)
        if y.data_ptr() % _ALIGN:  # torch CPU allocations are 64-byte aligned; never trust it blindly
            y = _aligned_empty((mp, n))
        if fn is None:
            fn = self._kernel(regime)
        br = self.block[0]
        # the kernel writes y in place and autograd never sees it: no no_grad() needed (~1 us a call);
        # buffers are read from __dict__ directly (nn.Module.__getattr__ costs ~0.3 us each)
        b = self._buffers
        if b.get("bias") is not None:
            fn(x2, b["data"], b["indices"], b["indptr"], b["bias"], y.view(mp, n // br, br))
        else:
            fn(x2, b["data"], b["indices"], b["indptr"], y.view(mp, n // br, br))
        return (y if mp == m else y[:m]).view(lead + (n,))

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, block={self.block}, format={self.format}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, activation={self.activation}")
