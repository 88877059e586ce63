"""/v1/images: what can be run, and pulling an image onto a worker.

The API never touches the image store: the list comes from the registry's catalog (over
HTTP) plus the "local images" workers publish in Redis, and a pull is a job on the queue.
"""

from __future__ import annotations

import http.client
import json

import msgspec
from litestar import Response, get, post
from litestar.datastructures import State
from litestar.params import JSONBody

from api.convert import image_out, pull_out
from api.routes.common import ERROR_RESPONSES, Tenant, in_thread, wait_seconds
from api.schemas import ImageList, ImageOut, PullOut, PullRequest
from api.state import AppState
from sandbox.errors import NotFound
from workers import records
from workers.protocol import ImageInfo, PullJob
from workers.queues import LOCAL_IMAGES
from workers.records import TERMINAL

REGISTRY_TIMEOUT = 2.0
"""Seconds the API gives the registry to answer a catalog or health request."""
MAX_CATALOG = 1000
"""Repositories listed at most (and tags per repository)."""


def registry_get(settings, path: str) -> dict:
    """GET a JSON document from the registry (plain HTTP on loopback by default)."""
    host = settings.registry
    conn_cls = http.client.HTTPSConnection if settings.registry_scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(host, timeout=REGISTRY_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read(4 * 1024 * 1024)
        if response.status != 200:
            raise OSError(f"registry answered {response.status} for {path}")
        return json.loads(body or b"{}")
    finally:
        conn.close()


def registry_images(settings) -> list[ImageOut]:
    catalog = registry_get(settings, f"/v2/_catalog?n={MAX_CATALOG}")
    images: list[ImageOut] = []
    for repo in (catalog.get("repositories") or [])[:MAX_CATALOG]:
        tags = registry_get(settings, f"/v2/{repo}/tags/list").get("tags") or []
        for tag in sorted(tags)[:MAX_CATALOG]:
            images.append(ImageOut(name=f"{repo}:{tag}", source="registry"))
    return images


@get("/v1/images", operation_id="listImages", responses=ERROR_RESPONSES, summary="List images")
async def list_images(tenant: Tenant, state: State) -> ImageList:
    """Images in the registry (name:tag) and local images that workers hold. If the registry
    cannot be reached, `registry_error` says why and only local images are listed."""
    return await in_thread(_list_images, state.app)


def _list_images(app: AppState) -> ImageList:
    images: list[ImageOut] = []
    registry_error = None
    try:
        images += registry_images(app.settings)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        registry_error = f"{type(exc).__name__}: {exc}"[:500]
    for raw in app.fast.hvals(LOCAL_IMAGES):
        try:
            images.append(image_out(msgspec.msgpack.decode(raw, type=ImageInfo)))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return ImageList(images=images, registry_error=registry_error)


@post(
    "/v1/images/pull",
    operation_id="pullImage",
    status_code=202,
    responses=ERROR_RESPONSES,
    summary="Pull an image",
)
async def pull_image(data: JSONBody[PullRequest], tenant: Tenant, state: State) -> Response[PullOut]:
    """Have a worker pull `image` from the registry into its store (or confirm a local image).
    With `wait` (default) answer when done: 200, or the error's status (404 for an unknown
    image); otherwise 202 with the pull's id."""
    return await in_thread(_pull_image, data, tenant, state.app)


def _pull_image(data: PullRequest, tenant: str, app: AppState) -> Response[PullOut]:
    pull_id = app.queue.submit_pull(PullJob(image=data.image), tenant=tenant)
    if data.wait:
        records.wait(app.blocking, pull_id, wait_seconds(True, app.settings.pull_wait))
    record = records.load(app.fast, pull_id)
    if record is None:
        raise NotFound(f"pull {pull_id} vanished", field="id")
    body = pull_out(record)
    if record.status not in TERMINAL:
        return Response(body, status_code=202)
    error = record.outcome.error if record.outcome is not None else None
    if error is not None and 400 <= error.status < 600:
        return Response(body, status_code=error.status if error.status < 500 else 502)
    return Response(body, status_code=200)
