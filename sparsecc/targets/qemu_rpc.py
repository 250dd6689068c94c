"""An aarch64 TVM RPC server under ``qemu-aarch64``, registered with a TVM RPC tracker like a board.

TVM users time kernels on phones and boards through an RPC tracker: each device
runs ``rpc_server --tracker HOST:PORT --key KEY``, and a tuner asks the tracker
for a device of that key. Without a board, :class:`QemuRPCServer` stands in for
one: it listens on a local port, registers that port with the tracker under its
key and answers TVM's handshake (``tvm.rpc.server``'s protocol: magic, client key,
server key); each accepted session is then served by an aarch64 process,
``arm_rpc_session.cc`` cross-compiled against the aarch64 ``libtvm_runtime.so``
of the registry wheel and run under qemu-aarch64 with the socket handed over.
Uploaded libraries are loaded and timed (``time_evaluator``) by that aarch64
runtime: the session is TVM's own, only the listening part runs on the host.

Times measured this way are emulation times (qemu translates every NEON
instruction): they exercise the plumbing (tracker, upload, remote timing,
records), never a prediction of a real core's latency.

Command line (one server, until interrupted)::

    python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port 9190 &
    python -m sparsecc.targets.qemu_rpc --tracker 127.0.0.1:9190 --key arm
"""

from __future__ import annotations

import argparse
import logging
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from sparsecc.errors import ToolchainError

__all__ = ["QemuRPCServer", "main"]

log = logging.getLogger("sparsecc.qemu_rpc")


def parse_address(text: str, default_port: int = 9190) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)`` (``"host"`` alone: ``default_port``).

    Raises
    ------
    ToolchainError
        The port is not an integer.
    """
    host, _, port = str(text).rpartition(":")
    if not host:
        return str(text), default_port
    try:
        return host, int(port)
    except ValueError as e:
        raise ToolchainError(f"bad address {text!r}: expected host:port") from e


class QemuRPCServer:
    """One emulated aarch64 device serving TVM RPC sessions, registered with a tracker.

    Parameters
    ----------
    tracker : str or (str, int)
        The tracker's address (``"127.0.0.1:9190"``).
    key : str
        Device key clients request (``tracker.request(key)``).
    host : str
        Address to listen on (loopback by default).
    port, port_end : int
        First free port in ``[port, port_end)`` is used.
    session_timeout_s : float
        A session running longer is killed (the client gets a closed connection).
    threads : int, optional
        ``TVM_NUM_THREADS`` of the emulated runtime.

    Use as a context manager (or :meth:`start` / :meth:`stop`); :attr:`sessions` counts served sessions.

    Raises
    ------
    ToolchainError
        The toolchain or the session program could not be built, the tracker cannot be reached, or no
        port in the range is free.
    """

    def __init__(self, tracker, key: str = "arm", *, host: str = "127.0.0.1", port: int = 9090,
                 port_end: int = 9199, session_timeout_s: float = 600.0, threads: int | None = None):
        from sparsecc.targets.qemu import RPC_SESSION_SRC, build_harness
        from sparsecc.targets.toolchain import aarch64_toolchain

        self.tracker = tracker if isinstance(tracker, tuple) else parse_address(tracker)
        self.key = str(key)
        self.session_timeout_s = float(session_timeout_s)
        self.threads = threads
        self.sessions = 0
        self._tc = aarch64_toolchain()
        self._exe = build_harness(self._tc, RPC_SESSION_SRC)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.host, self.port = host, None
        for p in range(int(port), int(port_end)):
            try:
                self._sock.bind((host, p))
            except OSError:
                continue
            self.port = p
            break
        if self.port is None:
            self._sock.close()
            raise ToolchainError(f"no free port in [{port}, {port_end}) on {host} for the RPC server")
        self._sock.listen(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracker_sock: socket.socket | None = None
        self.error: BaseException | None = None

    # -- tracker protocol (tvm.rpc.tracker: magic, then length-prefixed JSON messages) ---------------------
    def _tracker_call(self, msg):
        from tvm.rpc import base

        base.sendjson(self._tracker_sock, msg)
        return base.recvjson(self._tracker_sock)

    def _register(self) -> str:
        """Connect to the tracker if needed and put this device there under a fresh match key."""
        from tvm.rpc import base
        from tvm.rpc.base import TrackerCode

        if self._tracker_sock is None:
            try:
                s = socket.create_connection(self.tracker, timeout=10)
            except OSError as e:
                raise ToolchainError(f"RPC tracker {self.tracker[0]}:{self.tracker[1]} cannot be reached: {e}") from e
            s.settimeout(30)
            s.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(s, 4))[0] != base.RPC_TRACKER_MAGIC:
                s.close()
                raise ToolchainError(f"{self.tracker[0]}:{self.tracker[1]} is not a TVM RPC tracker")
            self._tracker_sock = s
            if self._tracker_call([TrackerCode.UPDATE_INFO, {"key": "server:" + self.key,
                                                             "addr": [None, self.port]}]) != TrackerCode.SUCCESS:
                raise ToolchainError("the RPC tracker refused this server's info")
        matchkey = base.random_key(self.key)
        if self._tracker_call([TrackerCode.PUT, self.key, [self.port, matchkey], None]) != TrackerCode.SUCCESS:
            raise ToolchainError("the RPC tracker refused to register this server")
        return matchkey

    def _accept(self, matchkey: str, ping_s: float = 1.0):
        """Wait for the client the tracker sent (handshake done) or the stop flag; re-register a stale key."""
        from tvm.rpc import base
        from tvm.rpc.base import TrackerCode

        unmatched = 0
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], ping_s)
            if not ready:
                pending = self._tracker_call([TrackerCode.GET_PENDING_MATCHKEYS])
                unmatched = 0 if matchkey in pending else unmatched + 1
                if unmatched * ping_s > 6.0:  # handed to a client that never came: offer the device again
                    matchkey, unmatched = self._register(), 0
                continue
            conn, _ = self._sock.accept()
            conn.settimeout(30)
            try:
                magic = struct.unpack("<i", base.recvall(conn, 4))[0]
                if magic != base.RPC_MAGIC:
                    conn.close()
                    continue
                keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
                words = base.recvall(conn, keylen).decode("utf-8").split()
                if not words or words[0] != "client:" + matchkey:
                    conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
                    conn.close()
                    continue
                server_key = ("server:" + self.key).encode("utf-8")
                conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS) + struct.pack("<i", len(server_key))
                             + server_key)
            except OSError:
                conn.close()
                continue
            conn.settimeout(None)
            return conn
        return None

    def _serve(self, conn: socket.socket) -> None:
        """Hand the connected socket to one aarch64 session process under qemu; wait for it."""
        work = tempfile.mkdtemp(prefix="sparsecc-rpc-")
        cmd = [str(self._tc.qemu), "-L", str(self._tc.sysroot)]
        if self.threads is not None:
            cmd += ["-E", f"TVM_NUM_THREADS={int(self.threads)}"]
        cmd += [str(self._exe), str(conn.fileno()), work]
        try:
            with tempfile.TemporaryFile(mode="w+") as err:
                proc = subprocess.Popen(cmd, pass_fds=(conn.fileno(),), stdout=subprocess.DEVNULL, stderr=err)
                end = time.monotonic() + self.session_timeout_s
                while proc.poll() is None:  # until the client closes the session, stop(), or the time limit
                    if self._stop.is_set() or time.monotonic() > end:
                        proc.kill()
                        if not self._stop.is_set():
                            log.warning("RPC session ran past %.0f s and was killed", self.session_timeout_s)
                    try:
                        proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
                if proc.returncode not in (0, -9):
                    err.seek(0)
                    log.warning("aarch64 RPC session exited %s: %s", proc.returncode, err.read().strip()[-500:])
            self.sessions += 1
        finally:
            conn.close()
            shutil.rmtree(work, ignore_errors=True)

    def _loop(self, matchkey: str) -> None:
        try:
            while not self._stop.is_set():
                conn = self._accept(matchkey)
                if conn is not None:
                    self._serve(conn)
                if not self._stop.is_set():
                    matchkey = self._register()
        except BaseException as e:  # noqa: BLE001 - kept for stop() / the caller
            if not self._stop.is_set():
                self.error = e
                log.error("qemu RPC server stopped: %s", e)

    def start(self) -> "QemuRPCServer":
        """Register with the tracker (raising here when it cannot be reached) and serve in a background thread."""
        matchkey = self._register()
        self._thread = threading.Thread(target=self._loop, args=(matchkey,), name=f"qemu-rpc-{self.key}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (a running session is killed) and close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for s in (self._tracker_sock, self._sock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self) -> "QemuRPCServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    """``python -m sparsecc.targets.qemu_rpc --tracker HOST:PORT --key KEY``: serve until interrupted."""
    ap = argparse.ArgumentParser(prog="python -m sparsecc.targets.qemu_rpc", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracker", required=True, help="RPC tracker address, host:port")
    ap.add_argument("--key", default="arm", help="device key (default: arm)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--threads", type=int, default=None, help="TVM_NUM_THREADS of the emulated runtime")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        server = QemuRPCServer(args.tracker, args.key, host=args.host, port=args.port, threads=args.threads).start()
    except ToolchainError as e:
        print(f"error: {e}")
        return 1
    print(f"aarch64 (qemu) RPC server on {args.host}:{server.port}, key {args.key!r}, tracker {args.tracker}",
          flush=True)
    try:
        while server._thread.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    if server.error is not None:
        print(f"error: {server.error}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
