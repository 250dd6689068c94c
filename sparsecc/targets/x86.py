"""x86 host target: :class:`X86Target`, CPU detection, schedule rules for the linear templates, build.

Rules follow the dlight style: ``rule(func, target, params) -> tvm.s_tir.Schedule``
or ``None`` when the rule does not apply.  A rule gets the *unscheduled*
template of :mod:`sparsecc.codegen.linear` (built with the rule's ``m_tile``,
see :func:`template_for`), so tile sizes stay plain parameters a tuner can turn
into knobs.

Regimes: ``"gemv"`` for ``M < GEMM_MIN_M`` (one row of X per tile), ``"gemm"``
otherwise (a register tile of ``m_tile`` rows x one block row).
"""

from __future__ import annotations

import functools

import os
from dataclasses import dataclass

# TVM's pool workers spin after each parallel kernel and steal the cores from torch's
# OpenMP threads (measured: torch dense 4 ms -> 24 ms when alternating). Sleep at once.
# Read when TVM's thread pool starts (first parallel kernel), so set it before any runs.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import tvm
import tvm.s_tir

from sparsecc.codegen.linear import linear_template
from sparsecc.errors import KernelBuildError, TargetError
from sparsecc.targets.base import Target, apply_rules

__all__ = [
    "DenseParams",
    "GEMM_MIN_M",
    "X86Target",
    "REGIMES",
    "ScheduleParams",
    "build",
    "default_params",
    "dense_params",
    "host_l1d_bytes",
    "host_l2_bytes",
    "host_target",
    "num_threads",
    "regime_for",
    "schedule_dense",
    "schedule_dense_conv1x1",
    "schedule_depthwise",
    "depthwise_tile",
    "schedule_linear",
    "template_for",
]

GEMM_MIN_M = 8
REGIMES = ("gemv", "gemm")
_VECTOR_ISA = ("avx512f", "avx2")


def regime_for(m: int) -> str:
    return "gemm" if m >= GEMM_MIN_M else "gemv"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_HOST_TARGET: tvm.target.Target | None = None


def host_target() -> tvm.target.Target:
    """The llvm target of this CPU (named ``mcpu``, never ``"native"``, which loses AVX)."""
    global _HOST_TARGET
    if _HOST_TARGET is None:
        t = tvm.target.Target.from_device("cpu")
        cfg = dict(t.export())
        mcpu = str(cfg.get("mcpu", ""))
        if not mcpu or mcpu in ("native", "generic"):
            raise TargetError(
                f"TVM could not name the host CPU (got mcpu={mcpu!r}); pass an explicit target "
                "such as {'kind': 'llvm', 'mcpu': 'znver4'}")
        _HOST_TARGET = tvm.target.Target({k: v for k, v in cfg.items() if k in ("kind", "mtriple", "mcpu", "mattr")})
    return _HOST_TARGET


def num_threads() -> int:
    """Threads the kernels use: ``TVM_NUM_THREADS`` if set, else torch's."""
    env = os.environ.get("TVM_NUM_THREADS")
    if env:
        return max(1, int(env))
    import torch

    return max(1, torch.get_num_threads())


def target_vector_bits(target: tvm.target.Target | None = None) -> int:
    """Widest float vector of the target (512 with AVX-512, 256 with AVX2, else 128)."""
    target = target or host_target()
    mcpu = str(target.attrs.get("mcpu", ""))
    mattr = " ".join(str(a) for a in target.attrs.get("mattr", []) or [])
    if "avx512" in mattr or mcpu in ("znver4", "znver5", "skylake-avx512", "icelake-server",
                                     "sapphirerapids", "cascadelake", "cooperlake", "tigerlake"):
        return 512
    if "avx2" in mattr or mcpu.startswith(("znver", "haswell", "broadwell", "skylake", "alderlake")):
        return 256
    return 128


@dataclass(frozen=True)
class ScheduleParams:
    """Tile sizes of one rule (the knobs `sparsecc.tune` searches)."""

    m_tile: int = 1
    m_outer: bool = True  # loop order of the parallel loops: M tiles outside block rows
    #: block rows per parallel task, run serially innermost (1: no split). With ``m_outer=False``
    #: a group of block rows meets every M tile while its weights are in cache.
    row_group: int = 1
    #: split the nonzero-block loop by this factor and unroll the inner part (1: no split)
    k_unroll: int = 1
    #: run the row loop on TVM's thread pool; False runs it serially (a small kernel, e.g. one token
    #: through a 384x384 layer, can take less time than waking the pool)
    parallel: bool = True


@functools.lru_cache(maxsize=None)
def _sysfs_cache_bytes(level: str, kinds: tuple) -> int | None:
    """Bytes of cpu0's cache of ``level`` and one of ``kinds`` from ``/sys/devices/system/cpu/cpu0/cache``
    (Linux); None where the kernel does not say."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            with open(os.path.join(path, "level"), encoding="ascii") as f:
                found = f.read().strip()
            with open(os.path.join(path, "type"), encoding="ascii") as f:
                kind = f.read().strip()
            if found == level and kind in kinds:
                with open(os.path.join(path, "size"), encoding="ascii") as f:
                    size = f.read().strip().upper()
                scale = {"K": 1024, "M": 1024 * 1024}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return None


def host_l1d_bytes(default: int = 32 * 1024) -> int:
    """Bytes of one core's level-1 data cache (Linux sysfs); ``default`` where the kernel does not say (32 KiB,
    the size on every x86 core since Haswell and Zen 1 except Ice Lake and later Intel cores and Zen 5, 48 KiB)."""
    size = _sysfs_cache_bytes("1", ("Data", "Unified"))
    return default if size is None else size


def host_l2_bytes(default: int = 512 * 1024) -> int:
    """Bytes of one core's level-2 cache (Linux sysfs); ``default`` where the kernel does not say (512 KiB,
    Zen 2 and Zen 3; Zen 4 and Zen 5 have 1 MiB, recent Intel server cores 1-2 MiB)."""
    size = _sysfs_cache_bytes("2", ("Unified", "Data"))
    return default if size is None else size


@functools.lru_cache(maxsize=1)
def host_vector_file() -> tuple[int, int]:
    """``(float32 lanes, vector registers)`` of this CPU's widest vector ISA: AVX-512 ``(16, 32)``, else AVX2
    ``(8, 16)``."""
    return (16, 32) if "avx512f" in _cpu_flags() else (8, 16)


def default_params(block: tuple[int, int], regime: str) -> ScheduleParams:
    """Hand-picked tiles for this CPU (``benchmarks/linear.py --minilm``).

    The M tile keeps the accumulators of one block row, ``m_tile * br * bc`` floats, within half of the vector
    register file (:func:`host_vector_file`), at most 8 rows: AVX-512 (16 zmm of 16 floats) gives 8 rows for
    every block shape up to 16 floats; AVX2 (8 ymm of 8 floats) gives 4 rows of 16x1 or 4x4 blocks and 8 of
    8x1 and smaller. On a 2-core AVX2 Zen 3 (``benchmarks/m_tile.py``), 16x1 blocks at M = 128 ran 1.9-2.3x
    faster with 4 rows than with 8 (8 rows of two ymm each need all 16 registers and spill), while 8x1
    blocks ran fastest with 8. The rule is the one of :func:`sparsecc.targets.arm.arm_params` with NEON's file.
    """
    if regime == "gemv":
        return ScheduleParams(m_tile=1, m_outer=True)
    br, bc = block
    if (br, bc) == (1, 1):
        return ScheduleParams(m_tile=8, m_outer=True)
    # m_tile * br * bc * 4 bytes (the accumulator) must also stay under TVM's 1024-byte stack limit
    # (kMaxStackAlloca): above it TVM puts it on the heap and LLVM cannot keep it in registers
    # (16x1 with 16 rows ran 4x slower). 16x1 with 12 rows ran ~5% faster than 8 on one AVX-512 core,
    # but M = 8 * batch * seq then needs a padded copy of X on every call, which costs more.
    lanes, registers = host_vector_file()
    return ScheduleParams(m_tile=max(1, min(8, registers // 2 * lanes // (br * bc))), m_outer=True)


def template_for(block, regime: str, *, bias: bool, activation, params: ScheduleParams | None = None,
                 k: int | None = None):
    """The unscheduled template a rule for ``(block, regime)`` expects (``k``: static K or None)."""
    params = params or default_params(tuple(block), regime)
    return linear_template(tuple(block), bias=bias, activation=activation, m_tile=params.m_tile, k=k)


# -- schedule rules -----------------------------------------------------------------

def _finish(sch: tvm.s_tir.Schedule, params: ScheduleParams) -> tvm.s_tir.Schedule:
    if params.k_unroll > 1:
        k = sch.get_loops(sch.get_sblock("compute"))[0]
        _, ki = sch.split(k, [None, int(params.k_unroll)])
        sch.unroll(ki)
    mo, io = sch.get_loops(sch.get_sblock("row"))
    if params.row_group > 1:
        io_o, io_i = sch.split(io, [None, int(params.row_group)])
        outer = (mo, io_o) if params.m_outer else (io_o, mo)
        sch.reorder(*outer, io_i)
        fused = sch.fuse(*outer)
        if params.parallel:
            sch.parallel(fused)  # parallel last (see tvm notes)
        return sch
    if not params.m_outer:
        sch.reorder(io, mo)
    fused = sch.fuse(*sch.get_loops(sch.get_sblock("row")))
    if params.parallel:
        sch.parallel(fused)  # parallel last (see tvm notes)
    return sch


def _schedule_of(func) -> tvm.s_tir.Schedule:
    """A new schedule of the template ``func``, or ``func`` itself when it is already a schedule
    (the tuner applies the rules to the traced schedules MetaSchedule hands it)."""
    if isinstance(func, tvm.s_tir.Schedule):
        return func
    return tvm.s_tir.Schedule(func, enable_check=False)


def _vectorize_epilogue(sch, br: int) -> None:
    loops = sch.get_loops(sch.get_sblock("epilogue"))
    if br > 1:
        sch.vectorize(loops[-1])
    # Unrolled init and epilogue leave only constant indices into the accumulator, so LLVM
    # keeps it in registers (a loop over more than 8 rows left it in memory).
    sch.unroll(loops[-2])
    sch.unroll(sch.get_loops(sch.get_sblock("init"))[-3])


def rule_bsr_column_blocks(func, target=None, params: ScheduleParams = ScheduleParams()):
    """Blocks (br x 1), br > 1: vectorize along br (contiguous in data and Y), broadcast X."""
    br, bc = _block_of(func)
    if not (br > 1 and bc == 1) or not _is_row_template(func):
        return None
    sch = _schedule_of(func)
    k, j, mi, ii = sch.get_loops(sch.get_sblock("compute"))
    sch.unroll(mi)
    sch.vectorize(ii)
    sch.vectorize(sch.get_loops(sch.get_sblock("init"))[-2])
    _vectorize_epilogue(sch, br)
    return _finish(sch, params)


def rule_bsr_row_blocks(func, target=None, params: ScheduleParams = ScheduleParams()):
    """Blocks with bc > 1 (1x4, 1x8, 4x4): one partial sum per block column, vectorized along bc."""
    br, bc = _block_of(func)
    if bc <= 1 or not _is_row_template(func):
        return None
    sch = _schedule_of(func)
    k, j, mi, ii = sch.get_loops(sch.get_sblock("compute"))
    sch.reorder(k, mi, ii, j)
    sch.vectorize(j)
    sch.unroll(ii)
    sch.unroll(mi)
    sch.vectorize(sch.get_loops(sch.get_sblock("init"))[-1])
    _vectorize_epilogue(sch, br)
    return _finish(sch, params)


def rule_csr(func, target=None, params: ScheduleParams = ScheduleParams()):
    """CSR: scalar FMAs over an M tile (X values gathered once per nonzero and row)."""
    br, bc = _block_of(func)
    if (br, bc) != (1, 1) or not _is_row_template(func):
        return None
    sch = _schedule_of(func)
    k, j, mi, ii = sch.get_loops(sch.get_sblock("compute"))
    sch.unroll(mi)
    return _finish(sch, params)


RULES = (rule_csr, rule_bsr_column_blocks, rule_bsr_row_blocks)


def _attrs(func):
    return (func.mod["main"] if isinstance(func, tvm.s_tir.Schedule) else func).attrs


def _block_of(func) -> tuple[int, int]:
    """The template's block (rows, cols), (0, 0) for templates without one (N:M)."""
    blk = _attrs(func).get("sparsecc.block")
    return (int(blk[0]), int(blk[1])) if blk is not None else (0, 0)


def _is_row_template(func) -> bool:
    """The BSR linear template or the NHWC conv template (same loop structure): the BSR rules apply."""
    return str(_attrs(func).get("sparsecc.kind", "linear")) in ("linear", "conv_nhwc")


@dataclass(frozen=True)
class DenseParams:
    """Tiles of the packed dense linear (:func:`schedule_dense`): an ``mr x nb`` register tile of ``Y``,
    ``row_group`` tiles of rows per parallel task, the ``k`` loop unrolled ``k_unroll`` times."""

    mr: int = 6
    nb: int = 16
    row_group: int = 8
    k_unroll: int = 4


def dense_params(m: int, k: int, lanes: int, registers: int) -> DenseParams:
    """The micro-kernel rule of BLIS-style GEMMs for a vector file of ``registers`` registers of ``lanes`` floats.

    A panel is two vectors wide (``nb = 2 * lanes``); the tile takes up to 6 rows (12 accumulators, which leaves
    a register for each of the two panel vectors and the broadcast of X on AVX2's 16), also under TVM's
    1024-byte stack limit for a register tile on AVX-512. Rows that 6 do not divide take 4 (8 accumulators,
    still enough independent FMAs to hide their latency) rather than padding X; fewer than 4 rows are taken
    as they are (a GEMV, bound by reading the weight). On a 2-core AVX2 Zen 3 (``python benchmarks/dense.py``,
    MiniLM's three weight shapes at M = 128 and 1024, three runs) 6x16 (X padded to 6 rows) and 4x16 were within
    14% of each other with neither ahead in every run, 2x16 was 5-72% slower than 4x16, and the packed GEMM took
    0.54-1.35x torch's time (MKL); this VM's times vary by up to 1.5x between runs. So 4 rows are taken where
    they divide M, sparing a copy of X per call.
    """
    nb = 2 * int(lanes)
    mr_max = max(1, min(6, (int(registers) - 4) // 2, 1024 // (4 * nb)))
    if m < 4:
        mr = m
    elif m % mr_max == 0:
        mr = mr_max
    else:
        mr = 4 if m % 4 == 0 else mr_max
    groups = max(1, -(-m // mr))
    row_group = next(g for g in (8, 4, 2, 1) if groups % g == 0)
    k_unroll = next(u for u in (4, 2, 1) if k % u == 0)
    return DenseParams(mr=mr, nb=nb, row_group=row_group, k_unroll=k_unroll)


def schedule_dense(m: int, n: int, k: int, *, bias: bool, activation=None, params: DenseParams,
                   gelu_at_inf=None) -> tvm.s_tir.Schedule:
    """The packed dense linear (:func:`sparsecc.codegen.dense.dense_linear`) scheduled as a register-tiled GEMM.

    ``M`` must be a multiple of ``params.mr`` (callers pad X). Loops: ``(io, jo)`` fused and parallel (a task:
    ``row_group * mr`` rows of one panel), then per ``mr x nb`` tile the whole ``k`` loop (unrolled
    ``k_unroll`` times) around the unrolled rows and the vectorized panel columns, the tile accumulated in a
    local buffer (registers) and written once with the bias and activation.
    """
    from sparsecc.codegen.dense import dense_linear

    if m % params.mr:
        raise KernelBuildError(f"dense linear: M = {m} is not a multiple of the row tile {params.mr}")
    return _schedule_gemm(dense_linear(m, n, k, params.nb, bias=bias, activation=activation,
                                       gelu_at_inf=gelu_at_inf), m, params)


def schedule_dense_conv1x1(batch: int, c_out: int, c_in: int, hw: int, *, bias: bool, activation=None,
                           params: DenseParams) -> tvm.s_tir.Schedule:
    """The dense 1x1 NCHW convolution (:func:`sparsecc.codegen.dense.dense_conv1x1`) scheduled as
    :func:`schedule_dense` schedules its GEMM, output channels as the rows (``C_out`` a multiple of
    ``params.mr``: callers pad the weight) and ``params.nb`` pixels as the panel; images and tiles in parallel."""
    from sparsecc.codegen.dense import dense_conv1x1

    if c_out % params.mr:
        raise KernelBuildError(f"dense 1x1 conv: C_out = {c_out} is not a multiple of the row tile {params.mr}")
    return _schedule_gemm(dense_conv1x1(batch, c_out, c_in, hw, params.nb, bias=bias, activation=activation),
                          c_out, params)


def depthwise_tile(ow: int, lanes: int) -> tuple[int, int]:
    """``(OW padded, vectors per tile)`` of :func:`schedule_depthwise`: the output row padded to whole vectors,
    up to 4 of them accumulated at once (independent FMA chains over the taps)."""
    vectors = -(-int(ow) // int(lanes))
    per_tile = next(v for v in (4, 3, 2, 1) if vectors % v == 0)
    return vectors * int(lanes), per_tile


def schedule_depthwise(batch: int, channels: int, hp: int, wp: int, kernel, stride: int, out_hw, *, bias: bool,
                       activation=None, lanes: int) -> tvm.s_tir.Schedule:
    """The depthwise conv (:func:`sparsecc.codegen.dense.dense_depthwise_conv`): (image, channel, output row)
    in parallel; per row, tiles of :func:`depthwise_tile` vectors of output columns kept in registers over the
    unrolled taps, with the bias and activation applied as the tile is written. ``out_hw[1]`` must be a whole
    number of tiles (callers pad the output row with :func:`depthwise_tile`)."""
    from sparsecc.codegen.dense import DENSE_BLOCKS, dense_depthwise_conv

    ow = int(out_hw[1])
    _, per_tile = depthwise_tile(ow, lanes)
    if ow % (per_tile * lanes):
        raise KernelBuildError(f"depthwise conv: OW = {ow} is not a whole number of {per_tile} x {lanes} tiles")
    func = dense_depthwise_conv(batch, channels, hp, wp, kernel, stride, out_hw, bias=bias, activation=activation)
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock(DENSE_BLOCKS["compute"])
    n, ch, i, j, r, q = sch.get_loops(blk)
    jo, jv, ji = sch.split(j, [None, per_tile, lanes])
    sch.reorder(n, ch, i, jo, r, q, jv, ji)
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(tile, jo)
    sch.reverse_compute_inline(sch.get_sblock(DENSE_BLOCKS["epilogue"]))
    sch.parallel(sch.fuse(n, ch, i))
    sch.vectorize(ji)
    sch.unroll(jv)
    sch.unroll(q)
    sch.unroll(r)
    out = sch.get_loops(tile)
    sch.vectorize(out[-1])
    init = sch.decompose_reduction(blk, r)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


def _schedule_gemm(func, m: int, p: DenseParams) -> tvm.s_tir.Schedule:
    """The register-tiled schedule of :func:`schedule_dense` on a template with blocks ``DENSE_BLOCKS`` whose
    compute loops are ``(batch..., i, j, k)``: ``i`` the ``m`` rows, ``j`` the panel columns."""
    from sparsecc.codegen.dense import DENSE_BLOCKS

    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock(DENSE_BLOCKS["compute"])
    *outer, i, j, r = sch.get_loops(blk)
    groups = m // p.mr
    g = p.row_group if groups % p.row_group == 0 else 1
    io, ib, ii = sch.split(i, [groups // g, g, p.mr])
    jo, ji = sch.split(j, [None, p.nb])
    ro, ri = sch.split(r, [None, p.k_unroll])
    sch.reorder(*outer, io, jo, ib, ro, ri, ii, ji)
    tile = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(tile, ib)
    sch.reverse_compute_inline(sch.get_sblock(DENSE_BLOCKS["epilogue"]))
    sch.parallel(sch.fuse(*outer, io, jo))  # before decompose_reduction: the init block breaks the parallel check
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.unroll(ri)
    out = sch.get_loops(tile)
    sch.vectorize(out[-1])
    sch.unroll(out[-2])
    init = sch.decompose_reduction(blk, ro)
    li = sch.get_loops(init)
    sch.vectorize(li[-1])
    sch.unroll(li[-2])
    return sch


def schedule_linear(block, regime: str, *, bias: bool, activation=None, target=None,
                    params: ScheduleParams | None = None, k: int | None = None) -> tvm.s_tir.Schedule:
    """Template + the first applicable rule for ``(block, regime)``."""
    if regime not in REGIMES:
        raise KernelBuildError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    params = params or default_params(tuple(block), regime)
    func = template_for(block, regime, bias=bias, activation=activation, params=params, k=k)
    return apply_rules(RULES, func, target, params)


def build(mod_or_sch, target=None):
    """``tvm.compile`` for the host (or given) target; errors become KernelBuildError."""
    mod = mod_or_sch.mod if isinstance(mod_or_sch, tvm.s_tir.Schedule) else mod_or_sch
    target = target or host_target()
    try:
        return tvm.compile(mod, target=target)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise KernelBuildError(f"TVM build failed for target {target}: {e}") from e


class X86Target(Target):
    """The host x86-64 CPU (AVX2/AVX-512 picked from the detected CPU by TVM's LLVM backend).

    Builds CSR, BSR and N:M linears and CSR/BSR convs, times kernels on this host (formats
    are chosen by measurement, the cost model is calibrated here).
    """

    name = "x86"
    kind = "x86"
    layer_formats = {"linear": frozenset({"csr", "bsr", "nm", "xcsr"}), "conv2d": frozenset({"csr", "bsr", "xcsr"})}
    can_time_kernels = True

    def __init__(self):
        from sparsecc.targets import x86_conv, x86_nm, x86_xcsr

        self.rules = RULES + x86_nm.NM_RULES + x86_conv.CONV_RULES + x86_xcsr.XCSR_RULES

    def tvm_target(self):
        """The detected host CPU (:func:`host_target`)."""
        return host_target()

    def describe(self) -> str:
        return f"{self.name} ({self.tvm_target().attrs.get('mcpu', 'generic')})"

    def cache_key(self) -> str:
        return f"{self.name}|{self.tvm_target()}|tvm {tvm.__version__}"

    def kernel_params(self, family: str, regime: str, **shape):
        """Hand-picked tiles: ``"linear"`` (``block=``), ``"nm"``, ``"conv"`` (``block=``, ``layout=``), ``"xcsr"``,
        ``"dense"`` (``m=``, ``k=``: :func:`dense_params`)."""
        from sparsecc.targets import x86_conv, x86_nm, x86_xcsr

        if family == "linear":
            return default_params(tuple(shape["block"]), regime)
        if family == "dense":
            return dense_params(shape["m"], shape["k"], *host_vector_file())
        if family == "nm":
            return x86_nm.default_nm_params(regime, target=self.tvm_target())
        if family == "conv":
            return x86_conv.default_conv_params(tuple(shape["block"]), shape.get("layout", "nhwc"))
        if family == "xcsr":
            return x86_xcsr.host_xcsr_params(regime)
        return super().kernel_params(family, regime, **shape)

    def build(self, mod):
        return build(mod, self.tvm_target())
