"""Job functions without Redis: decode -> resolve -> run -> encode, and their error paths."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from sandbox.errors import ImageError, SetupError
from sandbox.spec import RunResult, RunSpec, Verdict
from workers import tasks
from workers.images import ImageResolver
from workers.protocol import PullJob, RunJob, decode_outcome, encode


class RecordingRuntime:
    def __init__(self, result=None, error=None):
        self.calls = []
        self.result = result or RunResult(verdict=Verdict.OK, exit_code=0, stdout=b"ok\n")
        self.error = error

    def run(self, spec, rootfs, *, key=None):
        self.calls.append((spec, rootfs, key))
        if self.error:
            raise self.error
        return self.result


class FakeStore:
    def rootfs_for(self, ref, *, refresh):
        if ref == "unreachable":
            raise ImageError("registry unreachable")
        from sandbox.errors import ImageNotFound
        raise ImageNotFound(f"no {ref}")


@pytest.fixture
def bound(tmp_path: Path):
    def bind(runtime, **kw):
        ctx = tasks.WorkerContext(name="w", connection=None, runtime=runtime,
                                  images=ImageResolver({"busybox": str(tmp_path)}, store=FakeStore()),
                                  defer_metrics=True, **kw)
        tasks.bind(ctx)
        return ctx

    yield bind
    tasks.bind(None)


def payload(image="busybox", **spec) -> bytes:
    return encode(RunJob(tenant="t", image=image, spec=RunSpec(cmd=["echo", "ok"], **spec)))


def test_run_returns_the_runtime_result_and_records_a_metric(bound, tmp_path):
    runtime = RecordingRuntime()
    ctx = bound(runtime)
    outcome = decode_outcome(tasks.run(payload()))
    assert outcome.result.stdout == b"ok\n" and outcome.error is None and outcome.worker == "w"
    spec, rootfs, _key = runtime.calls[0]
    assert rootfs.layers == (str(tmp_path),) and spec.cmd == ["echo", "ok"]
    assert [label for label, _ in ctx.pending] == ["OK"]


def test_unknown_image_and_setup_errors_become_outcome_errors(bound):
    bound(RecordingRuntime())
    missing = decode_outcome(tasks.run(payload(image="nope")))
    assert missing.error.code == "image_not_found" and missing.error.status == 404
    assert missing.error.field == "image"
    down = decode_outcome(tasks.run(payload(image="unreachable")))
    assert down.error.code == "image_error" and down.error.field == "image"
    bound(RecordingRuntime(error=SetupError("no overlay", stage="rootfs")))
    setup = decode_outcome(tasks.run(payload()))
    assert setup.error.code == "setup_error" and "rootfs" in setup.error.message


def test_bad_payloads_are_invalid_spec_not_exceptions(bound):
    bound(RecordingRuntime())
    assert decode_outcome(tasks.run(b"\xc1garbage")).error.code == "invalid_spec"
    bad_path = encode(RunJob(tenant="t", image="busybox",
                             spec=RunSpec(cmd=["true"], workdir="relative")))
    out = decode_outcome(tasks.run(bad_path))
    assert out.error.code == "invalid_spec" and out.error.field == "workdir"


def test_oversized_outcome_is_replaced_by_an_error(bound):
    big = RunResult(verdict=Verdict.OK, exit_code=0, stdout=b"x" * 5000)
    bound(RecordingRuntime(result=big), max_outcome_bytes=1000)
    out = decode_outcome(tasks.run(payload()))
    assert out.result is None and out.error.code == "result_too_large" and out.error.status == 413


def test_pull_of_a_local_image_and_of_an_unknown_one(bound):
    bound(RecordingRuntime())
    ok = decode_outcome(tasks.pull(encode(PullJob(image="busybox"))))
    assert ok.image.name == "busybox" and ok.image.source == "local"
    missing = decode_outcome(tasks.pull(encode(PullJob(image="nope"))))
    assert missing.error.status == 404


def test_kill_only_reaches_the_run_in_progress(bound):
    killed = []

    class Killable(RecordingRuntime):
        def kill(self, key):
            killed.append(key)

    ctx = bound(Killable())
    ctx.kill("a" * 32)
    assert killed == []
    ctx.running.add("b" * 32)
    ctx.kill("b" * 32)
    assert killed == ["b" * 32] and "b" * 32 in ctx.killed


def test_tasks_outside_a_worker_refuse_to_run():
    tasks.bind(None)
    with pytest.raises(RuntimeError, match="bind"):
        tasks.run(payload())


def test_image_environment_is_merged_under_the_request_env(bound, tmp_path):
    class EnvStore:
        def rootfs_for(self, ref, *, refresh):
            from sandbox.spec import Rootfs
            return Rootfs(layers=(str(tmp_path),)), "sha256:" + "0" * 64, {"PATH": "/img/bin", "A": "image"}

    runtime = RecordingRuntime()
    tasks.bind(tasks.WorkerContext(name="w", connection=None, runtime=runtime,
                                   images=ImageResolver({}, store=EnvStore()), defer_metrics=True))
    try:
        tasks.run(payload(image="python", env={"A": "request"}))
    finally:
        tasks.bind(None)
    assert runtime.calls[0][0].env == {"PATH": "/img/bin", "A": "request"}
    assert msgspec.structs.asdict(runtime.calls[0][0])["cmd"] == ["echo", "ok"]
