"""/v1/health and /metrics: what the service is doing, from Redis and the registry."""

from __future__ import annotations

import redis
from litestar import Response, get
from litestar.datastructures import State

from api.routes.common import in_thread
from api.routes.images import registry_get
from api.schemas import ComponentOut, HealthOut, WorkerOut
from api.state import AppState
from workers.queues import (
    LATENCY_BUCKETS,
    METRICS_LATENCY,
    METRICS_VERDICTS,
    WORKERS_SET,
    worker_key,
)


def alive_workers(conn: redis.Redis) -> list[WorkerOut]:
    """Workers whose liveness key has not expired; stale names are pruned from the set."""
    names = sorted(n.decode() for n in conn.smembers(WORKERS_SET))
    if not names:
        return []
    with conn.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(worker_key(name))
        infos = pipe.execute()
    workers, dead = [], []
    for name, info in zip(names, infos):
        if not info:
            dead.append(name)
            continue
        info = {k.decode(): v.decode(errors="replace") for k, v in info.items()}
        pid = info.get("pid", "0")
        workers.append(
            WorkerOut(
                name=name,
                host=info.get("host", ""),
                pid=int(pid) if pid.isdigit() else 0,
                limits_mode=info.get("limits_mode", ""),
                current=info.get("current", ""),
            )
        )
    if dead:
        conn.srem(WORKERS_SET, *dead)
    return workers


@get("/v1/health", operation_id="getHealth", summary="Service health")
async def health(state: State) -> Response[HealthOut]:
    """Redis, the registry, live workers and the limits mode (cgroup v1/v2 or rlimit) each
    worker reported. 200 when Redis is up ("degraded" if no worker or no registry), 503 when
    Redis is down. Needs no API key and shows no run data."""
    return await in_thread(_health, state.app)


def _health(app: AppState) -> Response[HealthOut]:
    try:
        app.fast.ping()
        redis_ok = ComponentOut(ok=True)
        workers = alive_workers(app.fast)
        depth = app.queue.depth()
    except redis.RedisError as exc:
        redis_ok = ComponentOut(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        workers, depth = [], 0
    try:
        registry_get(app.settings, "/v2/")
        registry_ok = ComponentOut(ok=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "registry not usable"
        registry_ok = ComponentOut(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    if not redis_ok.ok:
        status = "down"
    elif not workers or not registry_ok.ok:
        status = "degraded"
    else:
        status = "ok"
    body = HealthOut(
        status=status,
        redis=redis_ok,
        registry=registry_ok,
        workers_alive=len(workers),
        workers=workers,
        limits_modes=sorted({w.limits_mode for w in workers}),
        queue_depth=depth,
    )
    headers = {"Retry-After": "2"} if status == "down" else {}
    return Response(body, status_code=503 if status == "down" else 200, headers=headers)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(app: AppState) -> str:
    conn = app.fast
    with conn.pipeline(transaction=False) as pipe:
        pipe.llen(app.queue.rq.key)
        pipe.hgetall(METRICS_VERDICTS)
        pipe.hgetall(METRICS_LATENCY)
        depth, verdicts, latency = pipe.execute()
    workers = alive_workers(conn)
    lines = [
        "# HELP sbx_queue_depth Runs waiting for a worker.",
        "# TYPE sbx_queue_depth gauge",
        f"sbx_queue_depth {int(depth)}",
        "# HELP sbx_workers_alive Worker processes with a live heartbeat.",
        "# TYPE sbx_workers_alive gauge",
        f"sbx_workers_alive {len(workers)}",
        "# HELP sbx_runs_total Finished jobs by verdict (ERROR_* when the run could not start).",
        "# TYPE sbx_runs_total counter",
    ]
    for verdict, count in sorted((k.decode(), int(v)) for k, v in verdicts.items()):
        lines.append(f'sbx_runs_total{{verdict="{_label(verdict)}"}} {count}')
    raw = {k.decode(): v.decode() for k, v in latency.items()}
    lines += [
        "# HELP sbx_run_latency_seconds Seconds from enqueue to the end of the job.",
        "# TYPE sbx_run_latency_seconds histogram",
    ]
    cumulative = 0
    for bound in LATENCY_BUCKETS:
        cumulative += int(raw.get(f"le={bound}", 0))
        lines.append(f'sbx_run_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
    cumulative += int(raw.get("le=+Inf", 0))
    lines.append(f'sbx_run_latency_seconds_bucket{{le="+Inf"}} {cumulative}')
    lines.append(f"sbx_run_latency_seconds_sum {float(raw.get('sum', 0.0))}")
    lines.append(f"sbx_run_latency_seconds_count {int(raw.get('count', 0))}")
    return "\n".join(lines) + "\n"


@get("/metrics", operation_id="getMetrics", summary="Prometheus metrics", media_type="text/plain")
async def metrics(state: State) -> Response[str]:
    """Prometheus text format: queue depth, live workers, runs by verdict, run latency."""
    text = await in_thread(render_metrics, state.app)
    return Response(text, media_type="text/plain; version=0.0.4")


