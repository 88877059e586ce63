"""The runtime's public face: `Runtime(settings).run(spec, rootfs) -> RunResult`.

A Runtime owns one helper process (sandbox.helper), started once and reused for every run: a
fresh small interpreter, so the per-run cost does not grow with the caller's size (forking a
200 MB worker costs milliseconds; the helper's clone costs the same whatever the caller is).
The runtime maps the helper's user namespace with newuidmap/newgidmap, once per start.

`run` may be called from several threads at once; a reader thread hands each reply to the
caller waiting for it. If the helper dies, waiting runs end as INTERNAL_ERROR and the next run
starts a new helper.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading

import msgspec

from sandbox import userns
from sandbox.config import RuntimeSettings
from sandbox.errors import InvalidSpec, NetworkError, SetupError
from sandbox.network import check_members
from sandbox.protocol import (Hello, KillRequest, Mapped, NetAttach, NetworkInfo,
                              NetworkRequest, OpReply, ProbeRequest, Ready, RunReply, RunRequest,
                              encode, recv_message)
from sandbox.plans import Bind
from sandbox.spec import Rootfs, RunResult, RunSpec, Verdict, check_absolute_path, validate_spec
from sandbox.volumes import VolumeBind

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Pending:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: RunResult | None = None
        self.reply: OpReply | None = None  # network and probe requests


class Runtime:
    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        self.settings = settings or RuntimeSettings()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._keys = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._info: dict[str, str] = {}
        self._closed = False
        self._start()

    # -- helper life --------------------------------------------------------------------------

    def _start(self) -> None:
        mapping = userns.plan_mapping(self.settings.userns)
        for path in (self.settings.state_dir, self.settings.scratch_dir):
            os.makedirs(path, mode=0o711, exist_ok=True)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": _PACKAGE_ROOT,
               "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.helper", str(child_sock.fileno()),
                 msgspec.json.encode(self.settings).decode()],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, env=env,
                cwd="/")
        finally:
            child_sock.close()
        try:
            hello = recv_message(parent_sock)
            if not isinstance(hello, Hello):
                raise SetupError("helper did not start", stage="helper")
            try:
                userns.write_helper_maps(hello.pid, mapping)
            except SetupError as exc:
                parent_sock.sendall(encode(Mapped(False, exc.message)))
                raise
            parent_sock.sendall(encode(Mapped(True)))
            ready = recv_message(parent_sock)
            if not isinstance(ready, Ready):
                raise SetupError("helper failed while starting", stage="helper")
        except BaseException:
            parent_sock.close()
            self._proc.kill()
            self._proc.wait()
            raise
        self._info = ready.info
        self._sock = parent_sock
        threading.Thread(target=self._read_loop, args=(parent_sock, self._proc),
                         name="sbx-runtime-reader", daemon=True).start()

    def _read_loop(self, sock: socket.socket, proc: subprocess.Popen) -> None:
        try:
            while True:
                msg = recv_message(sock)
                if msg is None:
                    break
                if isinstance(msg, (RunReply, OpReply)):
                    with self._lock:
                        pending = self._pending.pop(msg.key, None)
                    if pending is None:
                        continue
                    if isinstance(msg, RunReply):
                        pending.result = msg.result
                    else:
                        pending.reply = msg
                    pending.event.set()
        except (OSError, ConnectionError, msgspec.DecodeError):
            pass
        proc.wait()
        with self._lock:
            orphans, self._pending = self._pending, {}
            if self._sock is sock:
                self._sock = None
        sock.close()
        for pending in orphans.values():
            pending.result = RunResult(verdict=Verdict.INTERNAL_ERROR,
                                       message="the runtime helper exited during the run")
            pending.event.set()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sock, proc = self._sock, self._proc
            self._sock = None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ----------------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        return dict(self._info)

    @property
    def helper_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def new_key(self) -> str:
        return f"{os.getpid()}-{next(self._keys)}"

    def run(self, spec: RunSpec, rootfs: Rootfs, *, binds: tuple[Bind, ...] = (),
            diff_tar: str | None = None, key: str | None = None,
            volumes: tuple[VolumeBind, ...] = (), network: NetAttach | None = None) -> RunResult:
        """Run one container to completion. Raises InvalidSpec for a bad spec.

        `volumes` come from `VolumeStore.attach` (which holds their locks for the run);
        `network` puts a run whose spec says "private" on a network from `create_network`
        (without it such a run gets a network of its own)."""
        validate_spec(spec)
        for bind in binds:
            check_absolute_path(bind.target, field="volumes.path")
        if not rootfs.layers:
            raise SetupError("image has no layers", stage="rootfs")
        if spec.network == "egress" and not self.settings.egress:
            raise InvalidSpec("network 'egress' is disabled on this server", field="network")
        if network is not None and spec.network != "private":
            raise InvalidSpec("a run on a job network must ask for network 'private'",
                              field="network")
        if spec.network == "private" and network is None:
            return self._run_alone(spec, rootfs, binds, diff_tar, key, volumes)
        key = key or self.new_key()
        request = encode(RunRequest(key, spec, rootfs, binds, diff_tar, volumes, network))
        pending = self._exchange(key, request)
        if pending is None:
            return RunResult(verdict=Verdict.INTERNAL_ERROR,
                             message="the runtime helper is gone")
        assert pending.result is not None
        return pending.result

    def _exchange(self, key: str, request: bytes) -> "_Pending | None":
        """Send `request` and wait for the helper's answer to `key` (None: helper gone)."""
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise SetupError("runtime is closed", stage="helper")
            if self._sock is None:
                self._start()
            sock = self._sock
            self._pending[key] = pending
        try:
            with self._send_lock:
                sock.sendall(request)
        except OSError:
            with self._lock:
                self._pending.pop(key, None)
            return None
        pending.event.wait()
        return pending

    def _run_alone(self, spec, rootfs, binds, diff_tar, key, volumes) -> RunResult:
        member = spec.hostname.lower()
        net = self.create_network([member])
        try:
            return self.run(spec, rootfs, binds=binds, diff_tar=diff_tar, key=key,
                            volumes=volumes, network=NetAttach(net.id, member))
        finally:
            self.remove_network(net.id)

    def _call(self, make) -> OpReply:
        """Send the request `make(key)` and wait for its OpReply."""
        key = f"op-{self.new_key()}"
        pending = self._exchange(key, encode(make(key)))
        if pending is None:
            raise SetupError("the runtime helper is gone", stage="helper")
        if pending.reply is None:
            raise SetupError("the runtime helper exited", stage="helper")
        return pending.reply

    def create_network(self, members) -> NetworkInfo:
        """A private network for one job; `members` are the host names on it, in order of
        address (10.88.0.2, .3, ...). Pass `NetAttach(info.id, member)` to `run`."""
        members = check_members(members)
        net = f"n{self.new_key()}"
        reply = self._call(lambda key: NetworkRequest(key, "create", net, members))
        if not reply.ok:
            raise NetworkError(reply.message)
        values = dict(reply.values)
        return NetworkInfo(id=net, netns=int(values.pop("netns", "0")), addresses=values)

    def remove_network(self, network: str) -> None:
        """Drop a job network (containers still on it lose their link)."""
        reply = self._call(lambda key: NetworkRequest(key, "remove", network))
        if not reply.ok:
            raise NetworkError(reply.message)

    def probe(self, key: str, port: int) -> str:
        """"listening" once something in run `key`'s network namespace listens on TCP
        `port`, "waiting" before, "gone" when there is no such run (any more)."""
        reply = self._call(lambda op_key: ProbeRequest(op_key, key, port))
        return reply.values.get("state", "gone")

    def kill(self, key: str) -> None:
        """Kill the run started with `key`, if it is still running."""
        with self._lock:
            sock = self._sock
        if sock is not None:
            with self._send_lock:
                sock.sendall(encode(KillRequest(key)))
