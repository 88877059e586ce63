"""What the app holds between requests: Redis clients, the job queue, the key ring.

Built once by `create_app` from Settings. Two Redis clients: `fast` (short socket timeout,
for ordinary commands) and `blocking` (socket timeout above the longest wait, for XREAD
BLOCK), so a hung Redis fails ordinary requests quickly. Both reconnect by themselves when
Redis comes back, which is all "recovers without restart" needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from api.auth import KeyRing
from api.settings import Settings
from workers.queues import JobQueue, connect


@dataclass
class AppState:
    settings: Settings
    fast: redis.Redis
    blocking: redis.Redis
    queue: JobQueue
    keyring: KeyRing

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
        return cls(settings=settings, fast=fast, blocking=blocking, queue=queue, keyring=KeyRing(settings))

    def close(self) -> None:
        self.fast.close()
        self.blocking.close()
