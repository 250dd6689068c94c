"""Timing kernels on a remote device through TVM's RPC tracker.

TVM users measure on phones and boards this way: each device runs TVM's RPC
server registered with a tracker under a key (``"arm"``, ``"rk3399"``), and a
host asks the tracker for a device of that key, uploads a shared library built
for it, and times a function with ``time_evaluator`` on the device.
:class:`RPCDevice` names such a device; :meth:`RPCDevice.session` returns a
:class:`RemoteSession` that uploads each library once and times it.

Used by the cost-model calibration (:func:`sparsecc.tune.calibrate.calibrate_remote`,
``compile(target="arm", rpc=...)``) and by autotuning
(``sparsecc.tune(..., target="arm", rpc=...)``). Without a board,
:class:`sparsecc.targets.qemu_rpc.QemuRPCServer` serves an emulated aarch64 device.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsecc.errors import RPCError

__all__ = ["RPCDevice", "RemoteSession"]


@dataclass(frozen=True)
class RPCDevice:
    """A device reached through a TVM RPC tracker.

    Attributes
    ----------
    tracker : str
        ``"host:port"`` of the tracker (``python -m tvm.exec.rpc_tracker``).
    key : str
        Device key the servers registered with (``rpc_server --key``).
    priority : int
        Request priority at the tracker.
    session_timeout_s : float
        Asked of the server: a session running longer is closed (0: no limit).
    """

    tracker: str
    key: str
    priority: int = 1
    session_timeout_s: float = 0.0

    @classmethod
    def parse(cls, spec) -> "RPCDevice":
        """An :class:`RPCDevice` from itself, ``"host:port/key"`` or ``{"tracker": ..., "key": ...}``.

        Raises
        ------
        RPCError
            Another form (the message shows the expected one).
        """
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            try:
                return cls(**spec)
            except TypeError as e:
                raise RPCError(f"rpc={spec!r}: {e}") from e
        if isinstance(spec, str) and "/" in spec:
            tracker, key = spec.rsplit("/", 1)
            if tracker.rpartition(":")[2].isdigit() and key:
                return cls(tracker, key)
        raise RPCError(f"rpc={spec!r}: expected 'host:port/key' (a TVM RPC tracker and a device key)")

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.tracker.rpartition(":")
        return host, int(port)

    def describe(self) -> str:
        return f"device {self.key!r} of RPC tracker {self.tracker}"

    def check(self):
        """Connect to the tracker and check a server is registered under :attr:`key`; return the tracker session.

        Raises
        ------
        RPCError
            The tracker cannot be reached, or no server is registered under :attr:`key`.
        """
        from tvm import rpc

        host, port = self.address
        try:  # TVM's client retries a refused connection for a minute: fail at once instead
            socket.create_connection((host, port), timeout=10).close()
        except OSError as e:
            raise RPCError(f"RPC tracker {self.tracker} cannot be reached: {e}") from e
        try:
            tracker = rpc.connect_tracker(host, port)
            summary = tracker.summary()
        except Exception as e:  # noqa: BLE001 - socket errors, RuntimeError after retries
            raise RPCError(f"RPC tracker {self.tracker} cannot be reached: {e}") from e
        queue = summary.get("queue_info", {}).get(self.key) or {}
        if not _servers(summary, self.key) and not queue.get("free", 0):
            known = sorted(summary.get("queue_info", {}))
            raise RPCError(f"no RPC server is registered under key {self.key!r} at tracker {self.tracker} "
                           f"(keys there: {known})")
        return tracker

    def session(self) -> "RemoteSession":
        """Request the device from the tracker (waits while all its servers are busy).

        Raises
        ------
        RPCError
            The tracker cannot be reached, or no server is registered under :attr:`key`.
        """
        return RemoteSession(self)


class RemoteSession:
    """One RPC session on an :class:`RPCDevice`: upload, load and time shared libraries built for it.

    Parameters
    ----------
    device : RPCDevice

    Raises
    ------
    RPCError
        See :meth:`RPCDevice.session`.
    """

    def __init__(self, device: RPCDevice):
        self.device = device
        tracker = device.check()
        try:
            self.sess = tracker.request(device.key, priority=device.priority,
                                        session_timeout=device.session_timeout_s, max_retry=3)
        except Exception as e:  # noqa: BLE001
            raise RPCError(f"requesting {device.describe()} failed: {e}") from e
        self.dev = self.sess.cpu(0)
        self._modules: dict = {}

    def module(self, lib_path):
        """The remote module of a local shared library (uploaded and loaded once per content)."""
        path = Path(lib_path)
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)  # a file timed again is not read and hashed again
        if key not in self._modules:
            data = path.read_bytes()
            name = f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}.so"
            try:
                self.sess.upload(bytearray(data), name)
                self._modules[key] = self.sess.load_module(name)
            except Exception as e:  # noqa: BLE001
                raise RPCError(f"uploading {path} to {self.device.describe()} failed: {e}") from e
        return self._modules[key]

    def tensors(self, arrays) -> list:
        """Copies of numpy ``arrays`` on the device."""
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in arrays]

    def time_ms(self, lib_path, args, *, function: str = "main", number: int = 1, repeat: int = 5,
                min_repeat_ms: int = 0) -> list:
        """Times (ms) of ``repeat`` samples of ``number`` calls of ``function(*args)`` on the device.

        Parameters
        ----------
        lib_path : path
            A shared library built for the device (e.g. :func:`sparsecc.targets.arm.export_library`).
        args : list of numpy arrays or remote tensors
            The call's arguments, outputs included (destination passing); numpy arrays are copied over.
        number, repeat, min_repeat_ms
            As for ``time_evaluator``.

        Raises
        ------
        RPCError
            The call failed on the device.
        """
        mod = self.module(lib_path)
        remote = [a if not isinstance(a, np.ndarray) else self.tensors([a])[0] for a in args]
        try:
            f = mod.time_evaluator(function, self.dev, number=int(number), repeat=int(repeat),
                                   min_repeat_ms=int(min_repeat_ms))
            return [float(t) * 1e3 for t in f(*remote).results]
        except Exception as e:  # noqa: BLE001
            raise RPCError(f"timing {Path(lib_path).name} on {self.device.describe()} failed: {e}") from e

    def run(self, lib_path, args, *, function: str = "main") -> list:
        """Call ``function(*args)`` once on the device; return every argument read back (outputs included)."""
        mod = self.module(lib_path)
        remote = self.tensors(args)
        try:
            mod[function](*remote)
        except Exception as e:  # noqa: BLE001
            raise RPCError(f"running {Path(lib_path).name} on {self.device.describe()} failed: {e}") from e
        return [t.numpy() for t in remote]

    def close(self) -> None:
        """End the session (the server offers the device to the tracker again)."""
        self._modules.clear()
        self.sess = None
        self.dev = None

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _servers(summary: dict, key: str) -> list:
    return [s for s in summary.get("server_info", []) if s.get("key") == "server:" + key]
