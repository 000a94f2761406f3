"""``google.protobuf.Timestamp`` from Python times, in one place.

>>> from datetime import datetime, UTC
>>> timestamp(datetime(2026, 1, 1, tzinfo=UTC)).seconds
1767225600
>>> timestamp(None) is None
True
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2


def timestamp(value: datetime | float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for an aware datetime or a POSIX time; None stays None (the field stays unset)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC))
    return stamp
