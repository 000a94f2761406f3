"""Keyset pagination shared by every List RPC (AIP-158), and conditional updates.

Lists are ordered by ``(created_at, id)``; a page token is the opaque url-safe
base64 of the last row's key, so a page never skips or repeats rows when rows are
added meanwhile. ``page_size`` 0 means :data:`DEFAULT_PAGE_SIZE`; larger than
:data:`MAX_PAGE_SIZE` is clamped; negative, or a token this code did not make,
is ``InvalidArgument`` on that field.

>>> from datetime import datetime, UTC
>>> decode_page_token(encode_page_token(datetime(2026, 1, 1, tzinfo=UTC), "n1"))
(datetime.datetime(2026, 1, 1, 0, 0, tzinfo=datetime.timezone.utc), 'n1')
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import CursorResult, Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.dml import Update

from controller.errors import FieldViolation, InvalidArgument
from controller.store.db import Store

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_TOKEN_CHARS = 512


class Keyed(Protocol):
    """A model listed in pages: it has a creation time and a string id."""

    created_at: Any
    id: Any


T = TypeVar("T", bound=Keyed)


def encode_page_token(created_at: datetime, row_id: str) -> str:
    """The opaque token of the page after the row with this key."""
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_page_token(token: str) -> tuple[datetime, str]:
    """The key in a page token; ``InvalidArgument`` (field ``page_token``) if it is not one."""
    try:
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError("too long")
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8"))
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, str) for v in value)
            and 0 < len(value[1]) <= 36
        ):
            raise ValueError("wrong shape")
        created_at = datetime.fromisoformat(value[0])
        if created_at.tzinfo is None:
            raise ValueError("naive time")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "The page token is invalid",
            field_violations=[FieldViolation("page_token", "not a page token returned by this list")],
        ) from None
    return created_at.astimezone(UTC), value[1]


def page_size_of(page_size: int) -> int:
    """The number of rows a page holds for a requested ``page_size``."""
    if page_size < 0:
        raise InvalidArgument(
            "The page size is invalid",
            field_violations=[FieldViolation("page_size", "must not be negative")],
        )
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


async def keyset_page(
    store: Store, statement: Select[Any], model: type[T], page_size: int, page_token: str
) -> tuple[list[T], str]:
    """One page of ``statement``'s rows ordered by (created_at, id), and the next page's token."""
    size = page_size_of(page_size)
    created: InstrumentedAttribute[Any] = model.created_at
    row_id: InstrumentedAttribute[Any] = model.id
    if page_token:
        after_created, after_id = decode_page_token(page_token)
        statement = statement.where(
            or_(created > after_created, and_(created == after_created, row_id > after_id))
        )
    statement = statement.order_by(created, row_id).limit(size + 1)
    async with store.session() as session:
        rows = cast(list[T], list((await session.execute(statement)).scalars()))
    if len(rows) <= size:
        return rows, ""
    page = rows[:size]
    return page, encode_page_token(page[-1].created_at, page[-1].id)


async def execute_update(session: AsyncSession, statement: Update) -> int:
    """Run a conditional UPDATE and return how many rows it changed."""
    result = cast(
        CursorResult[Any], await session.execute(statement.execution_options(synchronize_session=False))
    )
    return result.rowcount
