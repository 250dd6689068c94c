"""Torch-free loading of host artifacts written by ``cm.export(path)``: the TVM runtime and numpy only.

``load(path)`` (also ``sparsecc.load`` and ``sparsecc.runtime.load``) checks the manifest and every file's
SHA-256, loads ``model.so`` into a Relax VM and ``params.bin`` into TVM tensors, and returns an
:class:`ExportedModule`. Called with numpy arrays it returns numpy arrays; called with torch tensors it returns
torch tensors (torch is then already imported by the caller; this module never imports it).

The console entry point ``sparsecc-runtime ARTIFACT_DIR --inputs in.npz --out out.npz`` (:func:`main`) runs an
artifact on the arrays of an ``.npz`` file (positional inputs in the file's order) and writes the output leaves
as ``out0``, ``out1``, ...

Manifest output tree (``output_tree``): a small JSON tree of the model's output structure, ``{"leaf": i}``
(output ``i``), ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": [[key, subtree], ...]}`` or ``null``
(a ``None`` output).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from sparsecc.errors import ArtifactError, InputDtypeError, InputShapeError, InvalidArgumentError

__all__ = ["ExportedModule", "FORMAT_VERSION", "load", "main", "read_manifest", "tree_flatten", "tree_unflatten",
           "use_threads"]

#: 2: ``output_tree`` is a JSON tree (1 held a torch pytree spec string); inputs may list ``fixed_dims``
FORMAT_VERSION = 2
FILES = ("model.so", "params.bin", "manifest.json")
#: the files :func:`load` opens besides the manifest: each must be listed in it with its hash
OPENED = ("model.so", "params.bin")

_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


# -- output tree ---------------------------------------------------------------------------------------------


def tree_flatten(obj) -> tuple:
    """``(leaves, tree)`` of a nest of tuples, lists, dicts (str/int keys) and array-like leaves.

    A leaf is anything with a ``shape`` (numpy array, torch tensor); ``None`` is kept in the tree.

    Raises
    ------
    ArtifactError
        A value that is neither a container, ``None`` nor an array (named by its type).
    """
    leaves: list = []

    def enc(o):
        if o is None:
            return None
        if hasattr(o, "shape") and hasattr(o, "dtype"):
            leaves.append(o)
            return {"leaf": len(leaves) - 1}
        if isinstance(o, tuple):
            return {"tuple": [enc(v) for v in o]}
        if isinstance(o, list):
            return {"list": [enc(v) for v in o]}
        if isinstance(o, dict):
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in o):
                raise ArtifactError(f"model output dict keys must be str or int to be exported, got {list(o)!r}")
            return {"dict": [[k, enc(v)] for k, v in o.items()]}
        raise ArtifactError(f"model output of type {type(o).__name__} cannot be exported (expected tensors in "
                            "tuples, lists and dicts)")

    return leaves, enc(obj)


def _tree_leaves(tree, where: str) -> int:
    """Number of leaves of ``tree`` after checking its structure; ``where`` names it in the error."""
    if tree is None:
        return 0
    if isinstance(tree, dict) and len(tree) == 1:
        (kind, v), = tree.items()
        if kind == "leaf" and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return 1
        if kind in ("tuple", "list") and isinstance(v, list):
            return sum(_tree_leaves(s, where) for s in v)
        if kind == "dict" and isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
            return sum(_tree_leaves(s, where) for _, s in v)
    raise ArtifactError(f"{where} is not an output tree (leaf/tuple/list/dict nodes), got {tree!r}")


def tree_unflatten(leaves: list, tree):
    """The nest ``tree`` (from :func:`tree_flatten`) with its leaf indices replaced by ``leaves``."""
    if tree is None:
        return None
    (kind, v), = tree.items()
    if kind == "leaf":
        return leaves[v]
    if kind == "tuple":
        return tuple(tree_unflatten(leaves, s) for s in v)
    if kind == "list":
        return [tree_unflatten(leaves, s) for s in v]
    return {k: tree_unflatten(leaves, s) for k, s in v}


# -- manifest ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path) -> dict:
    """Manifest of an artifact folder after checking every file exists and matches its SHA-256.

    Raises
    ------
    ArtifactError
        Missing folder or file, unreadable manifest, a file whose hash differs (corrupt or replaced), or a
        format version this sparsecc does not read. The message names the file.
    """
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise ArtifactError(f"{mf} is missing: {path} is not a sparsecc export folder")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{mf} is corrupt: {e}") from e
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {version}, this sparsecc reads {FORMAT_VERSION} "
                            "(export the model again with this sparsecc)")
    if not isinstance(files, dict):
        raise ArtifactError(f"{mf}: field 'files' must map file names to SHA-256 digests, got {type(files).__name__}")
    unlisted = [f for f in OPENED if f not in files]
    if unlisted:  # never open a file whose hash was not checked
        raise ArtifactError(f"{mf}: field 'files' does not list {', '.join(unlisted)} (every file load opens "
                            "must carry its SHA-256)")
    for name, digest in files.items():
        f = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{mf}: field 'files' names {name!r}, not a file of the export folder")
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the export folder")
        if _sha256(f) != digest:
            raise ArtifactError(f"{f} is corrupt (its SHA-256 differs from the manifest's)")
    _check_signature(manifest, mf)
    return manifest


def _check_signature(manifest: dict, mf: Path) -> None:
    """The fields :func:`load` trusts (target, input specs, output tree), checked before anything is opened.

    Raises
    ------
    ArtifactError
        A missing or malformed field; the message names the file and the field.
    """
    target = manifest.get("target")
    if not isinstance(target, dict) or not isinstance(target.get("name"), str) or not isinstance(target.get("arch"), str):
        raise ArtifactError(f"{mf}: field 'target' must hold the strings 'name' and 'arch', got {target!r}")
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ArtifactError(f"{mf}: field 'inputs' must be a non-empty list of input specs, got {inputs!r}")
    for i, spec in enumerate(inputs):
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ArtifactError(f"{mf}: field 'inputs[{i}].shape' must be a list of sizes ≥ 0, got {shape!r}")
        if spec.get("dtype") not in _DTYPES:
            raise ArtifactError(f"{mf}: field 'inputs[{i}].dtype' is {spec.get('dtype')!r}, expected one of "
                                f"{sorted(_DTYPES)}")
        fixed = spec.get("fixed_dims", [])
        if not (isinstance(fixed, list) and all(isinstance(d, int) and 0 <= d < len(shape) for d in fixed)):
            raise ArtifactError(f"{mf}: field 'inputs[{i}].fixed_dims' must list dims of the input, got {fixed!r}")
    outputs = manifest.get("outputs")
    n = _tree_leaves(manifest.get("output_tree"), f"{mf}: field 'output_tree'")
    if not isinstance(outputs, list) or len(outputs) != n:
        raise ArtifactError(f"{mf}: field 'outputs' must list the {n} outputs of field 'output_tree', got "
                            f"{outputs!r}")


# -- the loaded artifact ---------------------------------------------------------------------------------------


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _as_numpy(a, i: int) -> np.ndarray:
    if _is_torch(a):
        return a.detach().cpu().contiguous().numpy()
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a)
    raise InputDtypeError(f"input {i}: expected a numpy array or a torch tensor, got {type(a).__name__}")


class ExportedModule:
    """A host artifact loaded with :func:`load`.

    Call it with the exported inputs (numpy arrays, or torch tensors) of the manifest's shapes and dtypes; it
    returns the model's output structure of numpy arrays, or of torch tensors when any input was a torch tensor.

    Attributes
    ----------
    path : Path
    manifest : dict
    level : int
        The activation-routing level in use (0 without routing).
    """

    def __init__(self, path: Path, manifest: dict):
        import tvm
        from tvm import relax

        from sparsecc.targets.qemu import read_tensors

        self.path, self.manifest = path, manifest
        try:
            lib = tvm.runtime.load_module(str(path / "model.so"))
        except Exception as e:
            raise ArtifactError(f"{path / 'model.so'} cannot be loaded: {e}") from e
        self._vm = relax.VirtualMachine(lib, tvm.cpu())
        try:
            self._params = [tvm.runtime.tensor(a) for a in read_tensors(path / "params.bin")]
        except Exception as e:  # noqa: BLE001 - hash-checked, so written by another version or by hand
            raise ArtifactError(f"{path / 'params.bin'} cannot be read: {e}") from e
        self._tree = manifest["output_tree"]
        try:
            arity = int(self._vm._get_function_arity("main"))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{path / 'model.so'} has no function 'main': {e}") from e
        want = len(manifest["inputs"]) + len(self._params)
        if arity != want:  # an edited manifest (or params.bin) that no longer matches the library
            raise ArtifactError(f"{path / 'manifest.json'}: field 'inputs' lists {len(manifest['inputs'])} inputs and "
                                f"params.bin holds {len(self._params)} tensors, but {path / 'model.so'}'s main takes "
                                f"{arity} arguments")
        self._gates = self._read_routing(manifest.get("routing"), path / "manifest.json")
        self.level = 0

    def _read_routing(self, routing, mf: Path) -> list:
        """``[(param index, [tensor per level])]`` (thresholds and biases) from the manifest's ``routing`` field."""
        import tvm

        if routing is None:
            return []
        try:
            levels = int(routing["levels"])
            gates = []
            for g in routing["gates"]:
                i, ths = int(g["param"]), [float(t) for t in g["thresholds"]]
                if not 0 <= i < len(self._params) or tuple(self._params[i].shape) != (1,) or len(ths) != levels:
                    raise ValueError(f"gate {g.get('layer')!r}: parameter {i} / {len(ths)} thresholds do not match "
                                     f"the artifact")
                gates.append((i, [tvm.runtime.tensor(np.array([t], dtype=np.float32)) for t in ths]))
                j, bs = int(g["bias_param"]), [np.asarray(b, dtype=np.float32) for b in g["biases"]]
                if not 0 <= j < len(self._params) or len(bs) != levels or any(
                        b.shape != tuple(self._params[j].shape) for b in bs):
                    raise ValueError(f"gate {g.get('layer')!r}: bias parameter {j} / {len(bs)} biases do not match "
                                     f"the artifact")
                gates.append((j, [tvm.runtime.tensor(b) for b in bs]))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{mf}: field 'routing' is malformed: {e}") from e
        return gates

    @property
    def num_levels(self) -> int:
        """Routing levels the artifact holds (1 without activation routing)."""
        return len(self._gates[0][1]) if self._gates else 1

    def set_level(self, level: int) -> None:
        """Use the gate thresholds of ``level`` from the next call on (no rebuild: the thresholds are parameters).

        Raises
        ------
        InvalidArgumentError
            ``level`` outside ``[0, num_levels)``.
        """
        n = self.num_levels
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < n:
            raise InvalidArgumentError(f"level must be an int in [0, {n}), got {level!r}")
        for i, per_level in self._gates:
            self._params[i] = per_level[level]
        self.level = level

    def check_inputs(self, args) -> list:
        """The inputs as contiguous numpy arrays, after checking their number, shapes and dtypes.

        Raises
        ------
        InputShapeError
            Wrong number of inputs or a wrong shape; the message names the input, the expected shape and which
            dims were dynamic in the compiled module but are fixed in the artifact.
        InputDtypeError
            Wrong dtype, or an input that is neither a numpy array nor a torch tensor.
        """
        specs = self.manifest["inputs"]
        if len(args) != len(specs):
            raise InputShapeError(f"{self.path}: expected {len(specs)} inputs, got {len(args)}")
        xs = []
        for i, (a, s) in enumerate(zip(args, specs)):
            x = _as_numpy(a, i)
            if list(x.shape) != s["shape"]:
                fixed = s.get("fixed_dims") or []
                note = (f"; dim {', '.join(map(str, fixed))} {'was' if len(fixed) == 1 else 'were'} dynamic in the "
                        f"compiled module but {'is' if len(fixed) == 1 else 'are'} fixed in this artifact (export "
                        "again with example_inputs= of the shape you need)") if fixed else ""
                raise InputShapeError(f"input {i}: expected shape {tuple(s['shape'])}, got {tuple(x.shape)}{note}")
            dt = str(a.dtype).replace("torch.", "") if _is_torch(a) else x.dtype.name
            if dt != s["dtype"]:
                raise InputDtypeError(f"input {i}: expected dtype {s['dtype']}, got {dt}")
            xs.append(x)
        return xs

    def __call__(self, *args, level: int | None = None):
        """Run the artifact.

        Parameters
        ----------
        *args : numpy.ndarray or torch.Tensor
            The exported positional inputs, of the manifest's shapes and dtypes.
        level : int, optional
            Activation-routing level for this call only.

        Returns
        -------
        The model's output structure of numpy arrays (torch tensors if any input was a torch tensor).

        Raises
        ------
        InputShapeError, InputDtypeError
            See :meth:`check_inputs`.
        """
        import tvm

        if level is not None:
            before = self.level
            self.set_level(level)
            try:
                return self(*args)
            finally:
                self.set_level(before)
        xs = [tvm.runtime.tensor(x) for x in self.check_inputs(args)]
        out = self._vm["main"](*xs, *self._params)
        leaves = [t.numpy() for t in _flatten_result(out)]
        if any(_is_torch(a) for a in args):
            torch = sys.modules["torch"]
            leaves = [torch.from_numpy(t) for t in leaves]
        return tree_unflatten(leaves, self._tree)

    def __repr__(self) -> str:
        return f"ExportedModule({str(self.path)!r}, target={self.manifest['target']['name']!r})"


def _flatten_result(out) -> list:
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    res = []
    for o in out:
        res += _flatten_result(o)
    return res


def use_threads(threads: int | None = None) -> int:
    """Set the size of TVM's CPU thread pool for the artifacts of this process; returns it.

    TVM sizes its pool, when it first starts, from ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else *half*
    the logical CPUs on x86 (it assumes two hyper-threads per core): on a 2-core VM without SMT an exported
    model ran on one core. ``threads=None`` keeps an explicit ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` and
    otherwise takes every CPU this process may run on (``os.sched_getaffinity``). Only a pool not yet started
    takes a new size.

    Raises
    ------
    InvalidArgumentError
        ``threads`` < 1.
    """
    if threads is not None:
        if int(threads) < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    elif "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["TVM_NUM_THREADS"] = str(max(1, cpus))
    return int(os.environ.get("TVM_NUM_THREADS") or os.environ["OMP_NUM_THREADS"])


def load(path, threads: int | None = None) -> ExportedModule:
    """Load a host artifact written by ``cm.export(path)`` (torch-free: TVM runtime and numpy).

    Parameters
    ----------
    path : str or Path
        The artifact folder (``model.so``, ``params.bin``, ``manifest.json``).
    threads : int, optional
        CPU threads of TVM's pool (:func:`use_threads`; default: every CPU this process may use, unless
        ``TVM_NUM_THREADS`` or ``OMP_NUM_THREADS`` says otherwise).

    Returns
    -------
    ExportedModule

    Raises
    ------
    ArtifactError
        Missing or corrupt file (named), or an artifact built for another architecture (use
        :func:`sparsecc.runtime.export.run_artifact_under_qemu` for aarch64 ones).
    """
    path = Path(path)
    manifest = read_manifest(path)
    arch = manifest["target"].get("arch")
    if arch != platform.machine():
        raise ArtifactError(f"{path} was built for {arch}, this host is {platform.machine()}; "
                            "run aarch64 artifacts with sparsecc.runtime.export.run_artifact_under_qemu")
    use_threads(threads)
    return ExportedModule(path, manifest)


# -- console entry point -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``sparsecc-runtime ARTIFACT_DIR --inputs in.npz --out out.npz``: run an artifact without torch.

    The arrays of ``in.npz`` are the positional inputs, in the file's order (``np.savez(f, x)`` names them
    ``arr_0``, ...); the output leaves are written to ``out.npz`` as ``out0``, ``out1``, ... in the manifest's
    order. Returns the exit status (0; 2 on a sparsecc error, whose message goes to stderr).
    """
    import argparse

    from sparsecc.errors import SparseccError

    p = argparse.ArgumentParser(prog="sparsecc-runtime", description="Run a sparsecc export folder on the inputs "
                                "of an .npz file (TVM runtime and numpy only).")
    p.add_argument("artifact", help="export folder written by cm.export(path)")
    p.add_argument("--inputs", required=True, help=".npz file of the positional inputs, in order")
    p.add_argument("--out", required=True, help=".npz file to write the outputs to (out0, out1, ...)")
    p.add_argument("--level", type=int, default=None, help="activation-routing level (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every CPU this process may "
                   "use, unless TVM_NUM_THREADS or OMP_NUM_THREADS is set)")
    a = p.parse_args(argv)
    try:
        try:
            with np.load(a.inputs, allow_pickle=False) as f:
                xs = [f[k] for k in f.files]
        except (OSError, ValueError) as e:
            raise ArtifactError(f"--inputs {a.inputs} cannot be read as an .npz file: {e}") from e
        mod = load(a.artifact, threads=a.threads)
        leaves, _ = tree_flatten(mod(*xs, level=a.level))
        np.savez(a.out, **{f"out{i}": t for i, t in enumerate(leaves)})
    except SparseccError as e:
        print(f"sparsecc-runtime: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
