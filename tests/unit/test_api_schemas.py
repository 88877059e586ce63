"""Wire schemas and the request -> job conversion: bounds, defaults, caps, encodings."""

from __future__ import annotations

import base64

import msgspec
import pytest

from api.convert import capped_limits, result_out, run_out, to_run_job
from api.schemas import RunRequest
from api.settings import Settings
from sandbox.errors import InvalidSpec
from sandbox.spec import Limits, RunResult, Verdict
from workers.protocol import JobError, Outcome, decode_run_job, encode
from workers.records import RunRecord, RunStatus

SETTINGS = Settings(api_keys={"k" * 16: "t"})


def decode(body: dict) -> RunRequest:
    return msgspec.json.decode(msgspec.json.encode(body), type=RunRequest)


def test_wire_contract_example_decodes_and_converts():
    req = decode({
        "image": "busybox", "cmd": ["echo", "hi"], "stdin": "", "files": [
            {"path": "main.py", "content": "print(1)", "encoding": "utf-8"}],
        "env": {"K": "V"}, "workdir": "/work",
        "limits": {"cpu_time": 1.0, "wall_time": 5.0, "memory": 268435456, "pids": 64, "output": 1048576},
        "wait": True,
    })
    job = to_run_job(req, tenant="t", settings=SETTINGS)
    assert job.spec.cmd == ["echo", "hi"] and job.spec.env == {"K": "V"}
    assert job.spec.files[0].path == "main.py" and job.spec.files[0].content == b"print(1)"
    assert job.spec.limits.memory == 268435456 and job.spec.limits.cpu_time == 1.0
    # the job payload survives the queue encoding exactly
    assert decode_run_job(encode(job)) == job


def test_only_image_and_cmd_are_required():
    job = to_run_job(decode({"image": "busybox", "cmd": ["true"]}), tenant="t", settings=SETTINGS)
    assert job.spec.limits == SETTINGS.default_limits
    assert job.spec.workdir == "/work" and job.spec.stdin == b""
    with pytest.raises(msgspec.ValidationError, match="missing required field `cmd`"):
        decode({"image": "busybox"})


def test_unknown_fields_are_refused():
    with pytest.raises(msgspec.ValidationError, match="unknown field `nonsense`"):
        decode({"image": "busybox", "cmd": ["true"], "nonsense": "x"})


@pytest.mark.parametrize("field", ["network", "services", "volumes"])
def test_network_services_and_volumes_are_typed(field):
    with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`"):
        decode({"image": "busybox", "cmd": ["true"], field: "x"})


def test_services_imply_a_private_network_and_volumes_map_to_the_job():
    job = to_run_job(decode({"image": "busybox", "cmd": ["true"],
                             "services": [{"name": "db", "image": "busybox", "cmd": ["x"],
                                           "port": 5432}],
                             "volumes": [{"name": "data", "path": "/data/", "read_only": True}]}),
                     tenant="t", settings=SETTINGS)
    assert job.spec.network == "private"
    assert job.services[0].name == "db" and job.services[0].spec.hostname == "db"
    assert job.services[0].spec.network == "private"
    assert (job.volumes[0].name, job.volumes[0].path, job.volumes[0].read_only) == \
        ("data", "/data", True)
    with pytest.raises(InvalidSpec):
        to_run_job(decode({"image": "busybox", "cmd": ["true"], "network": "none",
                           "services": [{"name": "db", "image": "busybox", "cmd": ["x"],
                                         "port": 1}]}), tenant="t", settings=SETTINGS)
    with pytest.raises(InvalidSpec):
        to_run_job(decode({"image": "busybox", "cmd": ["true"],
                           "volumes": [{"name": "data", "path": "/a/../.."}]}),
                   tenant="t", settings=SETTINGS)


def test_limit_above_server_maximum_names_the_limit():
    small = Settings(api_keys={"k" * 16: "t"}, max_limits=Limits(memory=64 * 1024 * 1024),
                     default_limits=Limits(memory=32 * 1024 * 1024))
    with pytest.raises(InvalidSpec) as err:
        capped_limits(Limits(memory=128 * 1024 * 1024), small)
    assert err.value.field == "limits.memory" and "server maximum" in err.value.message
    assert capped_limits(None, small).memory == 32 * 1024 * 1024


def test_type_bounds_come_from_the_runtime_limits():
    with pytest.raises(msgspec.ValidationError, match=r"at `\$.limits.pids`"):
        decode({"image": "busybox", "cmd": ["true"], "limits": {"pids": 0}})


def test_base64_files_and_stdin_are_decoded():
    req = decode({"image": "busybox", "cmd": ["cat"], "stdin": base64.b64encode(b"\x00\x01").decode(),
                  "stdin_encoding": "base64",
                  "files": [{"path": "a/b.bin", "content": "AP8=", "encoding": "base64", "mode": 0o755}]})
    job = to_run_job(req, tenant="t", settings=SETTINGS)
    assert job.spec.stdin == b"\x00\x01"
    assert job.spec.files[0].content == b"\x00\xff" and job.spec.files[0].mode == 0o755


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a\x00b", ".", ""])
def test_bad_file_paths_name_the_file(path):
    with pytest.raises((InvalidSpec, msgspec.ValidationError)) as err:
        to_run_job(decode({"image": "busybox", "cmd": ["true"], "files": [{"path": path}]}),
                   tenant="t", settings=SETTINGS)
    if isinstance(err.value, InvalidSpec):
        assert err.value.field == "files[0].path"


def _record(outcome: Outcome | None, status=RunStatus.DONE) -> RunRecord:
    return RunRecord(id="a" * 32, tenant="t", kind="run", status=status, outcome=outcome)


def test_output_rendering_utf8_with_replacement_or_lossless_base64():
    result = RunResult(verdict=Verdict.OK, exit_code=0, stdout=b"ok\xff\n", stderr=b"\x00")
    text = result_out(result, "utf-8")
    assert text.stdout == "ok\ufffd\n" and text.stderr == "\x00" and text.output_encoding == "utf-8"
    raw = result_out(result, "base64")
    assert base64.b64decode(raw.stdout) == b"ok\xff\n"


def test_run_out_shows_errors_and_failure_reasons():
    failed = run_out(_record(Outcome(error=JobError(code="image_not_found", message="no image x",
                                                    status=404, field="image"))))
    assert failed.error.error == "image_not_found" and failed.error.field == "image"
    abandoned = run_out(RunRecord(id="b" * 32, tenant="t", kind="run", status=RunStatus.FAILED,
                                  reason="worker w stopped responding"))
    assert abandoned.status == "failed" and "stopped responding" in abandoned.error.message
    done = run_out(_record(Outcome(result=RunResult(verdict=Verdict.OK, exit_code=0))))
    assert done.error is None and done.result.verdict == Verdict.OK


def test_response_field_names_match_the_wire_contract():
    body = msgspec.json.decode(msgspec.json.encode(run_out(_record(Outcome(result=RunResult(
        verdict=Verdict.OK, exit_code=0, stdout=b"hi\n"))))))
    assert {"id", "status", "result", "created_at", "started_at", "finished_at"} <= set(body)
    assert {"verdict", "exit_code", "signal", "stdout", "stderr", "cpu_time", "wall_time", "memory"} <= set(
        body["result"])
    # every field `sbx run --json` prints is in the API's result too
    assert set(RunResult.__struct_fields__) <= set(body["result"])
