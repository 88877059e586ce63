"""A job: the main container, and the service containers it talks to on a private network.

    services (each: a long-running run of its own, key "<job>/<name>")
      -> each service's TCP port accepts connections (probed in its network namespace)
      -> main container (key "<job>"), same network, reaches services by name
      -> every service killed, network removed (also when anything above fails)

`setup_time` on the result is the time from the start of the job to the main container's
start: network, service containers, and their readiness. A service that exits before it
listens, or does not listen in time, ends the job with SETUP_ERROR at stage "services"; its
own output is quoted in the message. Killing the job's key (Runtime.kill) kills its services
too, since the helper kills every run whose key starts with "<key>/".
"""

from __future__ import annotations

import threading
import time

import msgspec

from sandbox.errors import InvalidSpec
from sandbox.network import MEMBER_NAME
from sandbox.protocol import NetAttach
from sandbox.spec import Rootfs, RunResult, RunSpec, Verdict

READY_POLL = 0.005
"""Seconds between readiness probes of a service's port."""
READY_TIMEOUT = 30.0
"""Seconds services get, together, to listen (bounded also by each one's wall time)."""
MAX_SERVICES = 8


class Service(msgspec.Struct, frozen=True):
    """A service container of a job: its name on the network, what to run, and its port."""

    name: str
    spec: RunSpec
    rootfs: Rootfs
    port: int


def check_services(services, main_name: str) -> None:
    if len(services) > MAX_SERVICES:
        raise InvalidSpec(f"at most {MAX_SERVICES} services per run", field="services")
    names = [s.name for s in services]
    for i, svc in enumerate(services):
        if not MEMBER_NAME.match(svc.name):
            raise InvalidSpec(f"services[{i}].name: {svc.name!r} is not a valid host name "
                              "(a-z, 0-9 and '-')", field=f"services[{i}].name")
        if not 1 <= svc.port <= 65535:
            raise InvalidSpec(f"services[{i}].port: must be 1..65535", field=f"services[{i}].port")
    if len(set(names)) != len(names) or main_name in names:
        raise InvalidSpec("service names must differ from each other and from the main "
                          f"container's host name {main_name!r}", field="services")


def _tail(data: bytes, limit: int = 300) -> str:
    return data[-limit:].decode(errors="replace").strip()


def run_job(runtime, spec: RunSpec, rootfs: Rootfs, *, services=(), volumes=(),
            key: str | None = None, ready_timeout: float = READY_TIMEOUT) -> RunResult:
    """Run `spec` after its services are up; without services this is `runtime.run`."""
    if not services:
        return runtime.run(spec, rootfs, volumes=volumes, key=key)
    main_name = spec.hostname.lower()
    check_services(services, main_name)
    if spec.network != "private":
        raise InvalidSpec("a run with services needs network 'private'", field="network")
    key = key or runtime.new_key()
    started = time.monotonic()
    net = runtime.create_network([s.name for s in services] + [main_name])
    results: dict[str, RunResult] = {}
    threads: list[threading.Thread] = []
    try:
        for svc in services:
            svc_spec = msgspec.structs.replace(svc.spec, network="private", hostname=svc.name)

            def serve(svc=svc, svc_spec=svc_spec) -> None:
                results[svc.name] = runtime.run(svc_spec, svc.rootfs, key=f"{key}/{svc.name}",
                                                network=NetAttach(net.id, svc.name))

            thread = threading.Thread(target=serve, name=f"sbx-service-{svc.name}", daemon=True)
            thread.start()
            threads.append(thread)
        deadline = started + ready_timeout
        for svc in services:
            problem = _wait_listening(runtime, f"{key}/{svc.name}", svc, results, deadline)
            if problem:
                return RunResult(verdict=Verdict.SETUP_ERROR, stage="services", message=problem,
                                 setup_time=round(time.monotonic() - started, 6))
        setup = time.monotonic() - started
        result = runtime.run(spec, rootfs, volumes=volumes, key=key,
                             network=NetAttach(net.id, main_name))
        return msgspec.structs.replace(result, setup_time=round(setup, 6))
    finally:
        for svc in services:
            runtime.kill(f"{key}/{svc.name}")
        for thread in threads:
            thread.join()
        runtime.remove_network(net.id)


def _wait_listening(runtime, svc_key: str, svc: Service, results: dict, deadline: float) -> str:
    """"" once `svc` listens; otherwise why it never will."""
    while True:
        state = runtime.probe(svc_key, svc.port)
        if state == "listening":
            return ""
        done = results.get(svc.name)
        if done is not None:  # it ended (or never started) without listening
            detail = done.message or _tail(done.stderr) or _tail(done.stdout)
            how = done.verdict.value + (f" at {done.stage}" if done.stage else "")
            return f"service {svc.name!r} ended ({how}) before listening on port {svc.port}" \
                + (f": {detail}" if detail else "")
        if time.monotonic() >= deadline:
            return f"service {svc.name!r} did not listen on port {svc.port} in time"
        time.sleep(READY_POLL)
