"""docs/operations.md's SQL examples run on a migrated store (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from tests.support import migrated_store

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    return [s.strip() for block in blocks for s in block.split(";") if s.strip()]


async def test_the_operations_docs_queries_run(store_url: str) -> None:
    statements = _statements()
    assert len(statements) == 4
    async with migrated_store(store_url) as store, store.session() as session:
        for statement in statements:
            await session.execute(text(statement))
