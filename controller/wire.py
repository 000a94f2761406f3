"""Row values between agents and the controller: a JSON encoding that keeps SQL values exact.

A shard statement's rows — in a transaction too — travel in batches over
``NodeService.PushShardResult`` (the data path on the node port, see docs/databases.md):
each batch is :func:`encode_rows`, a JSON array of rows. (A transaction step sent without
``push_rows``, such as a replica's replay, still returns its small result in its command
result as one :func:`encode_result` payload.)

The controller's answer to its own callers is :func:`encode_stream_batch` (a
``StreamQueryResponse`` of rows as ``google.protobuf.Value`` s, :func:`api_value`); it is
here, with no heavy imports, because the merge worker processes run it.

JSON has integers, floats, strings, booleans and null; SQL values that JSON
cannot hold exactly travel tagged:

* ``bytes`` → ``{"$b64": "<base64>"}``
* ``decimal.Decimal`` → ``{"$dec": "<digits>"}``
* dates and times → their ISO 8601 text (the column type says what it was)

>>> decode_value(encode_value(b"\\x00\\x01"))
b'\\x00\\x01'
>>> decode_value(encode_value(Decimal("1.10")))
Decimal('1.10')
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any


def encode_value(value: Any) -> Any:
    """A JSON-ready form of one SQL value."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Decimal):
        return {"$dec": str(value)}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def decode_value(value: Any) -> Any:
    """The SQL value an :func:`encode_value` result stands for."""
    if isinstance(value, dict):
        if "$b64" in value:
            return base64.b64decode(value["$b64"])
        if "$dec" in value:
            return Decimal(value["$dec"])
    return value


_NATIVE = (type(None), bool, int, float, str)


def encode_rows(rows: list[tuple[Any, ...]] | list[list[Any]]) -> bytes:
    """One batch of rows as JSON (values as :func:`encode_value`; native ones pass as they are).

    >>> decode_rows(encode_rows([(1, "a", None), (2, b"\\x00", Decimal("1.5"))]))
    [(1, 'a', None), (2, b'\\x00', Decimal('1.5'))]
    """
    return json.dumps(
        [[v if type(v) in _NATIVE else encode_value(v) for v in row] for row in rows],
        separators=(",", ":"),
    ).encode()


def _tagged(value: dict[str, Any]) -> Any:
    if len(value) == 1:
        if "$b64" in value:
            return base64.b64decode(value["$b64"])
        if "$dec" in value:
            return Decimal(value["$dec"])
    return value


def decode_rows(data: bytes) -> list[tuple[Any, ...]]:
    """The rows of an :func:`encode_rows` batch (C-speed JSON; only tagged values are touched)."""
    return list(map(tuple, json.loads(data, object_hook=_tagged)))


def encode_result(columns: list[tuple[str, str]], rows: list[tuple[Any, ...]], rowcount: int) -> bytes:
    """The payload of a shard statement's result."""
    return json.dumps(
        {
            "columns": [list(c) for c in columns],
            "rows": [[encode_value(v) for v in row] for row in rows],
            "rowcount": rowcount,
        },
        separators=(",", ":"),
    ).encode()


def decode_result(payload: bytes) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
    """Columns, rows and rowcount from :func:`encode_result`."""
    data = json.loads(payload)
    columns = [(str(name), str(kind)) for name, kind in data["columns"]]
    rows = [tuple(decode_value(v) for v in row) for row in data["rows"]]
    return columns, rows, int(data.get("rowcount", -1))


STREAM_MESSAGE_BYTES = 256 * 1024
"""Encoded bytes aimed at per ``StreamQueryResponse`` message."""

_PLAIN = (str, float, bool, type(None))


def api_value(value: Any) -> Any:
    """A result value as ``google.protobuf.Value`` content: exact where JSON numbers are not."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if abs(value) <= 2**53 else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def api_row(row: Sequence[Any]) -> list[Any]:
    """A result row's values as :func:`api_value` s."""
    return [
        v if type(v) in _PLAIN or (type(v) is int and -(2**53) <= v <= 2**53) else api_value(v) for v in row
    ]


def encode_stream_batch(rows: Sequence[tuple[Any, ...]], size: int) -> tuple[Any, int]:
    """A ``StreamQueryResponse`` of ``rows`` and the next batch's size, aimed at
    :data:`STREAM_MESSAGE_BYTES` per message (runs in a merge worker or thread)."""
    from automator67.v1 import query_pb2

    message = query_pb2.StreamQueryResponse()
    add = message.rows.add
    for row in rows:
        add().extend(api_row(row))
    encoded = message.ByteSize()
    per_row = max(1, encoded // max(1, len(rows)))
    return message, max(1, min(2 * size, STREAM_MESSAGE_BYTES // per_row))


def only_bytes_field(raw: bytes, tag: int) -> memoryview | None:
    """The value of a serialized message that is exactly one length-delimited field
    (``tag``: its key byte, ``field_number << 3 | 2``), as a view of ``raw`` (no copy);
    None when the message is anything else (the caller parses it then).

    >>> bytes(only_bytes_field(bytes([0x12, 3]) + b"abc", 0x12))
    b'abc'
    >>> only_bytes_field(bytes([0x12, 3]) + b"abcd", 0x12) is None  # more than the field
    True
    >>> only_bytes_field(bytes([0x0A, 1]) + b"a", 0x12) is None  # another field
    True
    """
    if raw[:1] != bytes((tag,)):
        return None
    length = shift = 0
    for at in range(1, min(len(raw), 11)):  # a varint of at most 10 bytes
        byte = raw[at]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return memoryview(raw)[at + 1 :] if at + 1 + length == len(raw) else None
    return None
