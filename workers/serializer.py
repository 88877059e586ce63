"""The rq serializer of sbx: msgpack through msgspec, never pickle.

rq stores three kinds of serialized data per job: the call tuple (function name, instance,
args, kwargs), the job's `meta` dict and the function's return value. msgpack can only ever
produce plain builtin values (dict, list, str, bytes, int, float, bool, None), so reading a
job from a Redis an attacker can write to never constructs objects or runs code; what the
worker then does with the function name is guarded separately (workers/jobclass.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_SERIALIZED = 64 * 1024 * 1024
"""Bytes: the largest blob the serializer decodes; larger is refused as corrupt or hostile."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class MsgpackSerializer:
    """rq `Serializer` protocol: `dumps(obj) -> bytes` and `loads(bytes) -> obj`."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        if isinstance(obj, tuple):
            obj = list(obj)
        return _encoder.encode(obj)

    @staticmethod
    def loads(data: bytes) -> Any:
        if len(data) > MAX_SERIALIZED:
            raise ValueError(f"serialized job data of {len(data)} bytes exceeds {MAX_SERIALIZED}")
        return _decoder.decode(data)
