"""Long statement texts travel beside their command, not in it.

A shard statement is a command on the node's control stream, and every message there is
at most 256 KiB (:mod:`controller.limits`), while SQL may be up to ``A67_MAX_QUERY_BYTES``
(1 MiB by default) — a big multi-row INSERT, say. A text over
:data:`~controller.limits.SQL_INLINE_MAX_BYTES` is therefore kept here while its command
runs, and the command carries a :class:`StatementRef` (id, size, SHA-256) instead; the
node fetches the text over ``NodeService.FetchStatement`` on the node port (mutual TLS)
and checks it against the size and digest before running it. Only the node the command
went to may fetch it; the text is forgotten when the command ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator

from automator67.v1 import node_pb2

from controller.errors import NotFound
from controller.limits import CHUNK_BYTES, SQL_INLINE_MAX_BYTES

STATEMENT_KINDS = ("execute_shard_statement", "shard_transaction")
"""The commands whose ``sql`` may be long."""


class StatementTexts:
    """Texts of commands in flight, by reference id, with the node each went to."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[str, bytes]] = {}

    def __len__(self) -> int:
        return len(self._texts)

    @contextlib.contextmanager
    def offload(self, node_id: str, command: node_pb2.NodeCommand) -> Iterator[None]:
        """While the block runs, a long ``sql`` of ``command`` is held here and the command
        carries a reference to it instead (the command is changed in place)."""
        kind = command.WhichOneof("kind")
        if kind not in STATEMENT_KINDS:
            yield
            return
        body = getattr(command, kind)
        if len(body.sql) * 4 <= SQL_INLINE_MAX_BYTES:  # at most 4 bytes a character: surely short
            yield
            return
        data = body.sql.encode()
        if len(data) <= SQL_INLINE_MAX_BYTES:
            yield
            return
        ref = uuid.uuid4().hex
        self._texts[ref] = (node_id, data)
        body.sql = ""
        body.sql_ref.CopyFrom(
            node_pb2.StatementRef(id=ref, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
        try:
            yield
        finally:
            self._texts.pop(ref, None)

    def pieces(self, node_id: str, ref: str) -> Iterator[bytes]:
        """The text of ``ref`` in pieces of at most :data:`~controller.limits.CHUNK_BYTES`,
        for the node it was sent to; ``NOT_FOUND`` for any other node or an ended command."""
        entry = self._texts.get(ref)
        if entry is None or entry[0] != node_id:
            raise NotFound(
                "No statement text with this id is waiting for this node (its command ended, "
                "or it went to another node)",
                reason="STATEMENT_NOT_FOUND",
            )
        data = entry[1]
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]
