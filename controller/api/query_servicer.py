"""``automator67.v1.QueryService``: a thin edge over :class:`controller.federation.service.DatabaseService`."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc
from automator67.v1 import query_pb2, query_pb2_grpc

from controller.api.context import current_principal
from controller.api.http import set_http_status
from controller.errors import DeadlineExceeded
from controller.federation.service import DatabaseService, to_proto, transaction_to_proto

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class QueryServicer(query_pb2_grpc.QueryServiceServicer):
    def __init__(self, service: DatabaseService) -> None:
        self._service = service

    async def CreateDatabase(
        self, request: query_pb2.CreateDatabaseRequest, context: Context
    ) -> query_pb2.CreateDatabaseResponse:
        row = await self._service.create(current_principal().user_id, request)
        await set_http_status(context, 201)
        return query_pb2.CreateDatabaseResponse(database=to_proto(row))

    async def GetDatabase(
        self, request: query_pb2.GetDatabaseRequest, context: Context
    ) -> query_pb2.GetDatabaseResponse:
        return query_pb2.GetDatabaseResponse(
            database=to_proto(await self._service.get(current_principal().user_id, request.db_id))
        )

    async def ListDatabases(
        self, request: query_pb2.ListDatabasesRequest, context: Context
    ) -> query_pb2.ListDatabasesResponse:
        rows, token = await self._service.list_databases(
            current_principal().user_id, request.page_size, request.page_token
        )
        return query_pb2.ListDatabasesResponse(databases=[to_proto(r) for r in rows], next_page_token=token)

    async def DeleteDatabase(
        self, request: query_pb2.DeleteDatabaseRequest, context: Context
    ) -> query_pb2.DeleteDatabaseResponse:
        await self._service.delete(current_principal().user_id, request.db_id)
        return query_pb2.DeleteDatabaseResponse()

    async def ApplySchema(
        self, request: query_pb2.ApplySchemaRequest, context: Context
    ) -> query_pb2.ApplySchemaResponse:
        row = await self._service.apply_schema(current_principal().user_id, request.db_id, request.ddl)
        return query_pb2.ApplySchemaResponse(database=to_proto(row))

    async def ExecuteQuery(
        self, request: query_pb2.ExecuteQueryRequest, context: Context
    ) -> query_pb2.ExecuteQueryResponse:
        return await self._service.execute_query(current_principal().user_id, request)

    async def StreamQuery(  # type: ignore[override]  # writes with context.write (bounded by the deadline)
        self, request: query_pb2.StreamQueryRequest, context: Context
    ) -> None:
        """The merged rows in batches, written as they are merged (gRPC flow control paces the
        merge, and through it the shards); the deadline covers the whole stream."""
        stream = await self._service.stream_query(current_principal().user_id, request)
        try:
            async with asyncio.timeout_at(stream.deadline):
                async for message in stream.messages:
                    await context.write(message)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"the query did not finish within {stream.seconds:g} s (timeout_ms covers the whole stream)",
                reason="QUERY_TIMEOUT",
            ) from exc
        finally:
            await stream.messages.aclose()

    async def BeginTransaction(
        self, request: query_pb2.BeginTransactionRequest, context: Context
    ) -> query_pb2.BeginTransactionResponse:
        txn = await self._service.begin_transaction(current_principal().user_id, request)
        await set_http_status(context, 201)
        return query_pb2.BeginTransactionResponse(transaction=transaction_to_proto(txn))

    async def CommitTransaction(
        self, request: query_pb2.CommitTransactionRequest, context: Context
    ) -> query_pb2.CommitTransactionResponse:
        txn = await self._service.commit_transaction(
            current_principal().user_id, request.db_id, request.transaction_id
        )
        return query_pb2.CommitTransactionResponse(transaction=transaction_to_proto(txn))

    async def RollbackTransaction(
        self, request: query_pb2.RollbackTransactionRequest, context: Context
    ) -> query_pb2.RollbackTransactionResponse:
        txn = await self._service.rollback_transaction(
            current_principal().user_id, request.db_id, request.transaction_id
        )
        return query_pb2.RollbackTransactionResponse(transaction=transaction_to_proto(txn))
