"""`sbx up`, `sbx api`, `sbx worker`, `sbx submit`: running the service and talking to it.

`sbx up` starts everything on one machine with no configuration, each part a child process:
a Redis server with persistence under the state directory (unless REDIS_URL points at one), the
registry (Debian's docker-registry) on 127.0.0.1:5000 storing under the state directory, the
base images in images/ built and pushed to it, the API on 127.0.0.1:8000 and one worker per
core (SBX_REDIS_PORT, SBX_REGISTRY and SBX_API_PORT move them). The local API and workers reach
Redis over its Unix socket (SBX_REDIS_UNIX=0: over TCP); workers elsewhere use the TCP port.
Ctrl-C or SIGTERM stops them all, in reverse order. Without SBX_API_KEY/SBX_API_KEYS a random
key is generated once and kept in STATE/api-key (mode 0600); `sbx submit` reads it.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from sandbox import syscalls as sc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_PORT = 6390
"""Port of the Redis `sbx up` starts: not 6379, which Debian's own redis-server service takes."""
REGISTRY_ADDR = ("127.0.0.1", 5000)
API_ADDR = ("127.0.0.1", 8000)
SELF_TEST_IMAGE = "busybox"
"""Published first and waited for: every worker's self-test runs in it."""
REDIS_LOAD_TIMEOUT = 300.0
"""Seconds Redis may take to replay its append-only file before `sbx up` gives up."""


def _say(msg: str) -> None:
    print(f"sbx up: {msg}", file=sys.stderr, flush=True)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"sbx up: {what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"sbx up: {what} did not come up within {timeout:.0f}s")
        time.sleep(0.1)


def _registry_answers(host: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=1)
        conn.request("GET", "/v2/")
        ok = conn.getresponse().status in (200, 401)
        conn.close()
        return ok
    except OSError:
        return False


def _die_with_parent(parent: int) -> None:
    """In a child before exec: SIGTERM when `sbx up` dies, even by SIGKILL (runuser, for one,
    sends SIGKILL two seconds after forwarding a SIGTERM, before a slow stop() is done).
    Nothing is imported here: a forked child must not take the import lock."""
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


class Stack:
    """The child processes of `sbx up`, stopped in reverse order of start."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.oneshot: set[str] = set()
        """Children expected to finish (image publishing): their exit is not a failure."""
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
              oneshot: bool = False) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        # Each child leads its own process group, so stopping it reaches its children too
        # (image builds run mmdebstrap and containers).
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True,
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        self.procs.append((name, proc))
        if oneshot:
            self.oneshot.add(name)
        return proc

    def stop(self) -> None:
        """Stop the children one by one, last started first: workers finish their job and
        unregister while Redis is still there to hear it."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if name in self.oneshot else proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _say(f"{name} ignored SIGTERM; killing it")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def dead(self) -> str | None:
        """The first long-running child that exited; reaps finished one-shot children."""
        for name, proc in self.procs:
            if proc.poll() is not None and name not in self.oneshot:
                return f"{name} exited with {proc.returncode} (log: {self.logs / (name + '.log')})"
        return None


def start_redis(stack: Stack, port: int) -> str:
    directory = stack.state_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    if _port_open("127.0.0.1", port):
        raise SystemExit(f"sbx up: 127.0.0.1:{port} is taken; set REDIS_URL or SBX_REDIS_PORT")
    sock = directory / "redis.sock"
    # Persistence is the append-only file (fsync every second). No RDB snapshots besides: each
    # forks Redis and writes the whole dataset (a result TTL's worth of runs), and once a
    # minute under load that cost ~0.8 ms of CPU per run with 390 MB of results (measured).
    proc = stack.start("redis", [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--protected-mode", "yes",
        "--unixsocket", str(sock), "--unixsocketperm", "700",
    ])
    _wait(lambda: _port_open("127.0.0.1", port), "redis-server", 20, proc)
    # The port opens before Redis has replayed its append-only file; nothing else starts
    # until it answers.
    import redis

    from workers.queues import is_ready

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        if not is_ready(client):
            _say("waiting for Redis to load its data")
        _wait(lambda: is_ready(client), "redis-server (loading its data)", REDIS_LOAD_TIMEOUT, proc)
    finally:
        client.close()
    # Processes on this machine use the socket (cheaper than loopback TCP per round trip);
    # workers on other machines use the TCP port.
    if os.environ.get("SBX_REDIS_UNIX", "1") != "0" and len(str(sock)) < 100:
        return f"unix://{sock}?db=0"
    return f"redis://127.0.0.1:{port}/0"


def start_registry(stack: Stack, addr: str) -> str:
    host, _, port_text = addr.rpartition(":")
    port = int(port_text)
    if _registry_answers(host, port):
        _say(f"a registry already answers on {addr}; using it")
        return addr
    storage = stack.state_dir / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    config = stack.state_dir / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {addr}\n"
    )
    proc = stack.start("registry", ["docker-registry", "serve", str(config)])
    _wait(lambda: _registry_answers(host, port), "docker-registry", 20, proc)
    return addr


def publish_images(names: list[str]) -> int:
    """Build images/NAME for each name and push it to the registry (`python -m cli.service_cmd
    publish NAME...`, run by `sbx up` as a child process); return the number that failed."""
    from sandbox.config import RuntimeSettings

    try:
        from sandbox.oci.build import Builder
        from sandbox.oci.pull import Puller
    except ImportError:
        _say("no image builder in this checkout (sandbox.oci.build); not publishing base images")
        return len(names)
    settings = RuntimeSettings.from_env()
    failed = 0
    builder = Builder(settings)
    for name in names:
        try:
            result = builder.build(str(REPO / "images" / name), tag=name)
            Puller(settings, store=builder.store).push(result.reference)
            _say(f"published {result.reference}")
        except Exception as exc:  # noqa: BLE001 - report and go on with the other images
            _say(f"could not publish image {name}: {exc}")
            failed += 1
    return failed


def api_key(state_dir: Path) -> str:
    """SBX_API_KEY, or the key kept in STATE/api-key (made on first use, mode 0600)."""
    if os.environ.get("SBX_API_KEY"):
        return os.environ["SBX_API_KEY"]
    path = state_dir / "api-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def _state_dir() -> Path:
    from sandbox.config import RuntimeSettings

    return Path(RuntimeSettings.from_env().state_dir)


def cmd_up(args: argparse.Namespace) -> int:
    from workers.main import drop_privileges

    drop_privileges(os.environ.get("SBX_USER", "sbx"))
    state_dir = _state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(state_dir)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = os.environ.get("REDIS_URL") or start_redis(stack, int(os.environ.get("SBX_REDIS_PORT", DEFAULT_REDIS_PORT)))
        registry = start_registry(stack, os.environ.get("SBX_REGISTRY") or "%s:%d" % REGISTRY_ADDR)
        env = {**os.environ, "SBX_REDIS_URL": redis_url, "REDIS_URL": redis_url, "SBX_REGISTRY": registry,
               "SBX_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO)}
        if registry not in os.environ.get("SBX_INSECURE_REGISTRIES", "127.0.0.1:5000,localhost:5000"):
            env["SBX_INSECURE_REGISTRIES"] = ",".join(
                filter(None, [os.environ.get("SBX_INSECURE_REGISTRIES", "127.0.0.1:5000,localhost:5000"), registry]))
        if not (os.environ.get("SBX_API_KEYS") or os.environ.get("SBX_API_KEYS_FILE")
                or os.environ.get("SBX_OPEN_ACCESS")):
            env["SBX_API_KEY"] = api_key(state_dir)
        names = sorted(p.name for p in (REPO / "images").iterdir() if (p / "Dockerfile").exists())
        if args.images is not None:
            names = [n for n in names if n in args.images.split(",")]
        publish = [sys.executable, "-m", "cli.service_cmd", "publish"]
        if SELF_TEST_IMAGE in names:  # the workers' self-test runs in it: publish it first
            first = stack.start("publish-busybox", [*publish, SELF_TEST_IMAGE], env, oneshot=True)
            while first.poll() is None and not stopping.is_set():
                stopping.wait(0.2)
            if stopping.is_set():
                return 0
            if first.returncode:
                _say(f"publishing {SELF_TEST_IMAGE} failed (see {stack.logs / 'publish-busybox.log'})")
        rest = [n for n in names if n != SELF_TEST_IMAGE]
        if rest:
            stack.start("publish", [*publish, *rest], env, oneshot=True)
        host, port = API_ADDR[0], int(os.environ.get("SBX_API_PORT") or API_ADDR[1])
        api = stack.start("api", [sys.executable, "-m", "api.serve", "--host", host, "--port", str(port)], env)
        _wait(lambda: _port_open(host, port), "the API", 30, api)
        workers = [sys.executable, "-m", "workers.main"]
        if args.workers:
            workers += ["--processes", str(args.workers)]
        stack.start("workers", workers, env)
        key_note = f"key in {state_dir / 'api-key'}" if "SBX_API_KEY" in env and not os.environ.get("SBX_API_KEY") else "key from your environment"
        _say(f"API on http://{host}:{port} ({key_note}); Redis {redis_url}; registry {registry}; logs in {stack.logs}")
        while not stopping.is_set():
            problem = stack.dead()
            if problem:
                _say(problem)
                return 1
            stopping.wait(0.5)
        _say("stopping")
        return 0
    finally:
        stack.stop()


def cmd_api(args: argparse.Namespace) -> int:
    from api.serve import run

    return run(args)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run

    return run(args)


def cmd_submit(args: argparse.Namespace) -> int:
    """A thin client: POST /v1/runs with wait, print the result, exit with the run's status."""
    url = (args.url or os.environ.get("SBX_API_URL") or f"http://{API_ADDR[0]}:{API_ADDR[1]}").rstrip("/")
    key = os.environ.get("SBX_API_KEY")
    if not key:
        path = _state_dir() / "api-key"
        key = path.read_text().strip() if path.exists() else ""
    body: dict = {"image": args.image, "cmd": args.cmd, "wait": True}
    if args.stdin:
        body["stdin"] = sys.stdin.read()
    files = []
    for item in args.file:
        local, _, dest = item.partition(":")
        files.append({"path": dest or os.path.basename(local), "content": Path(local).read_text()})
    if files:
        body["files"] = files
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/runs", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read() or b"{}")
        print(json.dumps(answer, indent=2), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        result = answer.get("result") or {}
        sys.stdout.write(result.get("stdout", ""))
        sys.stderr.write(result.get("stderr", ""))
        if answer.get("status") != "done":
            print(f"sbx submit: run {answer.get('id')} is {answer.get('status')}", file=sys.stderr)
    result = answer.get("result") or {}
    return 0 if answer.get("status") == "done" and result.get("verdict") == "OK" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from api.serve import add_arguments as api_arguments
    from workers.main import add_arguments as worker_arguments

    p = subparsers.add_parser("up", help="start Redis, the registry, the API and workers on this machine")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    p.add_argument("--images", metavar="NAME,...", help="publish only these images/ (default: all)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("api", help="serve the HTTP API (settings from SBX_* variables)")
    api_arguments(p)
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("worker", help="run queue workers (settings from SBX_* variables)")
    worker_arguments(p)
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("submit", help="submit a run to the API and print its output")
    p.add_argument("--url", help="API base URL (default SBX_API_URL or http://127.0.0.1:8000)")
    p.add_argument("--stdin", action="store_true", help="send this process's stdin to the run")
    p.add_argument("--file", action="append", default=[], metavar="LOCAL[:PATH]", help="add a text file")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("image")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_submit)


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        sys.exit(1 if publish_images(sys.argv[2:]) else 0)
    sys.exit(2)
