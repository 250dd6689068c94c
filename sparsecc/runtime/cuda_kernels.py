"""CUDA sparse linear kernels: build cache and the torch-facing module.

:class:`CudaSparseLinear` holds one weight in BSR/CSR on the GPU and runs the
kernels of :mod:`sparsecc.targets.cuda` on torch CUDA tensors (DLPack, zero
copy, launched on torch's current stream). With ``build_only=True`` (no GPU)
it builds the kernels, keeps their CUDA source and library, and refuses to run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparsecc.cache import KERNELS
from sparsecc.errors import (
    InputDtypeError,
    InputShapeError,
    TargetUnavailableError,
)
from sparsecc.formats import BSR, CSR, NM, BlockSparseMatrix
from sparsecc.formats import block_candidate
from sparsecc.runtime.ieee import all_finite, torch_linear
from sparsecc.runtime.kernels import check_activation, load_or_build, stored_bsr_dense
from sparsecc.targets import cuda

__all__ = ["CudaBuildArtifact", "CudaKernel", "CudaSparseLinear", "cuda_linear", "get_cuda_linear_kernel"]


@dataclass
class CudaKernel:
    """One built CUDA kernel.

    Attributes
    ----------
    name : str
        e.g. ``"cuda_bsr_16x1_gemv_bias_gelu_k768"``.
    regime : str
        ``"gemv"`` (M < 8) or ``"gemm"``.
    source : str or None
        CUDA C source (None when the device code was compiled at build time and
        the source is no longer in the module).
    lib : object
        The built ``tvm.runtime.Executable`` (host code + CUDA module).
    fn : callable or None
        The packed function ``main`` (None for build-only kernels).
    """

    name: str
    regime: str
    source: str | None
    lib: object
    fn: object = None


def _kernel_name(block, regime, bias, activation, k) -> str:
    return "cuda_" + block_candidate(block).kernel_name("linear", regime, bias, activation) + f"_k{k}"


def get_cuda_linear_kernel(block: tuple[int, int], regime: str, bias: bool, activation: str | None, k: int,
                           arch: str, device_code: bool) -> CudaKernel:
    """The CUDA kernel for ``(block, regime, bias, activation, K)`` on ``arch``, built once per process.

    ``device_code=False`` keeps the CUDA source (no GPU or CUDA toolkit needed);
    ``True`` compiles the device code and goes through the on-disk cache of
    :func:`sparsecc.runtime.kernels.load_or_build`.
    """
    block = (int(block[0]), int(block[1]))
    key = ("cuda", block, regime, bool(bias), activation, int(k), arch, bool(device_code))

    def make():
        sch = cuda.schedule_linear(block, regime, k=int(k), bias=bool(bias), activation=activation)
        target = cuda.cuda_target(arch)
        name = _kernel_name(block, regime, bias, activation, k)
        if device_code:
            fn = load_or_build(sch, name, target, build=functools.partial(cuda.build, device_code=True))
            return CudaKernel(name, regime, None, None, fn)
        lib = cuda.build(sch, target)
        return CudaKernel(name, regime, cuda.kernel_source(lib), lib, None)

    return KERNELS.get(key, make)


class CudaSparseLinear(torch.nn.Module):
    """``act(x @ W.T + b)`` with ``W``: (N, K) block-sparse, run by a TVM CUDA kernel.

    Parameters
    ----------
    matrix : BlockSparseMatrix
        The weight (BSR; CSR is block (1, 1)).
    bias : Tensor (N,), optional
    activation : {None, "relu", "gelu"}
    arch : str
        CUDA architecture the kernels are built for (``"sm_80"``, ``"sm_90"``).
    device : torch.device or str
        GPU holding the weight (ignored with ``build_only``).
    build_only : bool
        Build both regimes' kernels (gemv, gemm) as CUDA source and keep the
        weight on the CPU; :meth:`forward` then raises.

    Raises
    ------
    UnsupportedOpError
        Unknown activation.
    InputShapeError
        ``bias`` is not (N,).
    """

    layer_kind = "linear"
    exportable = False  # export builds CPU artifacts

    def __init__(self, matrix: BlockSparseMatrix, bias: torch.Tensor | None = None,
                 activation: str | None = None, arch: str = "sm_80", device="cuda", build_only: bool = False):
        super().__init__()
        check_activation(activation)
        n, k = matrix.shape
        br, bc = matrix.block
        self.shape = (n, k)
        self.block = (br, bc)
        self.format = matrix.format
        self.density = matrix.density
        self.activation = activation
        self.arch = arch
        self.build_only = bool(build_only)
        dev = torch.device("cpu") if build_only else torch.device(device)
        data, indices = matrix.data.detach().to(torch.float32), matrix.indices.to(torch.int32)
        if data.shape[0] == 0:  # nnzb == 0: TVM refuses empty tensors; indptr keeps them unread
            data, indices = torch.zeros(1, br, bc), torch.zeros(1, dtype=torch.int32)
        self.register_buffer("data", data.contiguous().to(dev))
        self.register_buffer("indices", indices.contiguous().to(dev))
        self.register_buffer("indptr", matrix.indptr.to(torch.int32).contiguous().to(dev))
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise InputShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().to(torch.float32).reshape(n // br, br).contiguous().to(dev))
        else:
            self.bias = None
        self.kernels: dict[str, CudaKernel] = {}
        if self.build_only:
            for regime in ("gemv", "gemm"):
                self._kernel(regime)

    def _kernel(self, regime: str) -> CudaKernel:
        kern = self.kernels.get(regime)
        if kern is None:
            kern = get_cuda_linear_kernel(self.block, regime, self.bias is not None, self.activation, self.shape[1],
                                          self.arch, device_code=not self.build_only)
            self.kernels[regime] = kern
        return kern

    @property
    def kernel_name(self) -> str:
        return _kernel_name(self.block, "gemm", self.bias is not None, self.activation, self.shape[1])

    def sources(self) -> dict:
        """``{kernel name: CUDA C source}`` of the kernels built so far (build-only modules: both regimes)."""
        return {k.name: k.source for k in self.kernels.values() if k.source is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (..., K) float32 on this module's GPU -> (..., N) on the same GPU.

        Raises
        ------
        TargetUnavailableError
            The module was built with ``build_only=True``.
        InputDtypeError, InputShapeError
            ``x`` is not float32, not on the weight's GPU, or its last dim is not K.
        """
        n, k = self.shape
        if self.build_only:
            raise TargetUnavailableError(
                f"this CUDA kernel module ({self.kernel_name}) was built with build_only=True and cannot run; "
                "compile again on a machine with a CUDA GPU")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise InputDtypeError(f"expected a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.device != self.data.device:
            raise InputDtypeError(f"expected a tensor on {self.data.device}, got device {x.device}")
        if x.dim() < 1 or x.shape[-1] != k:
            raise InputShapeError(f"expected input of shape (..., {k}), got {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0:
            return x.new_empty(lead + (n,))
        if not all_finite(x2):  # skipping W's zeros would drop their 0 · NaN (runtime.ieee)
            bias = self.bias.reshape(-1) if self.bias is not None else None
            return torch_linear(x2, stored_bsr_dense(self).to(x.device), bias, self.activation).view(lead + (n,))
        if not x2.is_contiguous() or x2.data_ptr() % 64:
            x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()  # caching allocator: aligned
        fn = self._kernel(cuda.regime_for(m)).fn
        br = self.block[0]
        y = torch.empty(m, n // br, br, dtype=torch.float32, device=x.device)
        import tvm_ffi

        with torch.no_grad(), tvm_ffi.use_torch_stream():  # launch on torch's current stream
            if self.bias is not None:
                fn(x2, self.data, self.indices, self.indptr, self.bias, y)
            else:
                fn(x2, self.data, self.indices, self.indptr, y)
        return y.view(lead + (n,))

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, block={self.block}, format={self.format}, density={self.density:.3f}, "
                f"bias={self.bias is not None}, activation={self.activation}, arch={self.arch}, "
                f"build_only={self.build_only}")


@CSR.register_module("cuda")
@BSR.register_module("cuda")
@NM.register_module("cuda")
def cuda_linear(matrix, bias=None, activation=None, target=None, tuning_db=None) -> CudaSparseLinear:
    """:class:`CudaSparseLinear` computing ``act(X · Wᵀ + b)``, W: (N, K), on the target's GPU.

    An N:M matrix runs on the CSR kernel: every row holds the same number of nonzeros, so the warps are
    balanced (no dedicated N:M kernel and no sparse tensor cores on this target).
    """
    if matrix.format == "nm":
        matrix = BlockSparseMatrix.from_dense(matrix.to_dense(), (1, 1))
    return CudaSparseLinear(matrix, bias, activation=activation, arch=target.arch, device=target.torch_device,
                            build_only=target.build_only)


class CudaBuildArtifact:
    """What ``sparsecc.compile(..., target="cuda", build_only=True)`` returns: kernels that were built, not run.

    Attributes
    ----------
    graph : SparseGraph
        The rewritten graph; sparse linears are :class:`CudaSparseLinear` modules (weights on the CPU).
    target : CudaTarget
    compile_seconds : float
    """

    def __init__(self, graph, target, compile_seconds: float):
        self.graph = graph
        self.target = target
        self.compile_seconds = compile_seconds

    @property
    def modules(self) -> dict:
        """``{layer name: CudaSparseLinear}`` in graph order (layer names as in the user's model)."""
        from sparsecc.ir.annotations import get_annotation

        out = {}
        for node in self.graph.graph.nodes:
            ann = get_annotation(node)
            if node.op == "call_module" and ann is not None:
                mod = self.graph.gm.get_submodule(node.target)
                if isinstance(mod, CudaSparseLinear):
                    out[ann.name] = mod
        return out

    @property
    def kernels(self) -> dict:
        """``{layer name: {regime: CudaKernel}}`` (source + built library of each regime)."""
        return {name: dict(mod.kernels) for name, mod in self.modules.items()}

    def sources(self) -> dict:
        """``{layer name: {kernel name: CUDA C source}}``."""
        return {name: mod.sources() for name, mod in self.modules.items()}

    def save(self, folder) -> list:
        """Write each distinct kernel's source as ``<folder>/<kernel name>.cu``; returns the paths written."""
        from pathlib import Path

        from sparsecc.fileio import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for srcs in self.sources().values():
            for name, src in srcs.items():
                if name not in written:
                    with atomic_path(folder / f"{name}.cu", suffix=".cu") as tmp:
                        tmp.write_text(src)
                    written[name] = folder / f"{name}.cu"
        return list(written.values())

    def __call__(self, *args, **kwargs):
        raise TargetUnavailableError("a build-only CUDA artifact cannot run; compile on a machine with a CUDA GPU")

    def __repr__(self) -> str:
        return f"CudaBuildArtifact(arch={self.target.arch!r}, sparse_layers={len(self.modules)})"
