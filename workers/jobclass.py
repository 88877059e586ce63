"""The rq Job class of sbx: a job may only ever call one of sbx's own functions.

rq resolves a job's function (and its success, failure and stopped callbacks) by importing a
dotted name read from Redis. Whoever can write to Redis could therefore name `os.system`. This
class closes that door: the function must be in `ALLOWED_FUNCTIONS`, callbacks, webhooks,
bound instances and dependencies are refused, and `refusal()` says why, so the worker can fail the
job with a clear reason without importing or calling anything.
"""

from __future__ import annotations

import importlib

from rq.job import Job

ALLOWED_FUNCTIONS = frozenset({"workers.tasks.run", "workers.tasks.pull", "workers.tasks.volume"})
"""Dotted names of the only functions a worker will call."""


class JobRefused(Exception):
    """The job names a function or option sbx does not run."""


class SbxJob(Job):
    """A Job that resolves its function through the allow-list only."""

    def refusal(self) -> str | None:
        """Why this job must not run, or None when it is one of ours."""
        try:
            name = self.func_name
            instance = self.instance
            args, kwargs = self.args, self.kwargs
        except Exception as exc:  # a job rq cannot even decode
            return f"job data cannot be decoded: {type(exc).__name__}"
        if name not in ALLOWED_FUNCTIONS:
            return f"function {str(name)[:200]!r} is not one of sbx's job functions"
        if instance is not None:
            return "jobs bound to an instance are not accepted"
        if kwargs or len(args) != 1 or not isinstance(args[0], bytes):
            return "job arguments must be exactly one encoded payload"
        if self._success_callback_name or self._failure_callback_name or self._stopped_callback_name:
            return "job callbacks are not accepted"
        if self._dependency_ids:
            return "job dependencies are not accepted"
        if self.webhooks:
            return "job webhooks are not accepted"
        return None

    @property
    def func(self):
        reason = self.refusal()
        if reason:
            raise JobRefused(reason)
        module, _, attr = self.func_name.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    def send_webhooks(self, status, *, exc_string=None) -> None:
        """Never send: a webhook URL read from Redis would let Redis make the worker call out."""

    @property
    def success_callback(self):
        if self._success_callback_name:
            raise JobRefused("job callbacks are not accepted")
        return None

    @property
    def failure_callback(self):
        if self._failure_callback_name:
            raise JobRefused("job callbacks are not accepted")
        return None

    @property
    def stopped_callback(self):
        if self._stopped_callback_name:
            raise JobRefused("job callbacks are not accepted")
        return None
