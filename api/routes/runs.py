"""/v1/runs: submit a run (optionally waiting for it), read it, cancel it."""

from __future__ import annotations

from typing import Annotated, Literal

from litestar import Response, delete, get, post
from litestar.datastructures import State
from litestar.params import JSONBody, Parameter

from api.convert import job_timeout, run_out, to_run_job
from api.routes.common import ERROR_RESPONSES, Tenant, in_thread, wait_seconds
from api.schemas import RunOut, RunRequest
from api.state import AppState
from sandbox.errors import Conflict, NotFound
from workers import records
from workers.records import TERMINAL, RunRecord, RunStatus

RunId = Annotated[str, Parameter(description="Run id (32 hex digits)", min_length=1, max_length=64)]
OutputEncoding = Annotated[
    Literal["utf-8", "base64"],
    Parameter(description="utf-8: text with invalid bytes replaced; base64: lossless"),
]


def _mine(record: RunRecord | None, run_id: str, tenant: str) -> RunRecord:
    """The record if it is a run of `tenant`; 404 otherwise (other tenants' runs included)."""
    if record is None or record.tenant != tenant or record.kind != "run":
        raise NotFound(f"run {run_id!r} not found", field="id")
    return record


def _owned(app: AppState, run_id: str, tenant: str) -> RunRecord:
    return _mine(records.load(app.fast, run_id), run_id, tenant)


def _answer(record: RunRecord, encoding: str, *, waited: bool, accepted: int = 202) -> Response[RunOut]:
    body = run_out(record, encoding)
    if record.status not in TERMINAL:
        return Response(body, status_code=accepted, headers={"Location": f"/v1/runs/{record.id}"})
    outcome_error = record.outcome.error if record.outcome is not None else None
    failed = record.status == RunStatus.FAILED
    if waited and failed and outcome_error is not None and 400 <= outcome_error.status < 500:
        # The run could not even start for a reason that is the caller's (unknown image, ...).
        return Response(body, status_code=outcome_error.status)
    return Response(body, status_code=200)


@post(
    "/v1/runs",
    operation_id="createRun",
    status_code=202,
    responses=ERROR_RESPONSES,
    summary="Submit a run",
)
async def create_run(data: JSONBody[RunRequest], tenant: Tenant, state: State) -> Response[RunOut]:
    """Queue a run of `cmd` in `image`. With `wait`, answer with the result when it is done
    within the server's bound (200); otherwise, or if the bound passes first, answer 202 with
    the run's id to poll with GET /v1/runs/{id}."""
    app: AppState = state.app
    job = to_run_job(data, tenant=tenant, settings=app.settings)
    run_id = await app.queue.submit_run_async(app.aio, job, timeout=job_timeout(job, app.settings))
    seconds = wait_seconds(data.wait, app.settings.max_wait)
    record = await records.load_async(app.aio, app.fast, run_id, wait=seconds)
    if record is None:  # expired between submit and load: only with absurdly short TTLs
        raise NotFound(f"run {run_id!r} vanished", field="id")
    return _answer(record, data.output_encoding, waited=seconds > 0)


@get("/v1/runs/{run_id:str}", operation_id="getRun", responses=ERROR_RESPONSES, summary="Get a run")
async def get_run(
    run_id: RunId,
    tenant: Tenant,
    state: State,
    output_encoding: OutputEncoding = "utf-8",
    wait: Annotated[float, Parameter(ge=0, le=3600, description="Seconds to wait for the run to finish")] = 0.0,
) -> Response[RunOut]:
    """The run's status, and its result once done. `wait` blocks up to that many seconds
    (bounded by the server) for a queued or running run to finish."""
    app: AppState = state.app
    record = _mine(await records.load_async(app.aio, app.fast, run_id), run_id, tenant)
    seconds = wait_seconds(wait, app.settings.max_wait)
    if record.status not in TERMINAL and seconds > 0:
        record = _mine(await records.load_async(app.aio, app.fast, run_id, wait=seconds),
                       run_id, tenant)
    return _answer(record, output_encoding, waited=False, accepted=200)


CANCEL_WAIT = 5.0
"""Seconds DELETE waits for a running run's container to be killed before answering."""


@delete(
    "/v1/runs/{run_id:str}",
    operation_id="cancelRun",
    status_code=200,
    responses=ERROR_RESPONSES,
    summary="Cancel a run",
)
async def cancel_run(run_id: RunId, tenant: Tenant, state: State) -> Response[RunOut]:
    """Cancel a queued run (it never starts) or a running one (its container is killed).
    A run that already finished is left as it is: 409."""
    return await in_thread(_cancel_run, run_id, tenant, state.app)


def _cancel_run(run_id: str, tenant: str, app: AppState) -> Response[RunOut]:
    record = _owned(app, run_id, tenant)
    if record.status in TERMINAL:
        if record.status == RunStatus.CANCELLED:
            return Response(run_out(record), status_code=200)
        raise Conflict(f"run {run_id} already ended ({record.status.value})", field="id")
    record = records.cancel(app.fast, run_id, app.settings.result_ttl) or record
    if record.status == RunStatus.RUNNING:
        records.wait(app.blocking, run_id, min(CANCEL_WAIT, app.settings.max_wait or CANCEL_WAIT))
        record = _owned(app, run_id, tenant)
    return Response(run_out(record), status_code=200 if record.status in TERMINAL else 202)
