"""/v1/volumes: a tenant's named volumes (create with a quota, list, inspect, delete).

Volumes live on one worker host (the one whose workers serve the volume queue), so the API
never touches them itself: each request is a small job on that queue, answered as soon as
the worker has done it. If no volume host answers in time the request fails with 503 and
the job is withdrawn if it has not started.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from litestar import Response, delete, get, post
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody, Parameter

from api.routes.common import ERROR_RESPONSES, Tenant, in_thread
from api.schemas import ErrorOut, VolumeCreate, VolumeList, VolumeOut
from api.state import AppState
from sandbox.errors import NotFound, SandboxError, Unavailable
from workers import records
from workers.protocol import VolumeJob
from workers.records import TERMINAL

RESPONSES = {**ERROR_RESPONSES,
             409: ResponseSpec(data_container=ErrorOut,
                               description="The name is taken, or the volume is attached to a run")}

VOLUME_WAIT = 30.0
"""Seconds a volume request waits for the volume host."""

VolumeNameParam = Annotated[str, Parameter(description="Volume name", min_length=1, max_length=63,
                                           pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


def _stamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _out(info) -> VolumeOut:
    return VolumeOut(name=info.name, size=info.size, used=info.used,
                     created_at=_stamp(info.created_at), updated_at=_stamp(info.updated_at))


def _do(app: AppState, job: VolumeJob) -> list:
    job_id = app.queue.submit_volume(job, timeout=int(VOLUME_WAIT) + 30)
    records.wait(app.blocking, job_id, VOLUME_WAIT)
    record = records.load(app.fast, job_id)
    if record is None or record.status not in TERMINAL:
        records.cancel(app.fast, job_id, app.settings.result_ttl)
        raise Unavailable("the volume host did not answer in time; retry later", retry_after=5)
    outcome = record.outcome
    if outcome is None:
        raise SandboxError(record.reason or "the volume operation failed")
    if outcome.error is not None:
        exc = SandboxError(outcome.error.message, field=outcome.error.field)
        exc.code, exc.status = outcome.error.code, outcome.error.status
        raise exc
    return outcome.volumes or []


@post("/v1/volumes", operation_id="createVolume", status_code=201, responses=RESPONSES,
      summary="Create a volume")
async def create_volume(data: JSONBody[VolumeCreate], tenant: Tenant, state: State) -> VolumeOut:
    """Create a named volume with a quota of `size` bytes. 409 if the name is taken."""
    return await in_thread(_create, data, tenant, state.app)


def _create(data: VolumeCreate, tenant: str, app: AppState) -> VolumeOut:
    found = _do(app, VolumeJob(op="create", tenant=tenant, name=data.name, size=data.size))
    return _out(found[0])


@get("/v1/volumes", operation_id="listVolumes", responses=RESPONSES, summary="List volumes")
async def list_volumes(tenant: Tenant, state: State) -> VolumeList:
    """The caller's volumes, with the bytes each uses."""
    return await in_thread(_list, tenant, state.app)


def _list(tenant: str, app: AppState) -> VolumeList:
    return VolumeList(volumes=[_out(v) for v in _do(app, VolumeJob(op="list", tenant=tenant))])


@get("/v1/volumes/{name:str}", operation_id="getVolume", responses=RESPONSES,
     summary="Inspect a volume")
async def get_volume(name: VolumeNameParam, tenant: Tenant, state: State) -> VolumeOut:
    """One volume: its quota (`size`) and the bytes it uses."""
    return await in_thread(_inspect, name, tenant, state.app)


def _inspect(name: str, tenant: str, app: AppState) -> VolumeOut:
    found = _do(app, VolumeJob(op="inspect", tenant=tenant, name=name))
    if not found:
        raise NotFound(f"volume {name!r} not found", field="name")
    return _out(found[0])


@delete("/v1/volumes/{name:str}", operation_id="deleteVolume", status_code=204,
        responses=RESPONSES, summary="Delete a volume")
async def delete_volume(name: VolumeNameParam, tenant: Tenant, state: State) -> Response[None]:
    """Delete a volume and its data. 409 while a run has it attached."""
    await in_thread(_do, state.app, VolumeJob(op="delete", tenant=tenant, name=name))
    return Response(None, status_code=204)
