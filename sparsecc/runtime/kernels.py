"""Compiled sparse linear kernels: in-process + on-disk cache, and the torch-facing module.

``get_linear_kernel(block, regime, bias, activation)`` returns a TVM packed
function built once per process and once per machine (:data:`sparsecc.cache.KERNELS`,
keyed by a hash of the scheduled TVMScript, the target and the TVM version).

:class:`SparseLinear` holds the converted weight and calls the kernel on torch
tensors directly (DLPack, zero copy).
"""

from __future__ import annotations

import os

import numpy as np

# TVM's pool workers spin after each parallel kernel and steal the cores from torch's
# OpenMP threads (measured: torch dense 4 ms -> 24 ms when alternating). Sleep at once.
# Read when TVM's thread pool starts (first parallel kernel), so set it before any runs.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import torch

from sparsecc.cache import KERNELS
from sparsecc.errors import InputDtypeError, InputShapeError, UnsupportedOpError
from sparsecc.formats import BSR, CSR, BlockSparseMatrix, block_candidate
from sparsecc.runtime import omp_launch
from sparsecc.runtime.ieee import all_finite, torch_linear
from sparsecc.targets import x86

__all__ = ["ALIGN", "SparseLinear", "aligned", "aligned_empty", "check_activation", "get_linear_kernel",
           "load_or_build", "output_buffer", "rows_of", "stored_bsr_dense", "target_key"]

ALIGN = 64


def target_key(target) -> str:
    """A string naming a ``tvm.target.Target`` (its exported config) for cache keys."""
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
    block = (int(fmt_block[0]), int(fmt_block[1]))
    check_activation(activation)
    target = target or x86.host_target()
    key = ("linear", block, regime, bool(bias), activation, target_key(target), params, k)

    def make():
        sch = x86.schedule_linear(block, regime, bias=bool(bias), activation=activation, target=target,
                                  params=params, k=k)
        return load_or_build(sch, block_candidate(block).kernel_name("linear", regime, bool(bias), activation),
                             target)

    return KERNELS.get(key, make)


def load_or_build(sch, name: str, target, build=None):
    """Packed function ``main`` of scheduled module ``sch``, from the kernel cache or built now.

    The shared library is kept in :data:`sparsecc.cache.KERNELS` as ``<name>-<digest>.so``,
    the digest hashing the scheduled TVMScript, the target and the TVM version,
    so a kernel is built once per machine. Every kernel family (linear, N:M,
    conv, tuned schedules, CUDA) goes through here. A cache entry that does not
    load (truncated, corrupt) is rebuilt; a read-only cache keeps the in-memory build.

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

    mod_ir = sch.mod if hasattr(sch, "mod") else sch
    digest = KERNELS.digest(mod_ir.script(), target_key(target), tvm.__version__)
    built = []

    def write(tmp):
        built.append((build or x86.build)(mod_ir, target))
        built[-1].export_library(str(tmp))

    mod = lib_in_memory = None
    try:
        path = KERNELS.library(name, digest, write)
        try:
            mod = tvm.runtime.load_module(str(path))
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            path.unlink(missing_ok=True)
            mod = tvm.runtime.load_module(str(KERNELS.library(name, digest, write)))
    except OSError:
        mod = lib_in_memory = built[-1] if built else (build or x86.build)(mod_ir, target)
    if mod is not lib_in_memory and omp_launch.enabled():
        omp_launch.patch_module(str(path))  # parallel loops on torch's OpenMP threads
    KERNELS.keep(mod)
    return mod["main"]


def m_tile_for(block: tuple[int, int], regime: str) -> int:
    """Rows of X one kernel instance handles; the kernel needs M to be a multiple of it."""
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
    if not x.is_cpu:
        raise InputDtypeError(f"expected a CPU tensor, got device {x.device}")
    if x.dim() == 2:  # already (M, K): no reshape (about 1 us a call, a third of a small gemv's kernel time)
        return (x.shape[0],), x
    return tuple(x.shape[:-1]), x.reshape(-1, k)


def aligned_empty(shape, dtype=torch.float32) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= int(s)
    esize = torch.empty((), dtype=dtype).element_size()
    pad = ALIGN // esize
    raw = torch.empty(numel + pad, dtype=dtype)
    off = (-raw.data_ptr() % ALIGN) // esize
    return raw[off:off + numel].view(*shape)


def output_buffer(rows: int, cols: int) -> torch.Tensor:
    """An uninitialized float32 (rows, cols) tensor, 64-byte aligned (torch's CPU allocations are; never trusted
    blindly, since the kernels do not check)."""
    y = torch.empty(rows, cols, dtype=torch.float32)
    return y if y.data_ptr() % ALIGN == 0 else aligned_empty((rows, cols))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 64-byte aligned, else an aligned contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % ALIGN == 0:
        return t
    out = aligned_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


def stored_bsr_dense(mod) -> torch.Tensor:
    """W: (N, K) dense (on the CPU) from a module's BSR buffers ``data``, ``indices``, ``indptr`` (a module with
    no stored block keeps one dummy block that ``indptr`` leaves unread) and its ``shape`` and ``block``."""
    nnzb = int(mod.indptr[-1])
    return BlockSparseMatrix(mod.shape, mod.block, mod.data[:nnzb].cpu(), mod.indices[:nnzb].cpu(),
                             mod.indptr.cpu()).to_dense()


class SparseLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` with ``W`` block-sparse, run by a TVM kernel.

    The weight is converted and aligned once here; ``forward`` only reshapes ``x``
    (copying it only when it is not contiguous or not 64-byte aligned).
    """

    layer_kind = "linear"

    def __init__(self, matrix: BlockSparseMatrix, bias: torch.Tensor | None = None,
                 activation: str | None = None, target=None, eager: bool = False, tuned=None):
        super().__init__()
        # tuned: sparsecc.tune.lookup.TunedKernels of this layer (kernel(regime, m) -> (fn, m_tile)
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
        self.register_buffer("data", aligned(data.contiguous()))
        self.register_buffer("indices", aligned(indices.contiguous()))
        self.register_buffer("indptr", aligned(matrix.indptr.to(torch.int32).contiguous()))
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise InputShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            self.register_buffer("bias", aligned(bias.detach().to(torch.float32).reshape(n // br, br)))
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
        name = block_candidate(self.block).kernel_name("linear", "gemm", self.bias is not None, self.activation)
        return name + (f" {self.tuned.tag}" if self.tuned is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        lead, x2 = rows_of(x, k)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(lead + (n,))
        if not all_finite(x2):  # skipping W's zeros would drop their 0 · NaN (runtime.ieee)
            return self.torch_forward(x2).view(lead + (n,))
        regime = "gemm" if m >= 8 else "gemv"
        tuned = self.tuned.kernel(regime, m) if self.tuned is not None else None
        fn, mt = tuned if tuned is not None else (None, self._m_tile[regime])
        mp = -(-m // mt) * mt  # rows padded to a multiple of the kernel's M tile
        if mp != m:
            xp = aligned_empty((mp, k))
            xp[:m].copy_(x2)
            xp[m:].zero_()
            x2 = xp
        else:
            x2 = aligned(x2)
        y = output_buffer(mp, n)
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

    def dense_weight(self) -> torch.Tensor:
        """W: (N, K) dense, with its zeros, from the stored blocks."""
        return stored_bsr_dense(self)

    def torch_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's ``act(x2 @ W.T + b)`` for x2 (M, K): the path of inputs holding NaN or inf."""
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return torch_linear(x2, self.dense_weight(), bias, self.activation)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, block={self.block}, format={self.format}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, activation={self.activation}")


@CSR.register_module("x86")
@BSR.register_module("x86")
@CSR.register_module("arm")
@BSR.register_module("arm")
def cpu_linear(matrix: BlockSparseMatrix, bias=None, activation=None, target=None, tuning_db=None) -> SparseLinear:
    """:class:`SparseLinear` for a CPU target (ARM: a host build of the same format, see ``ArmTarget``).

    ``tuning_db``: a :class:`~sparsecc.tune.lookup.TuningDatabase` whose tuned schedule, where it has one
    for this layer, replaces the hand schedule.
    """
    host = target.tvm_target()
    tuned = None
    if tuning_db is not None:
        n, k = matrix.shape
        tuned = tuning_db.for_layer(matrix.block, n, k, matrix.nnzb, bias is not None, activation, host)
    return SparseLinear(matrix, bias, activation=activation, target=host, tuned=tuned)


@CSR.register_exporter("linear")
@BSR.register_exporter("linear")
def export_linear(ctx, bb, x, mod: SparseLinear):
    """Relax for one :class:`SparseLinear`: X (..., K) -> (M, K) padded to the M tile, kernel, Y -> (..., N).

    The kernel is the target's schedule of the same template (ARM: NEON tiles, :func:`arm_params`), or the
    schedule tuned for the deploy target where ``compile(tuning_db=...)`` has one for this layer.
    """
    from tvm import relax

    from sparsecc.runtime.export import rows_for_export

    n, k = mod.shape
    br, bc = mod.block
    lead, m = rows_for_export(x)
    regime = x86.regime_for(m)
    bias = mod.bias is not None
    name = f"sparsecc_{block_candidate((br, bc)).kernel_name('linear', regime, bias, mod.activation)}_k{k}"
    tuned = ctx.tuned_linear((br, bc), n, k, int(mod.indptr[-1]), bias, mod.activation, regime, m)
    if tuned is not None:
        sch, mt = tuned
        name += f"_mt{mt}_tuned"
        ctx.tuned_layers.append(name)
    else:
        params = ctx.target.kernel_params("linear", regime, block=(br, bc))
        sch = x86.schedule_linear((br, bc), regime, bias=bias, activation=mod.activation, params=params, k=k)
        mt = params.m_tile
        name += f"_mt{mt}"
    mp = -(-max(m, 1) // mt) * mt
    x2 = bb.emit(relax.op.reshape(x, (m, k)))
    if mp != m:
        x2 = bb.emit(relax.op.concat([x2, relax.const(np.zeros((mp - m, k), np.float32))], axis=0))
    args = [x2, ctx.const(mod.data), ctx.const(mod.indices), ctx.const(mod.indptr)]
    if bias:
        args.append(ctx.const(mod.bias))
    gv = ctx.gvar(bb, name, sch)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((mp, n // br, br), "float32")))
    y = bb.emit(relax.op.reshape(y, (mp, n)))
    if mp != m:
        y = bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[m]))
    return bb.emit(relax.op.reshape(y, (*lead, n)))
