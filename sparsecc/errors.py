"""Error hierarchy of sparsecc.

Every error sparsecc raises on bad user input derives from :class:`SparseccError`;
each subclass also inherits the matching builtin so ``except ValueError`` keeps
working for callers that do not know sparsecc.
"""

from __future__ import annotations


class SparseccError(Exception):
    """Base class of every error raised by sparsecc."""


class CaptureError(SparseccError, RuntimeError):
    """The model could not be captured by ``torch.export`` nor ``torch.fx``."""


class UnsupportedOpError(SparseccError, NotImplementedError):
    """An operation cannot be handled on the requested path."""


class InvalidSparsityError(SparseccError, ValueError):
    """A sparsity value, pattern or block shape is impossible."""


class UnknownLayerError(SparseccError, KeyError):
    """A layer name given by the user does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InputShapeError(SparseccError, ValueError):
    """A runtime input does not match the shape the module was compiled for."""


class InputDtypeError(SparseccError, TypeError):
    """A runtime input does not have the dtype the module was compiled for."""


class TargetError(SparseccError, ValueError):
    """A target name or description is not supported."""


class PassError(SparseccError, RuntimeError):
    """A compiler pass failed; the message names the pass and the passes run before."""


class KernelBuildError(SparseccError, RuntimeError):
    """A TVM kernel failed to build."""


class DatasetError(SparseccError, RuntimeError):
    """A dataset could not be fetched, read or parsed; the message names the file or package."""


class DataError(SparseccError, ValueError):
    """Training or calibration data does not fit the model (the message names the batch)."""


class TrainingError(SparseccError, RuntimeError):
    """Fine-tuning failed, e.g. the loss became NaN or infinite (the message names the step)."""


class AccuracyBudgetError(SparseccError, ValueError):
    """An accuracy budget cannot be met (the message gives the measured drops)."""


class InvalidArgumentError(SparseccError, ValueError):
    """An argument is outside what the function accepts (the message names the argument and the choices)."""


class ToolchainError(SparseccError, RuntimeError):
    """A cross toolchain, emulator or foreign runtime could not be fetched or run (the message names it)."""


class ArtifactError(SparseccError, RuntimeError):
    """An exported artifact folder is missing a file, holds a corrupt one, or would overwrite user files."""


class TargetUnavailableError(TargetError):
    """The target's device is not present here (e.g. ``target="cuda"`` without a GPU); the message says what to do."""


class RoutingError(SparseccError, ValueError):
    """Activation routing cannot apply: no feed-forward block in the model, or a routed layer inconsistent."""


class StructureError(SparseccError, RuntimeError):
    """Channels cannot be removed safely: the smaller model's graph differs from what the channel groups predict
    (the message names the node), or a removal would leave a layer without channels."""


class MlirError(SparseccError, RuntimeError):
    """An MLIR step of ``cm.to_mlir()`` (import, lowering, verification, sparsifier, execution) failed."""


class NotPicklableError(SparseccError, TypeError):
    """A compiled module holds TVM kernels, which cannot be pickled or deep-copied (save its ``state_dict``,
    or write a deployment folder with ``cm.export(path)``)."""


class TuningError(SparseccError, RuntimeError):
    """Autotuning failed, or a tuning database (``work_dir``) is missing or unreadable."""


class RPCError(SparseccError, RuntimeError):
    """A remote device could not be reached through its TVM RPC tracker (none registered under the key, tracker
    down), or a call on it (upload, load, timing) failed; the message names the tracker and key."""


# -- warnings: the result is right, but something the user should know happened ---------------------------


class SparseccWarning(UserWarning):
    """Base class of every warning sparsecc gives."""


class CacheWarning(SparseccWarning):
    """A cache entry was damaged (or unreadable) and was rebuilt or bypassed; the result is unaffected."""


class TrainModeWarning(SparseccWarning):
    """The model was in training mode; sparsecc compiled its inference (``eval()``) semantics."""


class FallbackWarning(SparseccWarning):
    """A graph given to the ``torch.compile`` backend runs in eager torch (nothing to prune, or it could not be
    compiled; the message says which)."""


class RemoteFallbackWarning(SparseccWarning):
    """The remote device given with ``rpc=`` could not be used; formats were chosen with the target's static
    roofline instead (the message says why)."""


class CalibrationWarning(SparseccWarning):
    """The cost model's calibration measured timings its kernels cannot take (a busy machine); it is used for
    this process only and not cached (the message names the kernels)."""


class PatternWarning(SparseccWarning):
    """The requested pattern could not be applied to some layers (e.g. a block shape that tiles none of them)."""
