"""Long SQL texts travel beside their command: ``NodeService.FetchStatement`` on the node
port serves a text only to the node its command went to, and only while the command runs.
(End to end, a transaction's 640 KB INSERT runs through real agents in
tests/integration/test_transactions.py.)"""

from __future__ import annotations

import hashlib

import grpc
import pytest
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.limits import SQL_INLINE_MAX_BYTES
from controller.nodes.statements import StatementTexts
from controller.server import Controller
from tests.integration.test_node_api import FakeNode, _enroll, _reason, _user, controller  # noqa: F401


def _statement(sql: str) -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(
        command_id="c1", execute_shard_statement=node_pb2.ExecuteShardStatement(database_id="d", sql=sql)
    )


def test_short_texts_stay_in_the_command_long_ones_become_references() -> None:
    texts = StatementTexts()
    short = _statement("SELECT 1")
    with texts.offload("n1", short):
        assert short.execute_shard_statement.sql == "SELECT 1"
        assert not short.execute_shard_statement.HasField("sql_ref")
        assert len(texts) == 0
    sql = "SELECT '" + "é" * SQL_INLINE_MAX_BYTES + "'"  # characters of 2 bytes: the byte size counts
    long = _statement(sql)
    with texts.offload("n1", long):
        body = long.execute_shard_statement
        assert body.sql == ""
        data = sql.encode()
        assert (body.sql_ref.size, body.sql_ref.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert b"".join(texts.pieces("n1", body.sql_ref.id)) == data
        with pytest.raises(Exception, match="another node"):
            list(texts.pieces("n2", body.sql_ref.id))
    with pytest.raises(Exception, match="command ended"):
        list(texts.pieces("n1", body.sql_ref.id))
    assert len(texts) == 0


async def test_fetch_statement_serves_only_the_node_the_command_went_to(
    controller: Controller,  # noqa: F811
    channel: grpc.aio.Channel,
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    mine, other = FakeNode(), FakeNode()
    mine_id = (await _enroll(stub, token, mine)).node_id
    await _enroll(stub, token, other)
    sql = "INSERT INTO t VALUES " + ", ".join(f"({i}, '{'x' * 100}')" for i in range(3000))  # ~330 KB
    command = _statement(sql)
    async with mine.channel(controller) as mine_channel, other.channel(controller) as other_channel:

        async def fetch(node_channel: grpc.aio.Channel, ref: str) -> bytes:
            call = node_pb2_grpc.NodeServiceStub(node_channel).FetchStatement(
                node_pb2.FetchStatementRequest(id=ref)
            )
            return b"".join([piece.data async for piece in call])

        with controller.fleet.streams.statements.offload(mine_id, command):
            ref = command.execute_shard_statement.sql_ref.id
            assert await fetch(mine_channel, ref) == sql.encode()  # in several pieces under the node bound
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await fetch(other_channel, ref)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert _reason(info.value) == "STATEMENT_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the command ended: gone
            await fetch(mine_channel, ref)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
