"""What the app holds between requests: Redis clients, the job queue, the key ring.

Built once by `create_app` from Settings. Two Redis clients: `fast` (short socket timeout,
for ordinary commands) and `blocking` (socket timeout above the longest wait, for XREAD
BLOCK), so a hung Redis fails ordinary requests quickly; and `aio`, an asyncio client the
submit/wait/read path uses on the event loop (no thread hop: 0.4 ms CPU per request). Both reconnect by themselves when
Redis comes back, which is all "recovers without restart" needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio

from api.auth import KeyRing
from api.settings import Settings
from workers.queues import JobQueue, connect, connect_async


@dataclass
class AppState:
    settings: Settings
    fast: redis.Redis
    blocking: redis.Redis
    queue: JobQueue
    keyring: KeyRing
    aio: redis.asyncio.Redis
    """asyncio client for the hot path (submit, wait, read a run) on the event loop."""

    @classmethod
    def build(cls, settings: Settings) -> "AppState":
        fast = connect(settings.redis_url)
        blocking = connect(settings.redis_url, block_seconds=max(settings.max_wait, settings.pull_wait))
        queue = JobQueue(
            fast,
            max_depth=settings.max_queue,
            result_ttl=settings.result_ttl,
            queued_ttl=settings.queued_ttl,
        )
        aio = connect_async(settings.redis_url, block_seconds=max(settings.max_wait, settings.pull_wait))
        return cls(settings=settings, fast=fast, blocking=blocking, queue=queue, keyring=KeyRing(settings),
                   aio=aio)

    async def close(self) -> None:
        self.fast.close()
        self.blocking.close()
        await self.aio.aclose()
